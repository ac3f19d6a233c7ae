"""Configuration: the typed model, TOML loading and validation.

Flags and file keys map one to one: `--tls-cert` is `tls_cert`. A file holds either one
listener described by top-level keys (exactly what the flags describe) or several
`[[listener]]` tables; top-level listener keys are then defaults for every table.
Every error names the file (or "command line"), the key path and the problem.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Any, Mapping

from . import constants as C
from .errors import ConfigError
from .log import parse_log_format, parse_syslog_target
from .templates import TEMPLATE_FIELDS, template_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CLI_SOURCE = "command line"
# One home for these is constants.py; the names stay importable from here.
PROXY_PROTOCOL_MODES = C.PROXY_PROTOCOL_MODES
BALANCE_MODES = C.BALANCE_MODES
MAX_POOL = C.MAX_POOL
MAX_SOURCES = C.MAX_SOURCES
# HAProxy's proxy-v2-options -> the engine's PP2_WANT_* bits (crc32c has its own switch).
PROXY_PROTOCOL_OPTIONS = {"crc32c": 0, "authority": 0x02, "cert-key": 0x10, "cert-sig": 0x20, "ssl-cipher": 0x40}


@dataclass(frozen=True)
class Address:
    """A TCP endpoint (host is an IP literal after resolution) or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def family(self) -> int:
        import socket

        if self.path is not None:
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def is_loopback(self) -> bool:
        if self.path is not None:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    """One broker of a listener's pool (HAProxy's `server` line)."""

    address: Address
    weight: int = 1                     # share of the ClientIds / connections, 1-256
    backup: bool = False                # used only when no other server is up
    max_connections: int = 0            # HAProxy's maxconn; 0: no limit
    proxy_protocol: str | None = None   # this server's PROXY header mode; None: the listener's

    def __str__(self) -> str:
        return str(self.address)


@dataclass(frozen=True)
class ListenerConfig:
    """One listening address set with its TLS settings and upstream."""

    listen: tuple[Address, ...]
    upstream: Address
    name: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_min_version: str = C.TLS_MIN_VERSION
    tls_ciphers: str = C.TLS_CIPHERS
    tls_ciphersuites: str | None = None
    tls_session_tickets: bool = True     # False: HAProxy's no-tls-tickets (no resumption)
    client_ca: str | None = None
    verify: str = "none"
    verify_depth: int = 1
    crl: str | None = None
    upstream_connect_timeout: float = C.UPSTREAM_CONNECT_TIMEOUT_S
    handshake_timeout: float = C.HANDSHAKE_TIMEOUT_S
    idle_timeout: float = C.IDLE_TIMEOUT_S
    idle_keepalive: bool = False        # idle_timeout = "keepalive": 1.5 x each CONNECT's keepalive
    client_timeout: float = 0.0         # HAProxy's timeout client: nothing from the client this long; 0: none
    server_timeout: float = 0.0         # HAProxy's timeout server: nothing from the broker this long; 0: none
    backlog: int = C.LISTEN_BACKLOG
    # MQTT awareness: the CONNECT is read and checked before the upstream is connected.
    mqtt: bool = True
    connect_timeout: float = C.MQTT_CONNECT_TIMEOUT_S
    max_connect_size: int = C.MAX_CONNECT_SIZE
    require_clientid_cn: bool = False
    require_username_cn: bool = False
    clientid_template: str | None = None
    clientid_from_cn: bool = False
    policy: str | None = None
    # PROXY protocol toward the upstream (HAProxy's send-proxy / -v2 / -v2-ssl / -v2-ssl-cn)
    proxy_protocol: str = "none"
    proxy_protocol_crc32c: bool = False
    proxy_protocol_options: tuple[str, ...] = ()   # HAProxy's proxy-v2-options names
    proxy_protocol_max_len: int = C.PROXY_PROTOCOL_MAX_LEN
    # PROXY protocol from an outer load balancer (HAProxy's accept-proxy)
    accept_proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ()
    # Upstream pool: `upstream` is the first server; `servers` all of them (with options).
    servers: tuple[ServerConfig, ...] = ()
    balance: str = "clientid"
    retries: int = 3                    # further servers tried when a connect fails
    upstream_source: tuple[str, ...] = ()   # local addresses for upstream connects, round-robin
    health_interval: float = 0.0        # seconds between checks of each server; 0: no checks
    health_timeout: float = C.HEALTH_TIMEOUT_S
    health_rise: int = 2
    health_fall: int = 3
    health_check: str = "mqtt"          # mqtt (CONNECT -> CONNACK) or tcp (connect only); tcp with mqtt off
    health_check_identity: str = C.HEALTH_CHECK_IDENTITY  # CN in the SSL TLV of checks to v2-ssl(-cn)
    # Admission (before TLS; the ClientId rate after the CONNECT and its identity rules)
    allow: tuple[str, ...] = ()          # only clients from these networks (empty: all)
    deny: tuple[str, ...] = ()           # never clients from these networks
    max_conns_per_ip: int = 0            # live connections per client address (IPv6: per /64); 0: no limit
    conn_rate_per_ip: tuple[float, float] | None = None           # (new connections per second, burst)
    reconnect_rate_per_clientid: tuple[float, float] | None = None  # (CONNECTs per second, burst)
    # MQTT over WebSocket (RFC 6455): the listener's paths; empty: not a WebSocket listener
    websocket: tuple[str, ...] = ()
    ws_passthrough: bool = False         # relay the upgrade to a broker that speaks WebSocket
    ws_origins: tuple[str, ...] = ()     # allowed Origin values (empty: any)
    ws_max_frame: int = C.WS_MAX_FRAME   # larger client frames: close 1009
    health_proxy_command: str = "proxy"  # PROXY header of checks to PROXY servers: proxy or local
    on_marked_down: str = "none"        # or shutdown-sessions
    access_log: str | None = None       # this listener's access log ("off": none); None: the top-level one
    log_format: str | None = None       # this listener's log_format; None: the top-level one

    @property
    def balance_mode(self) -> int:
        """The engine's code for balance."""
        return C.BALANCE_MODES.index(self.balance)

    @property
    def proxy_protocol_want(self) -> int:
        bits = 0
        for o in self.proxy_protocol_options:
            bits |= PROXY_PROTOCOL_OPTIONS[o]
        return bits

    @property
    def proxy_protocol_mode(self) -> int:
        """The engine's code for proxy_protocol."""
        return C.PROXY_PROTOCOL_MODES.index(self.proxy_protocol)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class Config:
    """The whole process: listeners plus process-wide settings."""

    listeners: tuple[ListenerConfig, ...]
    workers: int = 1
    drain_timeout: float = C.DRAIN_TIMEOUT_S
    access_log: str | None = "-"                 # file, "-" (stdout), "stderr", "syslog:...", None: off
    log_format: str = "default"                  # a name in log.LOG_FORMATS or a $variable template
    error_log: str = "-"
    log_level: str = "info"
    max_connections: int = C.MAX_CONNECTIONS     # 0: auto (descriptor limit and memory)
    policy_threads: int = C.POLICY_THREADS       # threads that run policy hooks
    policy_timeout: float = C.POLICY_TIMEOUT_S   # a hook slower than this refuses the client
    record_queue: int = C.RECORD_QUEUE           # bound of the engine -> records-thread queue
    upstreams: tuple[tuple[str, Address], ...] = ()   # named upstreams, for policy routing
    admin: Address | None = None        # loopback address of the JSON status endpoint
    pid_file: str | None = None         # the (master) process's pid, for `fastproxy reload`
    watch_certs: bool = False           # reload when certificate / key / CA / CRL files change
    user: str | None = None             # run as this user once the ports are bound (needs root)
    group: str | None = None            # ... and this group (default: the user's)
    source: str = CLI_SOURCE

    def with_overrides(self, **kw: Any) -> "Config":
        return replace(self, **kw)


# ----------------------------------------------------------------------------- schema
# key -> (kind, scope). kind drives parsing; scope is "listener" or "global".
_LISTENER_KEYS: dict[str, str] = {
    "name": "str",
    "listen": "addresses",
    "upstream": "servers",
    "tls_cert": "file",
    "tls_key": "file",
    "tls_min_version": "tls_version",
    "tls_ciphers": "str",
    "tls_ciphersuites": "str",
    "client_ca": "path",
    "verify": "verify",
    "verify_depth": "count",
    "crl": "file",
    "upstream_connect_timeout": "duration",
    "handshake_timeout": "duration",
    "idle_timeout": "idle",
    "client_timeout": "duration",
    "server_timeout": "duration",
    "tls_session_tickets": "bool",
    "backlog": "posint",
    "mqtt": "bool",
    "connect_timeout": "duration",
    "max_connect_size": "size",
    "require_clientid_cn": "bool",
    "require_username_cn": "bool",
    "clientid_template": "template",
    "clientid_from_cn": "bool",
    "policy": "hook",
    "proxy_protocol": "pp_mode",
    "proxy_protocol_crc32c": "bool",
    "proxy_protocol_options": "pp_options",
    "proxy_protocol_max_len": "posint",
    "accept_proxy_protocol": "bool",
    "trusted_proxies": "cidrs",
    "balance": "balance",
    "retries": "count",
    "upstream_source": "sources",
    "health_interval": "duration",
    "health_timeout": "duration",
    "health_rise": "posint",
    "health_fall": "posint",
    "health_check": "health_check",
    "health_check_identity": "check_identity",
    "health_proxy_command": "pp_command",
    "on_marked_down": "marked_down",
    "allow": "cidrs",
    "deny": "cidrs",
    "max_conns_per_ip": "limit",
    "conn_rate_per_ip": "rate",
    "reconnect_rate_per_clientid": "rate",
    "websocket": "ws_paths",
    "ws_passthrough": "bool",
    "ws_origins": "ws_origins",
    "ws_max_frame": "size",
    # Also top-level keys (below): at the top they set every listener's default.
    "access_log": "access_target",
    "log_format": "log_format",
}
_GLOBAL_KEYS: dict[str, str] = {
    "workers": "workers",
    "drain_timeout": "duration",
    "access_log": "access_target",
    "log_format": "log_format",
    "error_log": "log_target",
    "log_level": "log_level",
    "max_connections": "max_conns",
    "policy_threads": "posint",
    "policy_timeout": "duration",
    "record_queue": "posint",
    "upstreams": "named_addresses",
    "admin": "admin",
    "user": "user",
    "group": "group",
    "pid_file": "pid_file",
    "watch_certs": "bool",
}
ALL_KEYS = {**_LISTENER_KEYS, **_GLOBAL_KEYS}


def flag_for(key: str) -> str:
    return "--" + key.replace("_", "-")


class _Ctx:
    """Where values come from, so every message can say so."""

    def __init__(self, source: str, prefix: str = "") -> None:
        self.source = source
        self.prefix = prefix

    def key(self, key: str) -> str:
        if self.source == CLI_SOURCE:
            return flag_for(key)
        return f"{self.prefix}{key}"

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(problem, source=self.source, key=self.key(key))

    def sub(self, prefix: str) -> "_Ctx":
        return _Ctx(self.source, prefix)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as '500ms', '5s', '2m'. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5, '5s' or '500ms'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            scale = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
            return float(m.group(1)) * scale
    raise ValueError(f"expected a duration such as 5, '5s' or '500ms', got {value!r}")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|k|K|KB|M|MB)?\s*$")


def parse_size(value: Any) -> int:
    """Bytes from an integer or '64KiB', '1MiB'. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 65536 or '64KiB', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = m.group(2) or "B"
        n = int(m.group(1)) * {"B": 1, "KiB": 1024, "k": 1024, "K": 1024, "KB": 1024,
                               "MiB": 1 << 20, "M": 1 << 20, "MB": 1 << 20}[unit]
    else:
        raise ValueError(f"expected a size such as 65536 or '64KiB', got {value!r}")
    if not (C.MIN_CONNECT_SIZE <= n <= 1 << 28):
        raise ValueError(f"size {n} is out of range {C.MIN_CONNECT_SIZE} bytes - 256 MiB")
    return n


def parse_address(value: Any, *, listen: bool = False) -> Address:
    """'host:port', '[v6]:port', ':port' (listen only) or 'unix:/path'. Raises ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected an address such as 127.0.0.1:1883, got {value!r}")
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/run/mosquitto.sock")
        if listen:
            raise ValueError("listening on a unix socket is not supported; use host:port")
        return Address(path=path)
    if value.startswith("["):
        host, sep, port_s = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ValueError(f"missing port in {value!r} (expected host:port)")
        if ":" in host:
            raise ValueError(f"write IPv6 addresses in brackets: [{host}]:{port_s}")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port {port_s!r} is not a number") from None
    if not (0 < port < 65536) and not (listen and port == 0):
        raise ValueError(f"port {port} is out of range 1-65535")
    if host in ("", "*"):
        if not listen:
            raise ValueError(f"missing host in {value!r}")
        host = "0.0.0.0"
    host = _resolve(host)
    return Address(host=host, port=port)


def _resolve(host: str) -> str:
    """An IP literal for host; names are resolved once, at configuration time."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    import socket

    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e.strerror}") from None
    # Prefer IPv4 like most resolvers' defaults for a server's upstream.
    infos.sort(key=lambda i: 0 if i[0] == socket.AF_INET else 1)
    return str(infos[0][4][0])


_SERVER_OPTIONS = ("weight", "backup", "max_connections", "maxconn", "proxy_protocol")


def parse_server(value: Any) -> ServerConfig:
    """A pool server: 'host:port' with optional HAProxy-like options after it, separated by
    commas or spaces ('10.0.0.12:1883,weight=2,backup,maxconn=5000,proxy-protocol=v2'), or a
    table {address = ..., weight = 2, backup = true, max_connections = 5000, proxy_protocol = "v2"}.
    Raises ValueError."""
    if isinstance(value, dict):
        opts = dict(value)
        if "address" not in opts:
            raise ValueError("a server table needs address = \"host:port\"")
        addr = opts.pop("address")
    elif isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
        if not parts:
            raise ValueError("empty server address")
        addr, opts = parts[0], {}
        for p in parts[1:]:
            k, sep, v = p.partition("=")
            opts[k.replace("-", "_")] = v if sep else True
    else:
        raise ValueError(f"expected an address such as 127.0.0.1:1883, got {value!r}")
    vals: dict[str, Any] = {"address": parse_address(addr)}
    for k, v in opts.items():
        k = k.replace("-", "_")
        if k not in _SERVER_OPTIONS:
            hint = difflib.get_close_matches(k, _SERVER_OPTIONS, n=1)
            raise ValueError(f"unknown server option {k!r} for {addr}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        if k == "weight":
            if isinstance(v, str) and v.isdigit():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int) or not (1 <= v <= 256):
                raise ValueError(f"{addr}: weight must be 1-256, got {v!r}")
            vals["weight"] = v
        elif k == "backup":
            if isinstance(v, str):
                v = v.lower() in ("on", "yes", "true", "1")
            if not isinstance(v, bool):
                raise ValueError(f"{addr}: backup must be true or false")
            vals["backup"] = v
        elif k in ("max_connections", "maxconn"):
            if isinstance(v, str) and v.isdigit():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{addr}: max_connections must be a number >= 0, got {v!r}")
            vals["max_connections"] = v
        else:
            if v not in C.PROXY_PROTOCOL_MODES:
                raise ValueError(f"{addr}: proxy_protocol must be one of {', '.join(C.PROXY_PROTOCOL_MODES)}, got {v!r}")
            vals["proxy_protocol"] = v
    return ServerConfig(**vals)


def parse_admin_address(value: Any) -> Address:
    """The admin endpoint's address, for the server and for `fastproxy status`: 'host:port',
    '[v6]:port', or a port alone ('8404', ':8404') on 127.0.0.1. Loopback only: the endpoint
    has no authentication. Raises ValueError."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if isinstance(text, str) and text.lstrip(":").isdigit() and text.count(":") <= 1:
        text = f"127.0.0.1:{text.lstrip(':')}"
    a = parse_address(text)
    if a.is_unix or not a.is_loopback:
        raise ValueError(f"{a} is not a loopback address: the admin endpoint has no authentication, "
                         "so it listens on 127.0.0.1 or ::1 only")
    return a


def parse_sources(value: Any) -> tuple[str, ...]:
    """Source addresses: a list, a comma-separated string, and/or ranges 'a-b' of IPv4 or
    IPv6 addresses ('127.0.0.2-127.0.0.17'). Raises ValueError."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected addresses such as '127.0.0.2-127.0.0.17', got {item!r}")
        for part in [p.strip() for p in item.split(",") if p.strip()]:
            lo_s, sep, hi_s = part.partition("-")
            try:
                lo = ipaddress.ip_address(lo_s.strip())
                hi = ipaddress.ip_address(hi_s.strip()) if sep else lo
            except ValueError:
                raise ValueError(f"{part!r} is not an address or a range of addresses (a-b)") from None
            if lo.version != hi.version or int(hi) < int(lo):
                raise ValueError(f"bad range {part!r}: expected low-high of one address family")
            if int(hi) - int(lo) + 1 > C.MAX_SOURCES:
                raise ValueError(f"range {part!r} holds more than {C.MAX_SOURCES} addresses")
            out += [str(type(lo)(n)) for n in range(int(lo), int(hi) + 1)]   # ip_address(1) would be v4
    if not out:
        raise ValueError("needs at least one address")
    if len(out) > C.MAX_SOURCES:
        raise ValueError(f"at most {C.MAX_SOURCES} source addresses")
    if len(set(out)) != len(out):
        raise ValueError("an address is listed twice")
    return tuple(out)


def parse_rate(value: Any) -> tuple[float, float]:
    """A token bucket: "R" (R per second, a burst of max(1, R)) or "R/BURST", or a number."""
    text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    rate_s, _, burst_s = text.partition("/")
    try:
        rate = float(rate_s)
        burst = float(burst_s) if burst_s else max(1.0, rate)
    except ValueError:
        raise ValueError(f"expected a rate per second such as 20 or 0.5/3 (rate/burst), got {value!r}") from None
    if not (0 < rate <= 1e6) or not (1 <= burst <= 1e6):
        raise ValueError(f"rate must be > 0 and burst >= 1, got {value!r}")
    return (rate, burst)


def _path(value: Any, base_dir: str, what: str) -> str:
    """A path from the configuration; relative ones are relative to the file that holds them."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected {what}, got {value!r}")
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))


def key_path(cfg_source: str, n_listeners: int, index: int, key: str) -> str:
    """How messages name a listener key: the flag on the command line, `listener[i].key` in a
    file with several listeners, `key` otherwise."""
    if cfg_source == CLI_SOURCE:
        return flag_for(key)
    return f"listener[{index}].{key}" if n_listeners > 1 else key


def _parse_value(ctx: _Ctx, key: str, kind: str, value: Any, base_dir: str) -> Any:
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
        if kind == "duration":
            return parse_duration(value)
        if kind == "count":
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value <= 100):
                raise ValueError(f"expected a number 0-100, got {value!r}")
            return value
        if kind == "posint":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                if isinstance(value, str) and value.isdigit() and int(value) > 0:
                    return int(value)
                raise ValueError(f"expected a positive integer, got {value!r}")
            return value
        if kind == "address":
            return parse_address(value)
        if kind == "servers":
            items = value if isinstance(value, list) else [value]
            if not items:
                raise ValueError("needs at least one server")
            if len(items) > C.MAX_POOL:
                raise ValueError(f"at most {C.MAX_POOL} servers per listener")
            servers = tuple(parse_server(v) for v in items)
            seen = set()
            for sv in servers:
                if sv.address in seen:
                    raise ValueError(f"server {sv.address} is listed twice")
                seen.add(sv.address)
            return servers
        if kind == "sources":
            return parse_sources(value)
        if kind in ("balance", "health_check", "pp_command", "marked_down"):
            choices = {"balance": C.BALANCE_MODES, "health_check": ("mqtt", "tcp"),
                       "pp_command": ("proxy", "local"), "marked_down": ("none", "shutdown-sessions")}[kind]
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
            return value
        if kind == "pid_file":
            path = _path(value, base_dir, "a file path")
            if not os.path.isdir(os.path.dirname(path) or "."):
                raise ValueError(f"directory of {path} does not exist")
            return path
        if kind in ("user", "group"):
            import grp
            import pwd

            if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
                raise ValueError(f"expected a {kind} name or number, got {value!r}")
            try:
                if kind == "user":
                    pw = pwd.getpwuid(int(value)) if isinstance(value, int) or value.isdigit() else pwd.getpwnam(value)
                    return pw.pw_name
                gr = grp.getgrgid(int(value)) if isinstance(value, int) or value.isdigit() else grp.getgrnam(value)
                return gr.gr_name
            except (KeyError, ValueError, OverflowError):
                raise ValueError(f"no such {kind} on this system: {value!r}") from None
        if kind in ("ws_paths", "ws_origins"):
            if value is True and kind == "ws_paths":
                value = [C.WS_PATH]
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, str) for i in items):
                raise ValueError("expected paths such as ['/mqtt']" if kind == "ws_paths"
                                 else "expected origins such as ['https://app.example.com']")
            out = []
            for i in (x.strip() for x in items):
                if not i or len(i) > 510 or not all(0x21 <= ord(ch) < 0x7f for ch in i) or (
                        kind == "ws_paths" and (not i.startswith("/") or "?" in i)) or (
                        kind == "ws_origins" and "://" not in i):
                    raise ValueError(f"{i!r} is not a path such as /mqtt" if kind == "ws_paths"
                                     else f"{i!r} is not an origin such as https://app.example.com")
                out.append(i if kind == "ws_paths" else i.lower().rstrip("/"))
            return tuple(dict.fromkeys(out))
        if kind == "max_conns":
            if value == "auto":
                return 0
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"expected a positive integer or 'auto', got {value!r}")
            return value
        if kind == "limit":
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value <= 1 << 30):
                raise ValueError(f"expected a number >= 0 (0: no limit), got {value!r}")
            return value
        if kind == "rate":
            return parse_rate(value)
        if kind == "check_identity":
            # Becomes a user name at the broker (use_identity_as_username): what a CN may be,
            # and nothing the broker would refuse as malformed (controls, non-characters).
            if not isinstance(value, str) or not value or len(value.encode()) > 64 \
                    or not all(ch.isprintable() for ch in value):
                raise ValueError(f"expected a certificate CN (1-64 bytes of printable text), got {value!r}")
            return value
        if kind == "admin":
            return parse_admin_address(value)
        if kind == "addresses":
            items = value if isinstance(value, list) else [value]
            if not items:
                raise ValueError("needs at least one address")
            return tuple(parse_address(v, listen=True) for v in items)
        if kind == "file":
            path = _path(value, base_dir, "a file path")
            if not os.path.exists(path):
                raise ValueError(f"file not found: {path}")
            if not os.path.isfile(path):
                raise ValueError(f"not a regular file: {path}")
            if not os.access(path, os.R_OK):
                raise ValueError(f"file not readable: {path}")
            return path
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("on", "yes", "true", "1", "off", "no", "false", "0"):
                return value.lower() in ("on", "yes", "true", "1")
            raise ValueError(f"expected true or false, got {value!r}")
        if kind == "idle":
            if value == "keepalive":
                return value
            return parse_duration(value)
        if kind == "size":
            return parse_size(value)
        if kind == "template":
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a template such as '{{cn}}', got {value!r}")
            try:
                used = template_fields(value)
            except ValueError as e:
                raise ValueError(f"bad template {value!r}: {e}") from None
            bad = [f for f in used if f not in TEMPLATE_FIELDS]
            if bad or not used:
                raise ValueError(f"template fields must be among {{{'}, {'.join(TEMPLATE_FIELDS)}}}, got {value!r}")
            return value
        if kind == "pp_mode":
            if value not in C.PROXY_PROTOCOL_MODES:
                raise ValueError(f"expected one of {', '.join(C.PROXY_PROTOCOL_MODES)}, got {value!r}")
            return value
        if kind == "pp_options":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
                raise ValueError("expected a list such as ['authority', 'ssl-cipher']")
            items = [i.strip() for i in items if i.strip()]
            bad = [i for i in items if i not in PROXY_PROTOCOL_OPTIONS]
            if bad:
                raise ValueError(f"unknown option {bad[0]!r}; expected some of {', '.join(PROXY_PROTOCOL_OPTIONS)}")
            return tuple(items)
        if kind == "cidrs":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not items:
                raise ValueError("expected networks such as ['10.0.0.0/8', '127.0.0.1']")
            nets = []
            for i in items:
                try:
                    nets.append(str(ipaddress.ip_network(str(i).strip(), strict=False)))
                except ValueError:
                    raise ValueError(f"{i!r} is not an address or network (CIDR)") from None
            return tuple(nets)
        if kind == "hook":
            if not isinstance(value, str) or value.count(":") != 1 or value.startswith(":") or value.endswith(":"):
                raise ValueError(f"expected module:function, got {value!r}")
            return value
        if kind == "named_addresses":
            if not isinstance(value, dict):
                raise ValueError("expected a table of name = \"host:port\"")
            out = []
            for name, addr in value.items():
                try:
                    out.append((name, parse_address(addr)))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
            return tuple(out)
        if kind == "path":
            path = _path(value, base_dir, "a file or directory path")
            if not os.path.exists(path):
                raise ValueError(f"not found: {path}")
            return path
        if kind == "verify":
            if value not in ("required", "optional", "none"):
                raise ValueError(f"expected required, optional or none, got {value!r}")
            return value
        if kind == "tls_version":
            if value not in C.TLS_VERSIONS:
                raise ValueError(f"expected one of {', '.join(C.TLS_VERSIONS)}, got {value!r}")
            return value
        if kind == "workers":
            if value == "auto":
                return os.cpu_count() or 1
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= 256):
                raise ValueError(f"expected a number of processes 1-256 or 'auto', got {value!r}")
            return value
        if kind == "log_format":
            parse_log_format(value)     # ValueError names an unknown $variable
            return value
        if kind == "access_target":
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a file path, '-' (stdout), 'off', syslog:unix:/dev/log or "
                                 f"syslog:udp:HOST:PORT, got {value!r}")
            if value.startswith("syslog:"):
                return parse_syslog_target(value)
            kind = "log_target"
        if kind == "log_target":
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a file path, '-' (stderr/stdout) or 'off', got {value!r}")
            if value in ("-", "off", "stderr", "stdout"):
                return value
            path = _path(value, base_dir, "a file path")
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise ValueError(f"directory does not exist: {parent}")
            return path
        if kind == "log_level":
            if value not in ("debug", "info", "warning", "error"):
                raise ValueError(f"expected debug, info, warning or error, got {value!r}")
            return value
    except ValueError as e:
        raise ctx.error(key, str(e)) from None
    raise AssertionError(kind)  # pragma: no cover


def _check_known(ctx: _Ctx, table: Mapping[str, Any], allowed: Mapping[str, str]) -> None:
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, list(allowed), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            if key in ALL_KEYS:
                extra = " here (it is a top-level setting)"
            raise ctx.error(key, f"unknown key{extra}")


def _build_listener(ctx: _Ctx, raw: Mapping[str, Any], base_dir: str, index: int) -> ListenerConfig:
    vals: dict[str, Any] = {}
    for key, value in raw.items():
        vals[key] = _parse_value(ctx, key, _LISTENER_KEYS[key], value, base_dir)
    for required in ("listen", "upstream"):
        if required not in vals:
            raise ctx.error(required, "is required")
    cert, tls_key = vals.get("tls_cert"), vals.get("tls_key")
    if cert and not tls_key:
        raise ctx.error("tls_key", "is required when tls_cert is set")
    if tls_key and not cert:
        raise ctx.error("tls_cert", "is required when tls_key is set")
    if not cert:
        for k in ("tls_min_version", "tls_ciphers", "tls_ciphersuites", "client_ca", "verify", "crl",
                  "tls_session_tickets"):
            if k in vals:
                raise ctx.error(k, "needs TLS on the listener (tls_cert and tls_key)")
    # A client CA without an explicit verify mode means the user wants mutual TLS.
    if vals.get("client_ca") and "verify" not in vals:
        vals["verify"] = "required"
    if vals.get("verify", "none") != "none" and not vals.get("client_ca"):
        raise ctx.error("client_ca", f"is required with verify = {vals['verify']}")
    if vals.get("crl") and not vals.get("client_ca"):
        raise ctx.error("crl", "needs client_ca")
    if vals.get("idle_timeout") == "keepalive":
        vals["idle_keepalive"] = True
        vals["idle_timeout"] = C.IDLE_TIMEOUT_S
    identity_checks = [k for k in ("require_clientid_cn", "require_username_cn", "clientid_template", "clientid_from_cn")
                       if vals.get(k)]
    for k in (identity_checks + ["policy"] * bool(vals.get("policy")) + ["idle_timeout"] * bool(vals.get("idle_keepalive"))
              + ["reconnect_rate_per_clientid"] * bool(vals.get("reconnect_rate_per_clientid"))):
        if vals.get("mqtt") is False:
            raise ctx.error(k, "needs MQTT awareness, but mqtt = false")
    for k in identity_checks:
        if not vals.get("client_ca"):
            raise ctx.error(k, "needs client certificates (client_ca, with TLS on the listener)")
    if not (16 <= vals.get("proxy_protocol_max_len", C.PROXY_PROTOCOL_MAX_LEN) <= C.PP_HEADER_MAX):
        raise ctx.error("proxy_protocol_max_len", f"must be between 16 and {C.PP_HEADER_MAX} bytes")
    ws_keys = [k for k in ("ws_passthrough", "ws_origins", "ws_max_frame") if k in vals]
    if ws_keys and not vals.get("websocket"):
        raise ctx.error(ws_keys[0], "needs a WebSocket listener (websocket = [\"/mqtt\"])")
    if vals.get("ws_passthrough") and vals.get("clientid_from_cn"):
        raise ctx.error("clientid_from_cn", "cannot rewrite the CONNECT inside passthrough WebSocket frames "
                        "(ws_passthrough)")
    for k in ("allow", "deny"):
        if len(vals.get(k, ())) > C.MAX_ACL:
            raise ctx.error(k, f"at most {C.MAX_ACL} networks")
    if len(vals.get("trusted_proxies", ())) > C.MAX_TRUSTED:
        raise ctx.error("trusted_proxies", f"at most {C.MAX_TRUSTED} networks")
    if vals.get("accept_proxy_protocol") and not vals.get("trusted_proxies"):
        raise ctx.error("trusted_proxies", "is required with accept_proxy_protocol (the load balancers' addresses)")
    if vals.get("trusted_proxies") and not (vals.get("accept_proxy_protocol") or vals.get("websocket")):
        raise ctx.error("trusted_proxies", "has no effect without accept_proxy_protocol or websocket "
                        "(X-Forwarded-For)")
    if "crc32c" in vals.get("proxy_protocol_options", ()):
        vals["proxy_protocol_crc32c"] = True
    pp_keys = [k for k in ("proxy_protocol_crc32c", "proxy_protocol_options") if vals.get(k)]
    if pp_keys and vals.get("proxy_protocol", "none") in ("none", "v1"):
        raise ctx.error(pp_keys[0], "needs proxy_protocol v2, v2-ssl or v2-ssl-cn")
    _pool_settings(ctx, vals)
    vals.setdefault("name", f"listener{index}")
    return ListenerConfig(**vals)


def _pool_settings(ctx: _Ctx, vals: dict[str, Any]) -> None:
    """Defaults and cross-checks of the upstream pool keys (vals holds parsed values)."""
    servers: tuple[ServerConfig, ...] = vals["upstream"]
    vals["servers"] = servers
    vals["upstream"] = servers[0].address
    mqtt = vals.get("mqtt", True)
    if "balance" not in vals:
        # Sticky by ClientId where the CONNECT is read; otherwise the fairest blind choice.
        vals["balance"] = "clientid" if mqtt else "round-robin"
    elif vals["balance"] == "clientid" and not mqtt:
        raise ctx.error("balance", "clientid needs MQTT awareness, but mqtt = false (use source or round-robin)")
    if "health_check" not in vals and (not mqtt or vals.get("ws_passthrough")):
        # Without MQTT awareness the broker may not speak plain MQTT (a TLS or WebSocket
        # listener behind a blind relay), nor with ws_passthrough: an MQTT check would take a
        # healthy pool down.
        vals["health_check"] = "tcp"
    if "health_interval" not in vals and len(servers) > 1:
        vals["health_interval"] = C.HEALTH_INTERVAL_S   # a pool is checked unless told otherwise
    if vals.get("on_marked_down", "none") != "none" and not vals.get("health_interval"):
        raise ctx.error("on_marked_down", "needs health checks (health_interval > 0)")
    if 0 < vals.get("health_interval", 0) < 0.05:
        raise ctx.error("health_interval", "must be 0 (no checks) or at least 50ms")
    if vals.get("health_timeout", 1.0) <= 0:
        raise ctx.error("health_timeout", "must be greater than 0")
    sources = vals.get("upstream_source", ())
    if sources:
        fams = {":" in a for a in sources}
        tcp = [sv for sv in servers if not sv.address.is_unix]
        if not tcp:
            raise ctx.error("upstream_source", "has no effect: every server is a unix socket")
        for sv in tcp:
            if (":" in sv.address.host) not in fams:
                raise ctx.error("upstream_source", f"has no address of server {sv.address}'s family")


def build_config(raw: Mapping[str, Any], *, source: str = CLI_SOURCE, base_dir: str = ".") -> Config:
    """Validate a raw mapping (from TOML or from flags) into a Config. Raises ConfigError."""
    top = _Ctx(source)
    _check_known(top, {k: v for k, v in raw.items() if k != "listener"}, ALL_KEYS)
    glob: dict[str, Any] = {
        k: _parse_value(top, k, _GLOBAL_KEYS[k], v, base_dir) for k, v in raw.items() if k in _GLOBAL_KEYS
    }
    # Keys that are both (access_log, log_format) are top-level settings at the top; a
    # listener's own value, in its [[listener]] table, wins for its sessions.
    defaults = {k: v for k, v in raw.items() if k in _LISTENER_KEYS and k not in _GLOBAL_KEYS}

    tables = raw.get("listener")
    listeners: list[ListenerConfig] = []
    if tables is None:
        if "listen" not in defaults and "upstream" not in defaults:
            raise top.error("listen", "no listener configured (set listen and upstream, or add [[listener]] tables)")
        listeners.append(_build_listener(top, defaults, base_dir, 0))
    else:
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables) or not tables:
            raise top.error("listener", "must be an array of tables ([[listener]])")
        if "listen" in defaults:
            raise top.error("listen", "top-level listen conflicts with [[listener]] tables; move it into a table")
        for i, table in enumerate(tables):
            ctx = top.sub(f"listener[{i}].")
            _check_known(ctx, table, _LISTENER_KEYS)
            listeners.append(_build_listener(ctx, {**defaults, **table}, base_dir, i))

    if glob.get("policy_timeout", 1.0) <= 0:
        raise top.error("policy_timeout", "must be greater than 0")
    if glob.get("record_queue", C.RECORD_QUEUE) < 16:
        raise top.error("record_queue", f"must be at least 16, got {glob['record_queue']}")
    # The engine's tables are fixed in size: say so here rather than fail inside it.
    n_listen = sum(len(lc.listen) for lc in listeners)
    if n_listen > C.MAX_LISTENERS:
        raise top.error("listen", f"{n_listen} listen addresses in all; at most {C.MAX_LISTENERS} are supported")
    n_servers = sum(len(lc.servers) for lc in listeners) + len(glob.get("upstreams", ()))
    if n_servers > C.MAX_UPSTREAMS:
        raise top.error("upstream", f"{n_servers} upstream servers in all (each listener's, plus named upstreams); "
                                    f"at most {C.MAX_UPSTREAMS} are supported")
    seen: dict[tuple[str, int], str] = {}
    for lc in listeners:
        for a in lc.listen:
            k = (a.host, a.port)
            if a.port and k in seen:
                raise ConfigError(f"address {a} is used by both {seen[k]} and {lc.name}", source=source, key="listen")
            seen[k] = lc.name
    if glob.get("access_log") == "off":
        glob["access_log"] = None
    return Config(listeners=tuple(listeners), source=source, **glob)


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML file into a raw mapping. Raises ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("file not found", source=path) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a TOML file", source=path) from None
    except PermissionError:
        raise ConfigError("permission denied", source=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", source=path) from None


def load_config(path: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate a TOML file; `overrides` (from flags) replace top-level keys."""
    raw = load_file(path)
    if overrides:
        raw = {**raw, **overrides}
    return build_config(raw, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def config_keys() -> list[str]:
    """Every key a file may hold (listener keys may also sit in [[listener]] tables)."""
    return list(ALL_KEYS)


__all__ = [
    "Address",
    "Config",
    "ListenerConfig",
    "ServerConfig",
    "build_config",
    "load_config",
    "parse_address",
    "parse_duration",
    "parse_server",
    "flag_for",
    "config_keys",
]
