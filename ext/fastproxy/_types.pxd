# The engine's types: per connection (Conn, its two Sides and two Dirs), per listener, per
# upstream server, and Core, the state of one loop that every stage function receives.
# Declarations only (HAProxy keeps its types apart from code the same way, in -t.h headers).
from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from system cimport sockaddr_storage, socklen_t
from openssl cimport SSL, SSL_CTX, fp_peer
from admission cimport fp_adm_entry, fp_adm_table
from ws cimport ws_decoder
from fastproxy._defs cimport *

cdef struct BufPool:
    # Free RELAY_BUF buffers shared by every connection of an engine; live counts the ones lent.
    char* bufs[BUF_POOL_MAX]
    int n
    uint64_t live

cdef struct Side:
    int fd
    SSL* ssl
    # TLS sides read the socket through our BIO: one recv fills inbuf (pooled, only while
    # it holds bytes) and OpenSSL takes its record headers and bodies from there.
    char* inbuf
    uint32_t in_off
    uint32_t in_len
    uint8_t sock_eof
    BufPool* pool
    uint8_t readable        # edge-triggered readiness we have not consumed yet
    uint8_t writable
    uint8_t hup             # epoll reported RDHUP/HUP/ERR: read until EOF, no short-read shortcut
    uint8_t eof             # read side saw EOF / close_notify
    uint8_t shut_wr         # we propagated EOF to this side

cdef struct Dir:
    # Bytes read from one side not yet written to the other: either in a pooled buffer
    # (TLS on a side) or in a pooled pipe (splice, plain on both sides). A CONNECT larger than
    # RELAY_BUF (or one rewritten, or prefixed with a PROXY header that does not fit) gets a
    # buffer of its own (own_buf), freed after use rather than pooled.
    char* buf
    uint32_t cap
    uint8_t own_buf
    uint32_t start
    uint32_t end
    int pipe_r
    int pipe_w
    uint32_t pipe_bytes
    uint8_t no_splice

cdef struct WsState:
    # A WebSocket client (malloc'd after the upgrade): its frames are decoded on read
    # (_wscodec.ws_read) and the broker's bytes framed on the way out (_relay).
    ws_decoder dec
    char* raw               # client bytes not decoded yet (pooled, only while it holds bytes)
    uint32_t raw_off
    uint32_t raw_len
    uint8_t ctrl_out[127]   # a control frame (pong) waiting for a frame boundary
    uint8_t ctrl_out_len
    uint8_t close_recv      # the client's close frame arrived: no data after it
    uint8_t close_sent
    uint8_t failed          # a protocol error ended the session (R_WS_PROTOCOL)
    # ws_passthrough: the client's request and frames are kept as they came (req, held) until
    # the CONNECT is approved; then they go to the broker, whose 101 answer is dropped, and the
    # session is relayed as raw bytes (switched).
    uint8_t passthrough
    uint8_t switched
    uint8_t await_101
    char* req
    uint32_t req_len
    char* held
    uint32_t held_len
    uint32_t held_cap

cdef struct Conn:
    Conn* prev
    Conn* next
    int state
    int listener
    int reason
    int err                 # errno of the failure that ended the session, if any
    unsigned long ssl_err   # first OpenSSL error of a failed handshake
    long verify_result
    uint8_t handshake_done
    uint8_t tls_listener    # the client side speaks TLS (its SSL object exists from its first byte)
    uint8_t ssl_fatal       # no SSL_shutdown after a fatal error
    uint8_t use_splice
    uint8_t closed
    uint8_t reported        # record given to Python and counted (before a lingering close)
    uint8_t refuse_code     # MQTT 5 reason code of a refusal decided in C, for the log
    uint8_t tls_bufs_freed  # OpenSSL's record buffers released while idle
    uint8_t mqtt_level      # protocol level of the CONNECT (3, 4, 5), 0 before it
    uint16_t keepalive
    uint16_t client_id_len
    char* client_id         # copy of the CONNECT's ClientId (malloc'd), for the access log
    char* username          # copy of the CONNECT's user name (malloc'd), for the access log
    uint16_t username_len
    const char* detail_static   # static reason of a refusal (parser), for logs
    int upstream            # index of this session's server, -1 before the choice
    uint64_t tried          # pool positions tried for this session (retry on the next one)
    uint8_t tries           # connect attempts so far
    uint8_t routed          # a policy Route() chose the server: no balancing, no retry
    uint8_t counted         # counted in upstreams[upstream].sessions
    uint16_t pp_len         # PROXY header at the front of c2u (stripped before a retry)
    uint64_t policy_token   # non-zero while a policy answer is awaited (ST_POLICY)
    int64_t idle_ms         # this session's idle timeout (keepalive-aware listeners set it)
    uint32_t connect_total  # CONNECT length once its fixed header is known, 0 before
    uint8_t has_pp_dst      # a received PROXY header named the address the client reached
    sockaddr_storage pp_dst
    fp_peer cert            # the client certificate (tls_peer.h): CN for the session, DER until the relay
    Side cl
    Side up
    Dir c2u
    Dir u2c
    uint64_t bytes_in       # from the client
    uint64_t bytes_out      # to the client
    int64_t deadline_ms     # end of the current phase (handshake, connect)
    int64_t active_ms       # last relayed byte (idle timeout)
    int64_t cl_active_ms    # last byte from the client (client_timeout)
    int64_t up_active_ms    # last byte from the broker (server_timeout)
    double t_wall
    double t_mono
    sockaddr_storage peer
    socklen_t peer_len
    fp_adm_entry* adm       # this client address's admission entry (counted in its conns)
    WsState* ws             # WebSocket clients, after the upgrade

cdef struct Cidr:
    int family
    uint8_t addr[16]
    int prefix

cdef struct Listener:
    int fd
    uint8_t in_epoll
    SSL_CTX* ssl_ctx
    int pool[MAX_POOL]              # upstream indices this listener balances over
    int n_pool
    uint8_t balance                 # BAL_*
    uint8_t equal_weights           # rendezvous by integer compare (exact on every platform)
    uint8_t retries                 # further servers tried after a failed connect
    uint32_t rr                     # rotation for least-conn ties
    int64_t wrr[MAX_POOL]           # smooth weighted round-robin state
    sockaddr_storage* src           # local source addresses for upstream connects (malloc'd)
    int n_src
    uint32_t src_next
    int64_t handshake_timeout_ms
    int64_t connect_timeout_ms      # upstream connect
    int64_t idle_timeout_ms
    int64_t client_timeout_ms       # HAProxy's timeout client / timeout server; 0: none
    int64_t server_timeout_ms
    uint8_t mqtt                    # read and check the CONNECT before connecting upstream
    uint8_t idle_keepalive          # idle timeout = 1.5 x the CONNECT's keepalive
    uint8_t policy                  # ask Python (on_connect) about each CONNECT
    unsigned identity               # built-in CN checks done in C (ID_* bits)
    int64_t mqtt_connect_timeout_ms # the CONNECT must arrive within this
    int64_t policy_timeout_ms       # the policy hook must answer within this
    uint32_t max_connect_size
    uint8_t pp_mode                 # PROXY header toward the upstream: PP_NONE .. PP_V2_SSL_CN
    uint8_t pp_crc32c
    unsigned pp_want                # extra TLVs (PP2_WANT_*: HAProxy's proxy-v2-options)
    uint32_t pp_max_len
    uint8_t accept_pp               # expect a PROXY v1/v2 header from a trusted source first
    int n_trusted
    Cidr trusted[MAX_TRUSTED]
    # Admission, before TLS (_admission): networks, then per client address and per ClientId.
    Cidr* acl                       # n_allow allowed networks, then n_deny denied ones (malloc'd)
    int n_allow
    int n_deny
    fp_adm_table* by_addr           # max_conns_per_ip / conn_rate_per_ip; NULL: none
    fp_adm_table* by_clientid       # reconnect_rate_per_clientid; NULL: none
    # WebSocket (_websocket, _wscodec): paths and origins as "\nA\nB\n" (malloc'd)
    uint8_t websocket
    char* ws_paths
    char* ws_origins                # NULL: any origin
    uint32_t ws_max_frame
    uint8_t ws_passthrough          # relay the upgrade to a WebSocket broker (still reading the CONNECT)

cdef struct Upstream:
    sockaddr_storage addr
    socklen_t addr_len
    int family
    uint64_t key            # hash of the server's address text: same ranking on every instance
    uint16_t weight
    uint8_t backup          # used only when no primary server of the pool is up
    uint8_t up              # atomic: health state, written by the checker thread
    uint8_t kill            # atomic: shutdown-sessions requested (checker thread -> loop, wake pipe)
    int8_t pp_mode          # PROXY header mode for this server, -1: the listener's
    uint32_t maxconn        # 0: unlimited
    uint32_t sessions       # live sessions (connecting or relaying)
    uint64_t total          # sessions sent to it
    uint64_t fails          # failed connects
    uint32_t consec_fails   # failed connects since the last good one (passive health)

cdef struct Counters:
    uint64_t accepted
    uint64_t active
    uint64_t closed
    uint64_t handshakes
    uint64_t bytes_from_clients
    uint64_t bytes_to_clients
    uint64_t accept_errors
    uint64_t reasons[<int>R_COUNT]
    uint64_t live_pipes
    uint64_t callback_errors    # user callbacks that raised (logged, never fatal)
    uint64_t policy_answers     # policy answers applied
    uint64_t notices[<int>N_COUNT]  # occurrences of each Notice condition

cdef struct Core

# The Python boundary, filled in by the Engine (_engine.pyx). Each takes the GIL only for the
# time it runs; none runs user code: they hand work to other threads and return.
ctypedef void (*report_fn)(Core* e, Conn* c) noexcept nogil
ctypedef int (*ask_policy_fn)(Core* e, Conn* c) noexcept nogil
ctypedef void (*forget_fn)(Core* e, Conn* c) noexcept nogil
ctypedef void (*notice_fn)(Core* e, int kind, uint64_t count) noexcept nogil

cdef struct Core:
    # One loop's state. Written by the loop thread only, except the fields marked atomic.
    int epfd
    int wake_r
    int wake_w
    Listener listeners[MAX_LISTENERS]
    int n_listeners
    Upstream upstreams[MAX_UPSTREAMS]
    int n_upstreams
    Conn* conns                  # doubly linked list of live connections
    Conn* dead                   # closed during the current batch, freed after it
    uint64_t n_conns
    uint64_t peak_conns          # most live connections since the last trim after a flood
    uint64_t max_conns
    Counters ctr
    BufPool pool
    int pipe_pool[PIPE_POOL_MAX][2]
    int n_pipes
    int64_t now
    int64_t accept_paused_until
    int64_t last_trim
    int trim_debt
    uint8_t listeners_paused
    uint8_t fatal                # the loop must stop (an error for run() to raise)
    int kill_pending             # atomic: shutdown_sessions() asked; the loop reads Upstream.kill
    void* owner                  # the Engine object (borrowed)
    report_fn report
    ask_policy_fn ask_policy
    forget_fn forget
    notice_fn notice
    int64_t notice_at[<int>N_COUNT]      # earliest time of the next report of each kind
    uint64_t notice_since[<int>N_COUNT]  # occurrences not reported yet
