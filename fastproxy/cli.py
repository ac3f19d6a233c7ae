"""The `fastproxy` command: serve, check, status, version, reload, top, bench.

Every listener/global setting has one flag and one config-file key (`--tls-cert` is
`tls_cert`); the flag names spelled out in the issues are a contract and must not change.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from typing import Any, Sequence

from . import constants as C
from . import __version__
from .config import Config, build_config, flag_for, load_config
from .errors import ConfigError, FastproxyError
from .log import ROOT

# Flags that map to config keys; the dest is the key name.
_VALUE_FLAGS: list[tuple[str, str, str]] = [
    # (key, metavar, help)
    ("tls_cert", "FILE", "server certificate (full chain, PEM); enables TLS on the listener"),
    ("tls_key", "FILE", "server private key (PEM, unencrypted)"),
    ("tls_min_version", "VER", "TLSv1.2 (default) or TLSv1.3"),
    ("tls_ciphers", "LIST", "OpenSSL cipher list for TLS 1.2 (default HIGH:!aNULL:!MD5)"),
    ("tls_ciphersuites", "LIST", "TLS 1.3 cipher suites (default: OpenSSL's)"),
    ("client_ca", "FILE|DIR", "CA certificate(s) that sign client certificates (enables mutual TLS)"),
    ("verify", "MODE", "client certificates: required (default with --client-ca), optional or none"),
    ("verify_depth", "N", "intermediate CAs allowed between a client certificate and its trusted CA (OpenSSL's depth; default 1)"),
    ("crl", "FILE", "certificate revocation list (PEM) checked for client certificates"),
    ("mqtt", "on|off", "read and check each client's MQTT CONNECT before connecting upstream (default on)"),
    ("connect_timeout", "DUR", "the client's MQTT CONNECT must arrive within this (default 5s)"),
    ("max_connect_size", "SIZE", "largest CONNECT accepted, e.g. 64KiB (default)"),
    ("clientid_template", "TEMPLATE", "ClientId must equal this expanded from the certificate, e.g. '{cn}', 'dev-{san_dns}'"),
    ("policy", "MODULE:FUNC", "Python policy hook called with each CONNECT (see fastproxy.policy)"),
    ("proxy_protocol", "MODE", "PROXY header to the broker: none, v1, v2, v2-ssl, v2-ssl-cn (HAProxy's send-proxy*)"),
    ("proxy_protocol_options", "LIST", "extra PROXY v2 TLVs, HAProxy's proxy-v2-options: authority,cert-key,cert-sig,ssl-cipher,crc32c"),
    ("proxy_protocol_max_len", "BYTES", "refuse to send a longer PROXY header (default 500, Mosquitto's limit)"),
    ("trusted_proxies", "CIDR,...", "load balancers allowed to send PROXY headers (with --accept-proxy-protocol)"),
    ("ws_origins", "ORIGIN,...", "WebSocket: allowed Origin values, e.g. https://app.example.com (others: 403)"),
    ("ws_max_frame", "SIZE", "WebSocket: largest client frame (default 1MiB; larger: close 1009)"),
    ("allow", "CIDR,...", "accept clients from these networks only (checked at accept, before TLS)"),
    ("deny", "CIDR,...", "refuse clients from these networks (checked at accept, before TLS; wins over --allow)"),
    ("max_conns_per_ip", "N", "live connections per client address (IPv6: per /64) before TLS; 0: no limit (default)"),
    ("conn_rate_per_ip", "R[/BURST]", "new connections per second per client address (IPv6: per /64), token bucket"),
    ("reconnect_rate_per_clientid", "R[/BURST]", "CONNECTs per second per ClientId; faster gets CONNACK 0x89 (3.x: 0x03)"),
    ("upstream_connect_timeout", "DUR", "timeout for connecting to the broker (default 5s)"),
    ("handshake_timeout", "DUR", "TLS handshake timeout (default 10s)"),
    ("client_timeout", "DUR", "close a session whose client sent nothing this long (HAProxy's timeout client; default none)"),
    ("server_timeout", "DUR", "close a session whose broker sent nothing this long (HAProxy's timeout server; default none)"),
    ("tls_session_tickets", "on|off", "TLS session tickets (resumption); off = HAProxy's no-tls-tickets (default on)"),
    ("idle_timeout", "DUR|keepalive", "close a session idle this long (default 60s); 'keepalive': 1.5 x the CONNECT's"),
    ("backlog", "N", "listen backlog (default 4096)"),
    ("name", "NAME", "listener name used in logs"),
    ("workers", "N|auto", "worker processes sharing the port with SO_REUSEPORT (default 1)"),
    ("drain_timeout", "DUR", "on SIGTERM/SIGINT, let sessions finish this long (default 10s)"),
    ("access_log", "PATH|-|off|syslog:...", "access log: a file, '-' for stdout, 'off', syslog:unix:/dev/log or "
                                         "syslog:udp:HOST:PORT (default -); SIGUSR1 reopens files"),
    ("log_format", "NAME|TEMPLATE", "access-log format: default, nginx-stream, json, or a template of $variables "
                                    "such as '$remote_addr $status $clientid' (default: default)"),
    ("error_log", "PATH|-", "error log file, '-' for stderr (default -)"),
    ("log_level", "LEVEL", "debug, info, warning or error (default info)"),
    ("max_connections", "N|auto", "per-worker connection limit; auto (default): from the descriptor limit and memory, printed at start"),
    ("pid_file", "FILE", "write the (master) process id here; `fastproxy reload --pid-file FILE` signals it"),
    ("user", "USER", "after binding the ports and reading keys, run as this user (started as root; nginx's user)"),
    ("group", "GROUP", "... and as this group (default: the user's primary group)"),
    ("policy_threads", "N", "threads that run policy hooks, per worker (default 4)"),
    ("policy_timeout", "DUR", "a policy hook that has not answered within this refuses the client: "
                              "CONNACK 0x88 (3.x: 0x03), reason policy-timeout (default 5s)"),
    ("record_queue", "N", "access-log records waiting for the records thread; beyond this they are dropped "
                          "and counted (default 65536)"),
    ("balance", "MODE", "how a pool of --upstream servers is shared: clientid (default with MQTT), round-robin, least-conn, source"),
    ("retries", "N", "further servers tried when connecting to the chosen one fails (default 3)"),
    ("upstream_source", "ADDRS", "local source addresses for broker connections, used round-robin: a-b range or list (HAProxy's source)"),
    ("health_interval", "DUR", "check each server this often; 0 turns checks off (default 2s for 2+ servers, off for one)"),
    ("health_timeout", "DUR", "a check fails without a CONNACK within this (default 2s)"),
    ("health_rise", "N", "good checks that bring a down server back (default 2)"),
    ("health_fall", "N", "failed checks (or failed client connects in a row) that mark a server down (default 3)"),
    ("health_check", "KIND", "mqtt (CONNECT -> CONNACK; the default with MQTT awareness) or tcp (connect only; the default with --mqtt off)"),
    ("health_check_identity", "CN", "certificate CN the checks present in the PROXY SSL TLV to v2-ssl/v2-ssl-cn servers (default fastproxy-health)"),
    ("health_proxy_command", "CMD", "PROXY header of checks to servers that get one: proxy (default) or local"),
    ("on_marked_down", "ACTION", "none (default) or shutdown-sessions: close the sessions of a server marked down"),
    ("admin", "ADDR", "loopback address of the JSON status endpoint read by `fastproxy status` (e.g. 127.0.0.1:8404)"),
]


_BOOL_FLAGS: list[tuple[str, str]] = [
    ("require_clientid_cn", "the CONNECT's ClientId must equal the client certificate's CN"),
    ("require_username_cn", "the CONNECT's username must equal the client certificate's CN"),
    ("clientid_from_cn", "an empty ClientId is replaced by the certificate's CN (EMQX peer_cert_as_clientid)"),
    ("proxy_protocol_crc32c", "add a CRC32C TLV to PROXY v2 headers"),
    ("accept_proxy_protocol", "clients come through a load balancer that sends PROXY v1/v2 headers"),
    ("watch_certs", "reload when certificate, key, CA or CRL files change (a renewal without a signal)"),
]


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        help="address to listen on, host:port (repeatable; file key: listen)",
    )
    p.add_argument(
        "--upstream",
        metavar="ADDR",
        action="append",
        help="broker address, host:port or unix:/path, optionally with ,weight=N,backup,maxconn=N,proxy-protocol=MODE; "
        "repeat for a pool (file key: upstream, a list)",
    )
    for key, metavar, help_ in _VALUE_FLAGS:
        p.add_argument(flag_for(key), dest=key, metavar=metavar, help=help_)
    for key, help_ in _BOOL_FLAGS:
        p.add_argument(flag_for(key), dest=key, action="store_true", default=None, help=help_)
    p.add_argument(
        "--websocket",
        metavar="PATH",
        nargs="?",
        const=C.WS_PATH,
        action="append",
        help="the listener speaks MQTT over WebSocket (ws, or wss with --tls-cert) on PATH (default /mqtt; "
        "repeatable); the broker gets plain MQTT (file key: websocket, a list)",
    )
    p.add_argument(flag_for("ws_passthrough"), dest="ws_passthrough", action="store_true", default=None,
                   help="relay the upgrade to a broker that speaks WebSocket itself (file key: ws_passthrough)")
    p.add_argument(
        "--named-upstream",
        metavar="NAME=ADDR",
        action="append",
        help="an upstream a policy may route to by name (repeatable; file: [upstreams] NAME = ADDR)",
    )


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ns.listen:
        out["listen"] = ns.listen if len(ns.listen) > 1 else ns.listen[0]
    if ns.upstream:
        out["upstream"] = ns.upstream if len(ns.upstream) > 1 else ns.upstream[0]
    for key in [k for k, _, _ in _VALUE_FLAGS] + [k for k, _ in _BOOL_FLAGS]:
        v = getattr(ns, key, None)
        if v is not None:
            out[key] = v
    if getattr(ns, "websocket", None):
        out["websocket"] = ns.websocket
    if getattr(ns, "ws_passthrough", None) is not None:
        out["ws_passthrough"] = ns.ws_passthrough
    if ns.named_upstream:
        named = {}
        for item in ns.named_upstream:
            name, sep, addr = item.partition("=")
            if not sep or not name:
                raise ConfigError(f"expected NAME=ADDR, got {item!r}", source="command line", key="--named-upstream")
            named[name] = addr
        out["upstreams"] = named
    return out


def config_from_args(ns: argparse.Namespace) -> Config:
    """A Config from -c FILE and/or flags; flags override the file's top-level keys."""
    over = _overrides(ns)
    if ns.config:
        return load_config(ns.config, over)
    return build_config(over)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastproxy",
        description="A fast, MQTT-aware TLS front end for MQTT brokers.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the proxy")
    _add_serve_flags(serve)
    check = sub.add_parser("check", help="validate a configuration (like nginx -t)")
    _add_serve_flags(check)
    sub.add_parser("version", help="print versions and whether the compiled engine is loaded")
    reload = sub.add_parser("reload", help="make a running proxy re-read its configuration and certificates "
                                           "(SIGHUP to the process in its --pid-file)")
    reload.add_argument("--pid-file", metavar="FILE", help="the running proxy's --pid-file")
    reload.add_argument("--admin", metavar="ADDR", help="or ask the running proxy's admin endpoint (POST /reload)")
    reload.add_argument("-c", "--config", metavar="FILE", help="read pid_file (or admin) from this configuration file")
    status = sub.add_parser("status", help="print the live state of a running proxy (JSON from its --admin endpoint)")
    status.add_argument("--admin", metavar="ADDR", help="the proxy's admin address (default 127.0.0.1:8404, or the file's)")
    status.add_argument("-c", "--config", metavar="FILE", help="read the admin address from this configuration file")
    status.add_argument("--timeout", metavar="SECONDS", type=float, default=5.0, help="give up after this long (default 5)")
    from .top import add_arguments as _top_arguments

    _top_arguments(sub.add_parser("top", help="a live, refreshing table of the sessions of a running proxy "
                                               "(from its --admin endpoint); d disconnects one"))
    from .bench import add_arguments as _bench_arguments

    _bench_arguments(sub.add_parser("bench", help="measure this machine: handshakes/s and messages/s per core, "
                                                  "devices per GiB, the largest fleet it holds (fastproxy.bench)"))
    return p


def _loaded_libssl(name: str = "/libssl") -> str | None:
    """Path of the libssl (or `name`) mapped into this process (after the compiled modules loaded), if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if name in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None


def _platform_tag() -> str:
    """The wheel tag this install came from (its WHEEL file), else the interpreter's platform."""
    import sysconfig

    try:
        from importlib.metadata import distribution

        dist = distribution("fastproxy")
        here = os.path.dirname(os.path.abspath(__file__))
        if os.path.realpath(str(dist.locate_file("fastproxy"))) != os.path.realpath(here):
            raise LookupError("this fastproxy is not the installed distribution")
        wheel = dist.read_text("WHEEL") or ""
        tags = [ln.split(":", 1)[1].strip() for ln in wheel.splitlines() if ln.startswith("Tag:")]
        if tags:
            return ", ".join(tags) + " (wheel)"
    except Exception:  # noqa: BLE001 - not installed from a wheel (source tree, editable)
        pass
    return sysconfig.get_platform().replace("-", "_").replace(".", "_") + " (built from source)"


def _cmd_reload(ns: argparse.Namespace) -> int:
    path, admin = ns.pid_file, ns.admin
    if path is None and admin is None and ns.config:
        cfg = load_config(ns.config)
        path = cfg.pid_file
        if path is None and cfg.admin is not None:
            admin = f"[{cfg.admin.host}]:{cfg.admin.port}" if ":" in cfg.admin.host else f"{cfg.admin.host}:{cfg.admin.port}"
        if path is None and admin is None:
            raise ConfigError("has neither pid_file nor admin: give --pid-file or --admin", source=ns.config,
                              key="pid_file")
    if path is None and admin is not None:
        import urllib.request

        from .config import parse_admin_address

        a = parse_admin_address(admin)
        host = f"[{a.host}]" if ":" in a.host else a.host
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{a.port}/reload", method="POST"),
                                        timeout=5) as r:
                r.read()
        except OSError as e:
            print(f"fastproxy: reload: {admin}: {e}", file=sys.stderr)
            return 1
        print("reload requested (the proxy's log says whether the new configuration was taken)")
        return 0
    if path is None:
        raise ConfigError("give --pid-file FILE (or -c CONFIG with pid_file)", source="command line", key="reload")
    try:
        with open(path) as f:
            text = f.read().strip()
        if not text:
            print(f"fastproxy: reload: {path} is empty: the proxy is not running", file=sys.stderr)
            return 1
        pid = int(text)
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        print(f"fastproxy: reload: {path}: {e}", file=sys.stderr)
        return 1
    print(f"reload requested from process {pid} (its log says whether the new configuration was taken)")
    return 0


def _cmd_version() -> int:
    import platform

    from .tls import openssl_version, tls_library

    try:
        from . import _engine  # noqa: F401

        engine = "compiled engine loaded (fastproxy._engine)"
    except ImportError as e:  # pragma: no cover - only on a broken install
        engine = f"compiled engine NOT loaded: {e}"
    try:
        ssl_version = openssl_version()  # what the extension's libssl reports at run time
        ssl_name, static_version, static = tls_library()
    except ImportError as e:  # pragma: no cover - only on a broken install
        ssl_version, static = f"unknown (fastproxy._tls not loaded: {e})", False
    if static:
        # AWS-LC, built into the wheel's own shared object (setup.py, FASTPROXY_TLS=awslc).
        lib = _loaded_libssl("/libfastproxy-awslc")
        tls_line = f"{ssl_name} {static_version} (built in: {lib or 'libfastproxy-awslc.so not in the process map'})"
    else:
        lib = _loaded_libssl()
        if lib is None:
            origin = "libssl not found in the process map"
        elif os.path.basename(os.path.dirname(lib)).startswith("fastproxy") and os.path.dirname(lib).endswith(".libs"):
            origin = f"vendored in the wheel: {lib}"
        else:
            origin = f"system library: {lib}"
        tls_line = f"OpenSSL {ssl_version} ({origin})"
    print(f"fastproxy {__version__}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}, {platform.machine()})")
    print(f"Platform tag: {_platform_tag()}")
    print(tls_line)
    print(engine)
    return 0


def _cmd_check(cfg: Config) -> int:
    from .server import check_config

    for warning in check_config(cfg):
        print(f"fastproxy: warning: {warning}", file=sys.stderr)
    print(f"fastproxy: configuration {cfg.source} is ok ({len(cfg.listeners)} listener(s))")
    return 0


DEFAULT_ADMIN = "127.0.0.1:8404"


def admin_address(ns: argparse.Namespace, command: str) -> tuple[str | None, int]:
    """The admin address a client command talks to: --admin, else -c CONFIG's, else the
    default. (None, exit status) after printing why when the configuration gives none."""
    address = getattr(ns, "admin", None)
    if address is None and getattr(ns, "config", None):
        try:
            cfg = load_config(ns.config)
        except ConfigError as e:
            print(f"fastproxy: configuration error: {e}", file=sys.stderr)
            return None, 2
        if cfg.admin is None:
            print(f"fastproxy {command}: {ns.config} sets no admin address", file=sys.stderr)
            return None, 2
        address = str(cfg.admin)
    return address or DEFAULT_ADMIN, 0


def _cmd_status(ns: argparse.Namespace) -> int:
    from .admin import status_command

    address, code = admin_address(ns, "status")
    if address is None:
        return code
    return status_command(address, timeout=ns.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """The `fastproxy` command; returns the exit status. Never prints a traceback, except for an
    unexpected error at --log-level debug."""
    ns: argparse.Namespace | None = None
    try:
        parser = _parser()
        ns = parser.parse_args(argv)
        code = _run(parser, ns)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`fastproxy version | head -1`). Python would report the EPIPE
        # again when it flushes stdout at exit: point stdout at /dev/null (the Python docs'
        # recipe) and end like a process killed by SIGPIPE, quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback only when asked for
        debug = getattr(ns, "log_level", None) == "debug" or logging.getLogger(ROOT).isEnabledFor(logging.DEBUG)
        print(f"fastproxy: unexpected error: {type(e).__name__}: {e}"
              + ("" if debug else " (--log-level debug shows the traceback)"), file=sys.stderr)
        if debug:
            traceback.print_exc()
        return 1


def _run(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "version":
        return _cmd_version()
    if ns.command == "status":
        return _cmd_status(ns)
    if ns.command == "top":
        from .top import run as _cmd_top

        return _cmd_top(ns)
    try:
        if ns.command == "bench":
            from .bench import run_command as _cmd_bench

            return _cmd_bench(ns)
        if ns.command == "reload":
            return _cmd_reload(ns)
        cfg = config_from_args(ns)
        if ns.command == "check":
            return _cmd_check(cfg)
        from .server import serve

        return serve(cfg, loader=lambda: config_from_args(ns))
    except ConfigError as e:
        print(f"fastproxy: configuration error: {e}", file=sys.stderr)
        return 2
    except FastproxyError as e:
        print(f"fastproxy: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except OSError as e:
        print(f"fastproxy: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
