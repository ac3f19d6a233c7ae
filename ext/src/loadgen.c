/* The load generator of `fastproxy bench`: see loadgen.h for the scenarios.
 *
 * One thread, one epoll (level-triggered), one slot per connection. A slot walks
 *   FREE/WAIT -> TCP -> TLS -> CONNECT -> CONNACK -> UP -> (closed: FREE, or WAIT to reconnect)
 * Every length read from the peer is bounded (MQTT remaining length: at most 4 varint bytes, only
 * the first 4 body bytes are kept, the rest skipped), every wait is bounded by a deadline.
 * SSL_write on a socket the peer closed raises SIGPIPE: the caller ignores it (Python does). */
#define _GNU_SOURCE
#include "loadgen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { S_FREE, S_WAIT, S_TCP, S_TLS, S_CONNECT, S_CONNACK, S_UP, S_DONE };
enum { READ_BUF = 1 << 16, MAX_EVENTS = 256, TICK_MS = 50, SCAN_S_X1000 = 100 };
#define SETTLE_S 0.2
enum { P_HDR, P_LEN, P_BODY };          /* MQTT packet reader states */
#define SUB_TAG (-1)                    /* device number of the subscriber slot */

typedef struct conn {
    int fd;
    int dev;                /* device number (ClientId suffix); SUB_TAG: the subscriber */
    SSL *ssl;
    uint8_t st, plain, ev;  /* state, no TLS (subscriber), epoll events registered */
    double t0;              /* start of the current setup */
    double t_next;          /* WAIT: reconnect time; UP: next PINGREQ */
    double t_up;            /* UP since */
    /* output: bytes not yet taken by the socket */
    uint8_t *out;
    uint32_t ocap, olen, ooff;
    uint32_t opkts;         /* PUBLISH packets in out[ooff..olen) */
    long long sent, acked;
    uint16_t pid;
    /* MQTT packet reader */
    uint8_t pst, pfirst, pvn, plen;
    uint32_t prem, pmul;
    uint8_t pbody[4];
} conn;

typedef struct lg {
    const lg_params *p;
    lg_result *r;
    int ep;
    SSL_CTX *ctx;
    X509 *ca;
    EVP_PKEY *ca_key, *dev_key;
    struct sockaddr_storage dst, sub_dst;
    socklen_t dst_len, sub_dst_len;
    struct sockaddr_storage src[LG_MAX_SOURCES];
    socklen_t src_len[LG_MAX_SOURCES];
    int n_src, next_src;
    conn *c;
    int n;                  /* device slots */
    conn sub;
    int sub_ready;
    int setting_up;         /* slots in TCP..CONNACK */
    int waiting;            /* slots in WAIT */
    int wait_cursor;
    int live;
    long long next_dev;     /* LG_HANDSHAKE: next device number */
    long long serial;
    int ready, sending, drained, stop;
    double deadline, t_sent_all, t_quiet;
    long long last_delivered;
    uint8_t *pkt;           /* one PUBLISH (QoS 1: packet id at pid_off) */
    uint32_t pkt_len, pid_off;
    unsigned rnd;
} lg;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void note(lg *g, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(lg *g, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n;
    if (g->p->notify_fd < 0)
        return;
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (write(g->p->notify_fd, line, (size_t)n) < 0) { /* the reader went away: nothing to tell */ }
}

/* The first error of the run, kept for the report (the rest are only counted). */
static void first_error(lg *g, const char *what, const char *detail)
{
    if (g->r->first_error[0])
        return;
    snprintf(g->r->first_error, sizeof g->r->first_error, "%s: %s", what, detail);
}

static void ssl_error_text(char *buf, size_t n)
{
    unsigned long e = ERR_peek_last_error();
    if (e)
        ERR_error_string_n(e, buf, n);
    else
        snprintf(buf, n, "%s", errno ? strerror(errno) : "closed by the peer");
    ERR_clear_error();
}

static int parse_addr(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    memset(ss, 0, sizeof *ss);
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *len = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof *a6;
        return 0;
    }
    return -1;
}

/* ---------------------------------------------------------------- MQTT 3.1.1 packets */

/* Remaining length (MQTT 3.1.1 section 2.2.3): 1-4 bytes. Returns the bytes written. */
static uint32_t put_varint(uint8_t *b, uint32_t n)
{
    uint32_t i = 0;
    do {
        uint8_t d = n % 128;
        n /= 128;
        b[i++] = (uint8_t)(d | (n ? 0x80 : 0));
    } while (n && i < 4);
    return i;
}

static uint32_t put_str(uint8_t *b, const char *s, uint32_t n)
{
    b[0] = (uint8_t)(n >> 8);
    b[1] = (uint8_t)n;
    memcpy(b + 2, s, n);
    return n + 2;
}

/* CONNECT (section 3.1): protocol MQTT level 4, clean session, username = ClientId (so that a
 * username rule can be met as well); at most 2 + 10 + 2 * (2 + 63) bytes. */
static uint32_t build_connect(uint8_t *b, const char *cid, int keepalive)
{
    uint32_t n = (uint32_t)strlen(cid), body = 10 + 2 * (2 + n), at = 0;
    b[at++] = 0x10;
    at += put_varint(b + at, body);
    at += put_str(b + at, "MQTT", 4);
    b[at++] = 4;
    b[at++] = 0x02 | 0x80;              /* clean session, username */
    b[at++] = (uint8_t)(keepalive >> 8);
    b[at++] = (uint8_t)keepalive;
    at += put_str(b + at, cid, n);
    at += put_str(b + at, cid, n);
    return at;
}

static void client_id(lg *g, int dev, char *out, size_t n)
{
    if (dev == SUB_TAG)
        snprintf(out, n, "%s-sub", g->p->prefix);
    else
        snprintf(out, n, "%s-%d", g->p->prefix, dev);
}

/* ---------------------------------------------------------------- certificates */

/* A client certificate for one connection, CN = its ClientId, signed by the bench CA: every
 * device has its own identity, so identity rules (ClientId = CN, templates) hold and sessions
 * do not take each other over. Returns NULL on failure. */
static X509 *mint(lg *g, const char *cn)
{
    X509 *x = X509_new();
    X509_NAME *name;
    if (x == NULL)
        return NULL;
    if (!X509_set_version(x, 2) || !ASN1_INTEGER_set(X509_get_serialNumber(x), (long)++g->serial) ||
        !X509_gmtime_adj(X509_getm_notBefore(x), -3600) || !X509_gmtime_adj(X509_getm_notAfter(x), 7L * 86400))
        goto fail;
    name = X509_get_subject_name(x);
    if (!X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0) ||
        !X509_set_issuer_name(x, X509_get_subject_name(g->ca)) || !X509_set_pubkey(x, g->dev_key) ||
        !X509_sign(x, g->ca_key, EVP_sha256()))
        goto fail;
    return x;
fail:
    X509_free(x);
    return NULL;
}

static int load_pem(const char *path, int is_key, void **out, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    *out = is_key ? (void *)PEM_read_PrivateKey(f, NULL, NULL, NULL) : (void *)PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (*out == NULL) {
        char e[160];
        ssl_error_text(e, sizeof e);
        snprintf(err, errlen, "%s: not a PEM %s (%s)", path, is_key ? "private key" : "certificate", e);
        return -1;
    }
    return 0;
}

static int setup_tls(lg *g, char *err, size_t errlen)
{
    const lg_params *p = g->p;
    char e[160];
    g->ctx = SSL_CTX_new(TLS_client_method());
    if (g->ctx == NULL) {
        snprintf(err, errlen, "SSL_CTX_new failed");
        return -1;
    }
    SSL_CTX_set_min_proto_version(g->ctx, TLS1_2_VERSION);
    /* partial writes: a PUBLISH burst goes out as the socket takes it; no buffers kept while a
     * session idles (the generator holds tens of thousands) */
    SSL_CTX_set_mode(g->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                 SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(g->ctx, SSL_SESS_CACHE_OFF);  /* every handshake a full one */
    if (p->ca_file[0]) {
        if (SSL_CTX_load_verify_locations(g->ctx, p->ca_file, NULL) != 1) {
            ssl_error_text(e, sizeof e);
            snprintf(err, errlen, "%s: cannot load the CA (%s)", p->ca_file, e);
            return -1;
        }
        SSL_CTX_set_verify(g->ctx, SSL_VERIFY_PEER, NULL);
    } else {
        SSL_CTX_set_verify(g->ctx, SSL_VERIFY_NONE, NULL);
    }
    if (p->ca_key_file[0]) {
        if (load_pem(p->cert_file, 0, (void **)&g->ca, err, errlen) < 0 ||
            load_pem(p->ca_key_file, 1, (void **)&g->ca_key, err, errlen) < 0 ||
            load_pem(p->key_file, 1, (void **)&g->dev_key, err, errlen) < 0)
            return -1;
    } else if (p->cert_file[0]) {
        if (SSL_CTX_use_certificate_chain_file(g->ctx, p->cert_file) != 1 ||
            SSL_CTX_use_PrivateKey_file(g->ctx, p->key_file, SSL_FILETYPE_PEM) != 1) {
            ssl_error_text(e, sizeof e);
            snprintf(err, errlen, "%s / %s: cannot use the client certificate (%s)", p->cert_file, p->key_file, e);
            return -1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- slots */

static void set_events(lg *g, conn *c, uint8_t ev)
{
    struct epoll_event e;
    if (c->ev == ev)
        return;
    e.events = (ev & 1 ? EPOLLIN : 0) | (ev & 2 ? EPOLLOUT : 0);
    e.data.ptr = c;
    epoll_ctl(g->ep, EPOLL_CTL_MOD, c->fd, &e);
    c->ev = ev;
}

static int is_setup(uint8_t st) { return st >= S_TCP && st <= S_CONNACK; }

/* Ends a slot's connection. why: NULL for an orderly end. A failed setup counts as failed (and
 * is retried with reconnect); an established session that drops counts closed_by_peer. */
static void drop(lg *g, conn *c, int was_failure)
{
    double t = now_s();
    int was_up = c->st == S_UP;
    if (is_setup(c->st))
        g->setting_up--;
    if (was_up && c->dev != SUB_TAG)
        g->live--;
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);                   /* also leaves the epoll set */
        c->fd = -1;
    }
    c->olen = c->ooff = c->opkts = 0;
    c->ev = 0;
    if (c->dev == SUB_TAG) {
        c->st = S_DONE;
        return;
    }
    if (was_up && g->ready && g->p->reconnect && g->r->t_first_drop == 0)
        g->r->t_first_drop = t;
    if (g->p->reconnect && (was_failure || was_up) && !g->stop) {
        c->st = S_WAIT;
        g->waiting++;
        g->rnd = g->rnd * 1103515245u + 12345u;
        c->t_next = t + g->p->retry_s * ((g->rnd >> 8) & 0xffff) / 65536.0;
        return;
    }
    c->st = g->p->scenario == LG_HANDSHAKE ? S_FREE : S_DONE;
}

static void fail(lg *g, conn *c, long long *counter, const char *what, const char *detail)
{
    g->r->failed++;
    (*counter)++;
    first_error(g, what, detail);
    drop(g, c, 1);
}

/* Starts a TCP connect on a FREE/WAIT slot. */
static void start(lg *g, conn *c, int dev)
{
    struct epoll_event e;
    int one = 1, fd, is_sub = dev == SUB_TAG;
    const struct sockaddr_storage *dst = is_sub ? &g->sub_dst : &g->dst;
    socklen_t dst_len = is_sub ? g->sub_dst_len : g->dst_len;
    c->dev = dev;
    c->t0 = now_s();
    c->plain = is_sub || !g->p->tls;
    c->pst = P_HDR;
    c->sent = c->acked = 0;
    c->pid = 0;
    if (c->st == S_WAIT) {
        g->r->reconnects++;
        g->waiting--;
    }
    g->r->started++;
    g->setting_up++;
    c->st = S_TCP;
    fd = socket(dst->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->fd = fd;
    if (fd < 0) {
        fail(g, c, &g->r->fail_connect, "socket", strerror(errno));
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g->n_src && !is_sub) {
        int i = g->next_src++ % g->n_src;
        /* the port is picked at connect(), per destination: more than 64k sessions per source */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&g->src[i], g->src_len[i]) < 0) {
            fail(g, c, &g->r->fail_connect, "bind", strerror(errno));
            return;
        }
    }
    if (connect(fd, (const struct sockaddr *)dst, dst_len) < 0 && errno != EINPROGRESS) {
        fail(g, c, &g->r->fail_connect, "connect", strerror(errno));
        return;
    }
    e.events = EPOLLOUT;
    e.data.ptr = c;
    c->ev = 2;
    if (epoll_ctl(g->ep, EPOLL_CTL_ADD, fd, &e) < 0)
        fail(g, c, &g->r->fail_connect, "epoll_ctl", strerror(errno));
}

/* Writes out[ooff..olen). Returns 1 when all is written, 0 when the socket is full, -1 on error. */
static int flush(lg *g, conn *c)
{
    while (c->ooff < c->olen) {
        uint32_t left = c->olen - c->ooff;
        int n;
        if (c->plain) {
            n = (int)send(c->fd, c->out + c->ooff, left, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    return 0;
                return -1;
            }
        } else {
            ERR_clear_error();
            n = SSL_write(c->ssl, c->out + c->ooff, (int)left);
            if (n <= 0) {
                int e = SSL_get_error(c->ssl, n);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
                    return 0;
                return -1;
            }
        }
        c->ooff += (uint32_t)n;
    }
    c->ooff = c->olen = 0;
    if (c->opkts) {
        g->r->published += c->opkts;
        c->opkts = 0;
    }
    return 1;
}

/* Appends bytes to a slot's output buffer (grown on demand, bounded by the packet sizes). */
static int queue(conn *c, const uint8_t *b, uint32_t n)
{
    if (c->olen + n > c->ocap) {
        uint32_t cap = c->ocap ? c->ocap : 256;
        uint8_t *nb;
        while (cap < c->olen + n)
            cap *= 2;
        nb = realloc(c->out, cap);
        if (nb == NULL)
            return -1;
        c->out = nb;
        c->ocap = cap;
    }
    memcpy(c->out + c->olen, b, n);
    c->olen += n;
    return 0;
}

static void send_connect(lg *g, conn *c)
{
    uint8_t b[256];
    char cid[64];
    client_id(g, c->dev, cid, sizeof cid);
    c->st = S_CONNECT;
    if (queue(c, b, build_connect(b, cid, g->p->keepalive_s)) < 0) {
        fail(g, c, &g->r->fail_mqtt, "CONNECT", "out of memory");
        return;
    }
    switch (flush(g, c)) {
    case 1:
        c->st = S_CONNACK;
        set_events(g, c, 1);
        break;
    case 0:
        set_events(g, c, 3);
        break;
    default:
        fail(g, c, &g->r->fail_mqtt, "CONNECT", "write failed");
    }
}

/* TLS handshake steps; on success the CONNECT goes out. */
static void handshake(lg *g, conn *c)
{
    int rc, e;
    char err[160];
    ERR_clear_error();
    rc = SSL_do_handshake(c->ssl);
    if (rc == 1) {
        send_connect(g, c);
        return;
    }
    e = SSL_get_error(c->ssl, rc);
    if (e == SSL_ERROR_WANT_READ)
        set_events(g, c, 1);
    else if (e == SSL_ERROR_WANT_WRITE)
        set_events(g, c, 2);
    else {
        ssl_error_text(err, sizeof err);
        fail(g, c, &g->r->fail_tls, "TLS handshake", err);
    }
}

static void tcp_connected(lg *g, conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
        fail(g, c, &g->r->fail_connect, "connect", strerror(err ? err : errno));
        return;
    }
    if (c->plain) {
        send_connect(g, c);
        return;
    }
    c->ssl = SSL_new(g->ctx);
    if (c->ssl == NULL || !SSL_set_fd(c->ssl, c->fd)) {
        fail(g, c, &g->r->fail_tls, "SSL_new", "failed");
        return;
    }
    if (g->ca_key) {
        char cid[64];
        X509 *x;
        client_id(g, c->dev, cid, sizeof cid);
        x = mint(g, cid);
        if (x == NULL || SSL_use_certificate(c->ssl, x) != 1 || SSL_use_PrivateKey(c->ssl, g->dev_key) != 1) {
            X509_free(x);
            fail(g, c, &g->r->fail_tls, "client certificate", "cannot mint one");
            return;
        }
        X509_free(x);                   /* the SSL holds its own reference */
    }
    SSL_set_connect_state(c->ssl);
    c->st = S_TLS;
    handshake(g, c);
}

/* A whole MQTT packet arrived: first byte, remaining length, its first (up to) 4 body bytes. */
static void on_packet(lg *g, conn *c, uint8_t first, uint32_t len, const uint8_t *body)
{
    double t;
    switch (first >> 4) {
    case 2: /* CONNACK (3.2): flags, return code */
        if (c->st != S_CONNACK || len < 2) {
            fail(g, c, &g->r->fail_mqtt, "CONNACK", "unexpected");
            return;
        }
        if (body[1] != 0) {
            char code[32];
            g->r->refused++;
            g->r->last_refusal = body[1];
            snprintf(code, sizeof code, "return code %d", body[1]);
            first_error(g, "CONNACK", code);
            drop(g, c, 1);
            return;
        }
        t = now_s();
        g->setting_up--;
        c->st = S_UP;
        c->t_up = t;
        c->t_next = t + g->p->keepalive_s;
        if (c->dev == SUB_TAG) {
            /* SUBSCRIBE (3.8) fpbench/<prefix>/# at QoS 0, packet id 1 */
            uint8_t b[96];
            char topic[48];
            uint32_t tn = (uint32_t)snprintf(topic, sizeof topic, "fpbench/%s/#", g->p->prefix), at = 0;
            b[at++] = 0x82;
            at += put_varint(b + at, 2 + 2 + tn + 1);
            b[at++] = 0;
            b[at++] = 1;
            at += put_str(b + at, topic, tn);
            b[at++] = 0;
            if (queue(c, b, at) < 0) {
                fail(g, c, &g->r->fail_mqtt, "SUBSCRIBE", "out of memory");
                return;
            }
            switch (flush(g, c)) {
            case 0:
                set_events(g, c, 3);
                break;
            case -1:
                fail(g, c, &g->r->fail_mqtt, "SUBSCRIBE", "write failed");
            }
            return;
        }
        g->r->connack_ok++;
        g->r->setup_n++;
        g->r->setup_ms_sum += (t - c->t0) * 1e3;
        if ((t - c->t0) * 1e3 > g->r->setup_ms_max)
            g->r->setup_ms_max = (t - c->t0) * 1e3;
        if (g->p->scenario == LG_HANDSHAKE) {
            /* DISCONNECT (3.14), close_notify, close */
            static const uint8_t disc[2] = {0xE0, 0};
            if (queue(c, disc, 2) == 0)
                flush(g, c);
            if (c->ssl)
                SSL_shutdown(c->ssl);
            c->st = S_DONE;             /* not a failure, not a drop */
            drop(g, c, 0);
            return;
        }
        g->live++;
        if (g->live > g->r->live_max)
            g->r->live_max = g->live;
        if (g->r->t_first_drop && g->live == g->n)
            g->r->t_all_back = t;
        return;
    case 9: /* SUBACK */
        if (c->dev == SUB_TAG)
            g->sub_ready = 1;
        return;
    case 3: /* PUBLISH delivered to the subscriber */
        if (c->dev == SUB_TAG)
            g->r->delivered++;
        return;
    case 4: /* PUBACK */
        c->acked++;
        g->r->acked++;
        return;
    default: /* PINGRESP and anything else: nothing to do */
        return;
    }
}

/* Feeds received bytes through the slot's MQTT packet reader. Returns -1 on a malformed length. */
static int feed(lg *g, conn *c, const uint8_t *b, size_t n)
{
    size_t i = 0;
    while (i < n && c->fd >= 0 && c->st != S_WAIT && c->st != S_FREE) {
        switch (c->pst) {
        case P_HDR:
            c->pfirst = b[i++];
            c->pvn = 0;
            c->prem = 0;
            c->pmul = 1;
            c->plen = 0;
            c->pst = P_LEN;
            break;
        case P_LEN: {
            uint8_t d = b[i++];
            c->prem += (uint32_t)(d & 0x7F) * c->pmul;
            c->pmul *= 128;
            if (++c->pvn > 4)
                return -1;              /* a remaining length has at most 4 bytes (2.2.3) */
            if (d & 0x80)
                break;
            c->pst = P_BODY;
            if (c->prem == 0) {
                c->pst = P_HDR;
                on_packet(g, c, c->pfirst, 0, c->pbody);
            }
            break;
        }
        default: {
            size_t take = n - i < c->prem ? n - i : c->prem;
            size_t keep = c->plen < 4 ? 4 - c->plen : 0;
            if (keep > take)
                keep = take;
            memcpy(c->pbody + c->plen, b + i, keep);
            c->plen = (uint8_t)(c->plen + keep);
            c->prem -= (uint32_t)take;
            i += take;
            if (c->prem == 0) {
                c->pst = P_HDR;
                on_packet(g, c, c->pfirst, c->plen, c->pbody);
            }
        }
        }
    }
    return 0;
}

/* Reads what the socket has (bounded per wake-up). */
static void readable(lg *g, conn *c, uint8_t *buf)
{
    int rounds;
    for (rounds = 0; rounds < 16 && c->fd >= 0; rounds++) {
        int n;
        char err[160];
        if (c->plain) {
            n = (int)recv(c->fd, buf, READ_BUF, 0);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
        } else {
            ERR_clear_error();
            errno = 0;
            n = SSL_read(c->ssl, buf, READ_BUF);
            if (n <= 0) {
                int e = SSL_get_error(c->ssl, n);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                    return;
            }
        }
        if (n <= 0) {
            if (c->st == S_UP) {
                g->r->closed_by_peer++;
                drop(g, c, 0);
            } else {
                if (c->plain)
                    snprintf(err, sizeof err, "%s", n == 0 ? "closed by the peer" : strerror(errno));
                else
                    ssl_error_text(err, sizeof err);
                fail(g, c, &g->r->fail_mqtt, "before CONNACK", err);
            }
            return;
        }
        if (feed(g, c, buf, (size_t)n) < 0) {
            fail(g, c, &g->r->fail_mqtt, "MQTT", "malformed remaining length");
            return;
        }
        if (n < READ_BUF)
            return;
    }
}

/* ---------------------------------------------------------------- publishing */

static int build_publish(lg *g)
{
    const lg_params *p = g->p;
    char topic[64];
    uint32_t tn = (uint32_t)snprintf(topic, sizeof topic, "fpbench/%s/d", p->prefix);
    uint32_t body = 2 + tn + (p->qos ? 2 : 0) + (uint32_t)p->payload, at = 0;
    g->pkt = malloc(body + 8);
    if (g->pkt == NULL)
        return -1;
    g->pkt[at++] = (uint8_t)(0x30 | (p->qos ? 0x02 : 0));
    at += put_varint(g->pkt + at, body);
    at += put_str(g->pkt + at, topic, tn);
    g->pid_off = at;
    if (p->qos) {
        g->pkt[at++] = 0;
        g->pkt[at++] = 1;
    }
    memset(g->pkt + at, 'x', (size_t)p->payload);
    g->pkt_len = at + (uint32_t)p->payload;
    return 0;
}

/* Queues and writes this connection's due PUBLISHes. Returns 1 if it wants EPOLLOUT. */
static int pump(lg *g, conn *c, double t)
{
    const lg_params *p = g->p;
    int round;
    for (round = 0; round < 32; round++) {
        long long due, k, i;
        int w;
        if (c->olen) {
            w = flush(g, c);
            if (w < 0) {
                fail(g, c, &g->r->fail_mqtt, "PUBLISH", "write failed");
                return 0;
            }
            if (w == 0)
                return 1;
        }
        if (!g->sending || (p->duration_s > 0 && t >= g->r->t_send_start + p->duration_s))
            return 0;
        due = p->messages ? p->messages - c->sent : LLONG_MAX;
        if (p->rate > 0) {
            long long by_now = (long long)((t - g->r->t_send_start) * p->rate) + 1;
            if (by_now - c->sent < due)
                due = by_now - c->sent;
        }
        if (p->qos && LG_MAX_INFLIGHT - (c->sent - c->acked) < due)
            due = LG_MAX_INFLIGHT - (c->sent - c->acked);
        if (due <= 0)
            return 0;
        k = due < p->batch ? due : p->batch;
        for (i = 0; i < k; i++) {
            if (p->qos) {
                if (++c->pid == 0)
                    c->pid = 1;
                g->pkt[g->pid_off] = (uint8_t)(c->pid >> 8);
                g->pkt[g->pid_off + 1] = (uint8_t)c->pid;
            }
            if (queue(c, g->pkt, g->pkt_len) < 0) {
                fail(g, c, &g->r->fail_mqtt, "PUBLISH", "out of memory");
                return 0;
            }
            g->r->bytes_sent += g->pkt_len;
        }
        c->sent += k;
        c->opkts += (uint32_t)k;
    }
    return 1;
}

/* ---------------------------------------------------------------- the loop */

static void on_event(lg *g, conn *c, uint32_t ev, uint8_t *buf)
{
    if (c->fd < 0)
        return;
    switch (c->st) {
    case S_TCP:
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            tcp_connected(g, c);
        return;
    case S_TLS:
        handshake(g, c);
        return;
    case S_CONNECT:
        switch (flush(g, c)) {
        case 1:
            c->st = S_CONNACK;
            set_events(g, c, 1);
            break;
        case -1:
            fail(g, c, &g->r->fail_mqtt, "CONNECT", "write failed");
        }
        return;
    default:
        break;
    }
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
        readable(g, c, buf);
    if (c->fd < 0 || c->st != S_UP)
        return;
    if (g->p->scenario == LG_PUBLISH && c->dev != SUB_TAG && g->sending)
        set_events(g, c, pump(g, c, now_s()) ? 3 : 1);  /* room to write, or PUBACKs freed some */
    else if ((ev & EPOLLOUT) && flush(g, c) != 0)
        set_events(g, c, 1);
}

/* Timers, every SCAN: setup timeouts, reconnects, keepalive pings. */
static void scan(lg *g, double t)
{
    const lg_params *p = g->p;
    static const uint8_t ping[2] = {0xC0, 0};
    int i;
    for (i = 0; i < g->n; i++) {
        conn *c = &g->c[i];
        if (is_setup(c->st) && t - c->t0 > p->conn_timeout_s) {
            char what[48];
            snprintf(what, sizeof what, "timeout after %.0f s", p->conn_timeout_s);
            fail(g, c, &g->r->fail_timeout, c->st == S_TCP ? "TCP connect" : c->st == S_TLS ? "TLS handshake" : "CONNACK",
                 what);
        } else if (c->st == S_UP && p->keepalive_s > 0 && t >= c->t_next && c->olen == 0) {
            c->t_next = t + p->keepalive_s;
            if (queue(c, ping, 2) == 0) {
                int w = flush(g, c);
                if (w >= 0)
                    g->r->pings++;
                if (w == 0)
                    set_events(g, c, 3);    /* the rest goes out when the socket has room */
            }
        }
    }
    if (is_setup(g->sub.st) && t - g->sub.t0 > p->conn_timeout_s)
        fail(g, &g->sub, &g->r->fail_timeout, "subscriber", "no SUBACK in time");
}

/* Starts connections while the concurrency allows: devices not started yet in order, then the
 * ones waiting to reconnect whose time has come (a rotating cursor, so none starves). */
static void admit(lg *g, double t)
{
    const lg_params *p = g->p;
    int i, seen;
    if (g->stop)
        return;
    if (p->scenario == LG_HANDSHAKE) {
        for (i = 0; i < g->n && g->setting_up < p->concurrency && g->next_dev < p->conns; i++)
            if (g->c[i].st == S_FREE)
                start(g, &g->c[i], (int)g->next_dev++);
        return;
    }
    while (g->next_dev < g->n && g->setting_up < p->concurrency) {
        i = (int)g->next_dev++;
        start(g, &g->c[i], i);
    }
    for (seen = 0; g->waiting > 0 && seen < g->n && g->setting_up < p->concurrency; seen++) {
        conn *c = &g->c[g->wait_cursor];
        g->wait_cursor = (g->wait_cursor + 1) % g->n;
        if (c->st == S_WAIT && t >= c->t_next)
            start(g, c, (int)(c - g->c));
    }
}

static int all_settled(lg *g)
{
    int i;
    for (i = 0; i < g->n; i++)
        if (g->c[i].st != S_UP && g->c[i].st != S_DONE)
            return 0;
    return 1;
}

static void progress(lg *g, const char *phase)
{
    lg_result *r = g->r;
    note(g, "%s live=%d started=%lld ok=%lld failed=%lld refused=%lld closed=%lld reconnects=%lld published=%lld "
         "acked=%lld delivered=%lld",
         phase, g->live, r->started, r->connack_ok, r->failed, r->refused, r->closed_by_peer, r->reconnects,
         r->published, r->acked, r->delivered);
}

/* Phase changes of the scenario; returns 1 when the run is over. */
static int advance(lg *g, double t)
{
    const lg_params *p = g->p;
    lg_result *r = g->r;
    int i;
    if (p->scenario == LG_HANDSHAKE)
        return g->next_dev >= p->conns && g->setting_up == 0;
    if (!g->ready) {
        int settled = p->reconnect ? g->live == g->n : all_settled(g);
        if (settled && (p->scenario != LG_PUBLISH || !p->sub_port || g->sub_ready || g->sub.st == S_DONE)) {
            g->ready = 1;
            r->t_ready = t;
            progress(g, "ready");
        }
        return 0;
    }
    if (p->scenario == LG_IDLE)
        return p->duration_s > 0 && t >= r->t_ready + p->duration_s;
    /* LG_PUBLISH: a quiet moment after the set-up (a reader of "ready" samples the proxy's
     * CPU then), send, then wait for PUBACKs and deliveries to stop coming (bounded) */
    if (!g->sending && !g->drained) {
        if (t < r->t_ready + SETTLE_S)
            return 0;
        g->sending = 1;
        r->t_send_start = t;
        progress(g, "sending");
        for (i = 0; i < g->n; i++)
            if (g->c[i].st == S_UP)
                set_events(g, &g->c[i], 3);
        return 0;
    }
    if (g->sending) {
        int busy = 0;
        if (!(p->duration_s > 0 && t >= r->t_send_start + p->duration_s))
            for (i = 0; i < g->n && !busy; i++)
                if (g->c[i].st == S_UP && (g->c[i].olen || !p->messages || g->c[i].sent < p->messages))
                    busy = 1;
        if (busy)
            return 0;
        g->sending = 0;
        g->drained = 1;
        r->t_send_end = g->t_sent_all = t;
        g->t_quiet = t;
        g->last_delivered = r->delivered;
        for (i = 0; i < g->n; i++)
            if (g->c[i].st == S_UP)
                set_events(g, &g->c[i], 1);
        progress(g, "sent");
        return 0;
    }
    if (r->delivered != g->last_delivered) {
        g->last_delivered = r->delivered;
        g->t_quiet = t;
    }
    {
        int acks_done = !p->qos || r->acked >= r->published;
        int subs_done = !p->sub_port || g->sub.st != S_UP || r->delivered >= r->published || t - g->t_quiet > 1.0;
        return (acks_done && subs_done) || t - g->t_sent_all > 10.0;
    }
}

static int stop_requested(lg *g)
{
    char b[64];
    ssize_t n = read(g->p->stop_fd, b, sizeof b);
    return n >= 0 || (errno != EAGAIN && errno != EINTR);
}

int lg_run(const lg_params *p, lg_result *r, char *err, size_t errlen)
{
    lg g;
    struct epoll_event evs[MAX_EVENTS];
    uint8_t *buf = NULL;
    double t, last_scan = 0, last_note = 0;
    int i, rc = -1;

    memset(r, 0, sizeof *r);
    r->last_refusal = -1;
    memset(&g, 0, sizeof g);
    g.p = p;
    g.r = r;
    g.ep = -1;
    g.sub.fd = -1;
    g.rnd = (unsigned)getpid() ^ (unsigned)time(NULL);
    err[0] = 0;
    if (p->conns < 1 || p->conns > LG_MAX_CONNS || p->concurrency < 1 || p->payload < 0 ||
        p->payload > LG_MAX_PAYLOAD || p->batch < 1 || p->batch > LG_MAX_BATCH || p->qos < 0 || p->qos > 1 ||
        p->n_sources < 0 || p->n_sources > LG_MAX_SOURCES || p->timeout_s <= 0 || p->keepalive_s < 0 ||
        p->keepalive_s > 65535 || strlen(p->prefix) > 20) {
        snprintf(err, errlen, "loadgen: a parameter is out of range");
        return -1;
    }
    if (parse_addr(p->host, p->port, &g.dst, &g.dst_len) < 0) {
        snprintf(err, errlen, "loadgen: %s is not an IP address", p->host);
        return -1;
    }
    if (p->sub_port && parse_addr(p->sub_host, p->sub_port, &g.sub_dst, &g.sub_dst_len) < 0) {
        snprintf(err, errlen, "loadgen: %s is not an IP address", p->sub_host);
        return -1;
    }
    for (i = 0; i < p->n_sources; i++) {
        if (parse_addr(p->sources[i], 0, &g.src[i], &g.src_len[i]) < 0) {
            snprintf(err, errlen, "loadgen: source %s is not an IP address", p->sources[i]);
            return -1;
        }
    }
    g.n_src = p->n_sources;
    if (p->tls && setup_tls(&g, err, errlen) < 0)
        goto out;
    if (p->scenario == LG_PUBLISH && build_publish(&g) < 0) {
        snprintf(err, errlen, "loadgen: out of memory");
        goto out;
    }
    g.n = p->scenario == LG_HANDSHAKE ? (p->concurrency < p->conns ? p->concurrency : p->conns) : p->conns;
    g.c = calloc((size_t)g.n, sizeof(conn));
    buf = malloc(READ_BUF);
    g.ep = epoll_create1(EPOLL_CLOEXEC);
    if (g.c == NULL || buf == NULL || g.ep < 0) {
        snprintf(err, errlen, "loadgen: %s", g.ep < 0 ? strerror(errno) : "out of memory");
        goto out;
    }
    for (i = 0; i < g.n; i++) {
        g.c[i].fd = -1;
        g.c[i].st = S_FREE;
    }
    if (p->stop_fd >= 0) {
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
        if (epoll_ctl(g.ep, EPOLL_CTL_ADD, p->stop_fd, &e) < 0) {
            snprintf(err, errlen, "loadgen: stop_fd: %s", strerror(errno));
            goto out;
        }
    }
    t = r->t_start = now_s();
    g.deadline = t + p->timeout_s;
    if (p->scenario == LG_PUBLISH && p->sub_port)
        start(&g, &g.sub, SUB_TAG);
    progress(&g, "start");
    for (;;) {
        int n, wait_ms = TICK_MS;
        t = now_s();
        if (t >= g.deadline) {
            r->stopped = 3;
            break;
        }
        if (g.stop)
            break;
        if (!g.ready || p->reconnect || p->scenario == LG_HANDSHAKE)
            admit(&g, t);
        if (t - last_scan > SCAN_S_X1000 / 1000.0) {
            last_scan = t;
            scan(&g, t);
        }
        if (advance(&g, t)) {
            r->stopped = 2;
            break;
        }
        if (t - last_note > 0.5) {
            last_note = t;
            progress(&g, "progress");
        }
        if (g.sending) {
            wait_ms = p->rate > 0 ? 1 : TICK_MS;
            if (p->rate > 0)
                for (i = 0; i < g.n; i++)
                    if (g.c[i].st == S_UP && g.c[i].ev != 3)
                        set_events(&g, &g.c[i], pump(&g, &g.c[i], t) ? 3 : 1);
        }
        n = epoll_wait(g.ep, evs, MAX_EVENTS, wait_ms);
        if (n < 0 && errno != EINTR) {
            snprintf(err, errlen, "loadgen: epoll_wait: %s", strerror(errno));
            goto out;
        }
        for (i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                if (stop_requested(&g)) {
                    g.stop = 1;
                    r->stopped = 1;
                    epoll_ctl(g.ep, EPOLL_CTL_DEL, p->stop_fd, NULL);
                }
                continue;
            }
            on_event(&g, (conn *)evs[i].data.ptr, evs[i].events, buf);
        }
    }
    rc = 0;
out:
    r->t_end = now_s();
    r->live_end = g.live;
    progress(&g, "end");
    if (g.c) {
        static const uint8_t disc[2] = {0xE0, 0};
        for (i = 0; i < g.n; i++) {
            conn *c = &g.c[i];
            if (c->st == S_UP && c->olen == 0 && queue(c, disc, 2) == 0)
                flush(&g, c);
            if (c->ssl)
                SSL_free(c->ssl);
            if (c->fd >= 0)
                close(c->fd);
            free(c->out);
        }
        free(g.c);
    }
    if (g.sub.ssl)
        SSL_free(g.sub.ssl);
    if (g.sub.fd >= 0)
        close(g.sub.fd);
    free(g.sub.out);
    free(g.pkt);
    free(buf);
    if (g.ep >= 0)
        close(g.ep);
    X509_free(g.ca);
    EVP_PKEY_free(g.ca_key);
    EVP_PKEY_free(g.dev_key);
    SSL_CTX_free(g.ctx);
    return rc;
}
