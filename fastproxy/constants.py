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
MQTT_CONNECT_TIMEOUT_S = 5.0     # slowloris bound: the CONNECT must arrive within this
MAX_CONNECT_SIZE = 64 * 1024

TLS_MIN_VERSION = "TLSv1.2"
TLS_CIPHERS = "HIGH:!aNULL:!MD5"
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

LISTEN_BACKLOG = 4096
MAX_CONNECTIONS = 100_000
