# ext/src/loadgen.h: the compiled load generator of `fastproxy bench`.
cdef extern from "loadgen.h" nogil:
    enum:
        LG_HANDSHAKE
        LG_IDLE
        LG_PUBLISH
        LG_MAX_SOURCES
        LG_MAX_CONNS
        LG_MAX_PAYLOAD
        LG_MAX_BATCH
        LG_PATH_MAX

    ctypedef struct lg_params:
        int scenario
        char host[64]
        int port
        char sub_host[64]
        int sub_port
        char sources[64][48]
        int n_sources
        int tls
        char ca_file[512]
        char cert_file[512]
        char key_file[512]
        char ca_key_file[512]
        char prefix[24]
        int conns
        int concurrency
        int keepalive_s
        int qos
        int payload
        int batch
        double rate
        long long messages
        double duration_s
        double timeout_s
        double conn_timeout_s
        int reconnect
        double retry_s
        int stop_fd
        int notify_fd

    ctypedef struct lg_result:
        long long started, connack_ok, refused, failed
        long long fail_connect, fail_tls, fail_mqtt, fail_timeout
        long long closed_by_peer, reconnects
        int last_refusal
        char first_error[200]
        long long published, acked, delivered, pings, bytes_sent
        int live_end, live_max
        double t_start, t_ready, t_send_start, t_send_end, t_end
        double t_first_drop, t_all_back
        double setup_ms_sum, setup_ms_max
        long long setup_n
        int stopped

    int lg_run(const lg_params* p, lg_result* r, char* err, size_t errlen)
