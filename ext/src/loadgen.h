/* The compiled load generator of `fastproxy bench` (ext/src/loadgen.c, wrapped by
 * ext/fastproxy/_loadgen.pyx): many MQTT 3.1.1 clients over (m)TLS on one epoll loop, with no
 * Python per handshake or per message, so that the generator is not what a benchmark measures.
 *
 * Scenarios (lg_params.scenario):
 *   LG_HANDSHAKE  conns x (TCP connect, TLS handshake, CONNECT, CONNACK, DISCONNECT, close),
 *                 concurrency at a time.
 *   LG_IDLE       open conns sessions (concurrency opening at a time), hold them until stop_fd is
 *                 readable or duration_s has passed; PINGREQ every keepalive_s; with reconnect,
 *                 a dropped or refused session comes back after a random delay below retry_s.
 *   LG_PUBLISH    conns sessions, then each sends PUBLISHes (QoS 0 or 1, payload bytes) at rate
 *                 messages/s (0: as fast as the socket takes them) until messages per connection
 *                 or duration_s; QoS 1 counts PUBACKs. With sub_port, one plain-TCP subscriber
 *                 straight to the broker counts deliveries first. Bulk bytes = a large payload.
 *
 * Uses only the SSL_* / X509_* calls common to OpenSSL >= 1.1.1 and AWS-LC. */
#ifndef FASTPROXY_LOADGEN_H
#define FASTPROXY_LOADGEN_H
#include <stddef.h>

enum { LG_HANDSHAKE = 0, LG_IDLE = 1, LG_PUBLISH = 2 };

enum {
    LG_MAX_SOURCES = 64,        /* local source addresses, round-robin */
    LG_MAX_CONNS = 1000000,
    LG_MAX_PAYLOAD = 1 << 20,
    LG_MAX_BATCH = 64,          /* PUBLISH packets per write */
    LG_MAX_INFLIGHT = 64,       /* unacknowledged QoS 1 PUBLISHes per connection */
    LG_PATH_MAX = 512,
};

typedef struct lg_params {
    int scenario;
    char host[64];              /* the proxy: an IPv4 or IPv6 literal */
    int port;
    char sub_host[64];          /* LG_PUBLISH: the broker itself, for the subscriber */
    int sub_port;               /* 0: no subscriber */
    char sources[LG_MAX_SOURCES][48];
    int n_sources;              /* 0: the kernel picks the source address */
    int tls;                    /* 0: plain MQTT */
    char ca_file[LG_PATH_MAX];  /* verify the server against it; empty: no verification */
    char cert_file[LG_PATH_MAX];/* client certificate (PEM); with ca_key_file: the CA that mints */
    char key_file[LG_PATH_MAX]; /* client key (PEM): the key of every client certificate */
    char ca_key_file[LG_PATH_MAX]; /* set: mint one certificate per connection, CN = ClientId */
    char prefix[24];            /* ClientId = prefix + device number; topics fpbench/prefix/N */
    int conns;
    int concurrency;            /* connections being set up at once */
    int keepalive_s;            /* CONNECT keepalive; PINGREQ that often (0: none) */
    int qos;                    /* 0 or 1 */
    int payload;                /* PUBLISH payload bytes */
    int batch;                  /* PUBLISH packets per write (1: one TLS record each) */
    double rate;                /* messages/s per connection; 0: as fast as possible */
    long long messages;         /* per connection; 0: until duration_s */
    double duration_s;          /* LG_IDLE: hold (0: until stop_fd); LG_PUBLISH: sending time */
    double timeout_s;           /* hard bound of the whole run */
    double conn_timeout_s;      /* one connection's TCP + TLS + CONNACK */
    int reconnect;              /* LG_IDLE: dropped / failed sessions come back */
    double retry_s;             /* upper bound of the (uniformly random) reconnect delay */
    int stop_fd;                /* readable (a byte or EOF): stop; -1: none */
    int notify_fd;              /* progress and phase lines are written here; -1: none */
} lg_params;

typedef struct lg_result {
    long long started;          /* connection attempts */
    long long connack_ok;       /* sessions that got CONNACK 0 */
    long long refused;          /* CONNACK with a non-zero code */
    long long failed;           /* attempts that ended before a CONNACK (any stage) */
    long long fail_connect, fail_tls, fail_mqtt, fail_timeout;
    long long closed_by_peer;   /* established sessions the other side closed */
    long long reconnects;
    int last_refusal;           /* the last CONNACK return code other than 0 (-1: none) */
    char first_error[200];
    long long published, acked, delivered, pings;
    long long bytes_sent;       /* MQTT bytes written by the publishers */
    int live_end;               /* sessions established when the run ended */
    int live_max;
    double t_start, t_ready, t_send_start, t_send_end, t_end;  /* CLOCK_MONOTONIC, s */
    double t_first_drop, t_all_back;   /* LG_IDLE with reconnect: the storm (0: none) */
    double setup_ms_sum, setup_ms_max; /* TCP connect -> CONNACK */
    long long setup_n;
    int stopped;                /* 1: stop_fd, 2: duration / count reached, 3: timeout */
} lg_result;

/* Runs one scenario to its end (bounded by p->timeout_s). Returns 0, or -1 with a sentence in
 * err (a file, a key or an address that cannot be used); the counters say what happened to the
 * connections either way. Blocks; call it without the GIL. */
int lg_run(const lg_params *p, lg_result *r, char *err, size_t errlen);

#endif
