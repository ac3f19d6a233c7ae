"""Tunables and defaults in one place; units are in the names.

Defaults follow the seed configurations: HAProxy's `timeout connect 5000`, `timeout client 60000`
and nginx's `ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers HIGH:!aNULL:!MD5`.
"""
UPSTREAM_CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 10.0
HEALTH_INTERVAL_S = 2.0         # HAProxy's inter default, for pools of 2+ servers
HEALTH_TIMEOUT_S = 2.0
HEALTH_CHECK_IDENTITY = "fastproxy-health"   # the CN checks claim toward v2-ssl(-cn) servers
MQTT_CONNECT_TIMEOUT_S = 5.0     # slowloris bound: the CONNECT must arrive within this
MAX_CONNECT_SIZE = 64 * 1024

TLS_MIN_VERSION = "TLSv1.2"
TLS_CIPHERS = "HIGH:!aNULL:!MD5"
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

LISTEN_BACKLOG = 4096
MAX_CONNECTIONS = 0              # auto: from the descriptor limit and memory (server.auto_max_connections)
CONNECTION_MEMORY = 64 * 1024    # bytes budgeted per busy TLS session for max_connections auto

# The Python boundary (issue 10): user code runs off the loop thread.
POLICY_THREADS = 4              # threads that run policy hooks
POLICY_TIMEOUT_S = 5.0          # a hook slower than this: CONNACK 0x88 (3.x: 0x03), reason policy-timeout
RECORD_QUEUE = 65536            # access-log records waiting for the records thread; beyond: dropped, counted

# Engine-side names of configuration choices, in the engine's code order (index = code).
PROXY_PROTOCOL_MODES = ("none", "v1", "v2", "v2-ssl", "v2-ssl-cn")     # PP_NONE .. PP_V2_SSL_CN
BALANCE_MODES = ("clientid", "round-robin", "least-conn", "source")   # BAL_*; also _engine.BALANCE_MODES

# The engine's limits (its enums in ext/fastproxy/_defs.pxd, exported as _engine.LIMITS), mirrored
# so that a configuration beyond them is a ConfigError naming the key, not a failure inside the
# engine. tests/test_lifecycle_api.py::test_engine_limits_mirror_the_engine ties each to its C value.
MAX_LISTENERS = 64              # listen addresses, summed over all listeners
MAX_UPSTREAMS = 256             # pool servers summed over all listeners, plus named upstreams
MAX_POOL = 64                   # servers per listener pool
MAX_SOURCES = 256               # upstream source addresses per listener
MAX_TRUSTED = 32                # trusted_proxies networks per listener
WS_PATH = "/mqtt"               # --websocket without a path
WS_MAX_FRAME = 1 << 20          # largest client WebSocket frame (a bigger one: close 1009)
MAX_ACL = 1024                  # allow / deny networks per listener (checked in order at accept)
PP_HEADER_MAX = 4096            # largest proxy_protocol_max_len
MIN_CONNECT_SIZE = 16           # smallest max_connect_size
PROXY_PROTOCOL_MAX_LEN = 500    # default proxy_protocol_max_len: Mosquitto 2.1 refuses longer headers
