# The engine's constants: limits, connection states, end reasons, modes. Declarations only
# (no module); every stage cimports them. Python mirrors (fastproxy/constants.py, REASONS in
# _engine.pyx) are tied to these by tests/test_sourcecode.py.

cdef enum:
    RELAY_BUF = 16384          # bytes per direction buffer (one TLS record of plaintext)
    PIPE_CAP = 65536           # bytes we let sit in a splice pipe (the default pipe size)
    MAX_EVENTS = 256
    MAX_LISTENERS = 64
    MAX_UPSTREAMS = 256
    MAX_POOL = 64              # servers per listener pool (a bit each in Conn.tried)
    MAX_SOURCES = 256          # local source addresses per listener
    SWEEP_MS = 250             # timeout granularity
    ACCEPT_BATCH = 64          # accepts per wakeup per listener, for fairness with relaying
    BUF_POOL_MAX = 64
    PIPE_POOL_MAX = 64
    ACCEPT_PAUSE_MS = 1000     # after EMFILE/ENFILE
    TLS_IDLE_FREE_MS = 1000    # give OpenSSL's record buffers back after this much quiet
    LINGER_MS = 2000           # how long a refused client may keep sending before we close
    HALF_CLOSED_TIMEOUT_MS = 5000   # a session with one side finished ends after this much quiet
    TRIM_AFTER_FREES = 64      # malloc_trim once this many sessions released buffers...
    TRIM_INTERVAL_MS = 5000    # ...at most this often
    TRIM_AFTER_FLOOD = 1024    # ...and once live connections fell this far below their peak
    MIN_CONNECT_SIZE = 16      # smallest max_connect_size the CONNECT reader works with

# Tags in the low bits of epoll_event.data (Conn* is 16-byte aligned by malloc).
cdef enum:
    TAG_CLIENT = 0
    TAG_UPSTREAM = 1
    TAG_LISTENER = 2
    TAG_WAKE = 3
    TAG_MASK = 7

# Connection states. Transitions (the stage that owns each in brackets):
#   accept ──accept_pp, trusted source──▶ PROXY_HEADER ──valid──▶ (TLS or plain)   [_ingress]
#   accept ──TLS──▶ (first byte) ──▶ HANDSHAKE ──done──▶ MQTT_CONNECT              [_ingress]
#   every accepted client passes admission (allow/deny, per-address limits) first [_admission]
#   accept ──plain────────────────────▶ MQTT_CONNECT  (mqtt = false: CONNECTING)
#   (TLS or plain) ──websocket listener──▶ WS_UPGRADE ──101──▶ MQTT_CONNECT (frames decoded) [_websocket]
#   MQTT_CONNECT ──valid, identity ok──▶ POLICY (listeners with a gate) ──allow──▶ CONNECTING
#                                      └──────────── no gate ────────────────────▶ CONNECTING [_identity]
#   CONNECTING ──SO_ERROR 0──▶ RELAY ──both EOFs flushed──▶ CLOSED                 [_upstream, _relay]
#   MQTT_CONNECT / POLICY ──invalid / denied / policy timeout──▶ CONNACK + FIN ──▶ LINGER ──▶ CLOSED [_conn]
#   any ──error / timeout / shutdown──▶ CLOSED (freed after the current epoll batch) [_conn]
cdef enum ConnState:
    ST_NEW = 0
    ST_HANDSHAKE = 1
    ST_CONNECTING = 2
    ST_RELAY = 3
    ST_CLOSED = 4
    ST_MQTT_CONNECT = 5
    ST_PROXY_HEADER = 6       # before TLS: a PROXY header from a trusted load balancer
    ST_LINGER = 7             # refused: CONNACK and FIN sent, discarding input until EOF
    ST_POLICY = 8             # the CONNECT waits for a policy answer from a Python thread
    ST_WS_UPGRADE = 9         # a WebSocket listener reads the HTTP upgrade request

# Why a connection ended; names and log status codes are in _engine.pyx REASONS.
cdef enum EndReason:
    R_OK = 0
    R_IDLE_TIMEOUT
    R_CLIENT_RESET
    R_UPSTREAM_RESET
    R_HANDSHAKE_FAILED
    R_HANDSHAKE_TIMEOUT
    R_DENIED
    R_INTERNAL
    R_UPSTREAM_REFUSED
    R_UPSTREAM_UNREACHABLE
    R_SHUTDOWN
    R_UPSTREAM_TIMEOUT
    R_BAD_CONNECT
    R_CONNECT_TIMEOUT
    R_NO_CONNECT
    R_BAD_PROXY_HEADER
    R_UNTRUSTED_PROXY
    R_NO_SERVER             # every server of the pool is down (or full)
    R_UPSTREAM_DOWN         # the session's server was marked down (shutdown-sessions)
    R_NO_SOURCE_PORT        # no free local port toward the server (EADDRNOTAVAIL)
    R_POLICY_TIMEOUT        # the policy hook did not answer within policy_timeout
    R_ADDRESS_DENIED        # allow / deny networks of the listener (before TLS)
    R_TOO_MANY_CONNS        # max_conns_per_ip
    R_RATE_LIMITED          # conn_rate_per_ip
    R_RECONNECT_TOO_FAST    # reconnect_rate_per_clientid (CONNACK 0x89 / 3.x 0x03)
    R_WS_BAD_REQUEST        # not a valid WebSocket upgrade request (HTTP 400)
    R_WS_NOT_FOUND          # a path the listener does not serve (HTTP 404)
    R_WS_ORIGIN             # Origin outside ws_origins (HTTP 403)
    R_WS_VERSION            # not WebSocket version 13 (HTTP 426)
    R_WS_PROTOCOL           # a frame broke RFC 6455 or ws_max_frame (closed with a status code)
    R_CLIENT_TIMEOUT        # client_timeout: the client sent nothing for that long
    R_SERVER_TIMEOUT        # server_timeout: the broker sent nothing for that long
    R_DISCONNECTED          # an operator disconnected the session (admin endpoint, top, the API)
    R_COUNT

# Conditions worth a warning, reported to Python (Core.notice) at most once per NOTICE_MS per
# kind, with how often they happened since the last report (fastproxy.server words them).
cdef enum Notice:
    N_FD_EXHAUSTED = 0      # accept failed: no descriptor (EMFILE/ENFILE) or memory
    N_CONN_CAP              # max_connections reached: accepting paused
    N_ADDRESS_DENIED
    N_TOO_MANY_CONNS
    N_RATE_LIMITED
    N_RECONNECT_TOO_FAST
    N_ADMISSION_FULL        # admission table full: admitted without per-address accounting
    N_COUNT

cdef enum:
    NOTICE_MS = 10000

# How a listener's pool chooses a server (fastproxy.constants.BALANCE_MODES, same order).
cdef enum:
    BAL_CLIENTID = 0        # weighted rendezvous hash of the ClientId (empty ClientId: least-conn)
    BAL_ROUND_ROBIN = 1     # smooth weighted round-robin (nginx's)
    BAL_LEAST_CONN = 2      # fewest sessions per weight
    BAL_SOURCE = 3          # weighted rendezvous hash of the client address

# PROXY protocol header sent to the upstream (HAProxy's send-proxy, -v2, -v2-ssl, -v2-ssl-cn;
# fastproxy.constants.PROXY_PROTOCOL_MODES, same order).
cdef enum:
    PP_NONE = 0
    PP_V1 = 1
    PP_V2 = 2
    PP_V2_SSL = 3
    PP_V2_SSL_CN = 4
    PP_HEADER_MAX = 4096
    MAX_TRUSTED = 32               # trusted source networks per listener

# Built-in identity checks (require_clientid_cn, require_username_cn), done in C.
cdef enum:
    ID_CLIENTID_CN = 1
    ID_USERNAME_CN = 2

# Results of one read or write on a side.
cdef enum:
    IO_AGAIN = -1
    IO_EOF = -2
    IO_ERR = -3

# What a stage step did with the connection it was given.
cdef enum:
    STEP_WAIT = 0           # waits for an event (readiness, a timer, an answer)
    STEP_ENDED = -1         # ended or refused: the connection must not be touched further
