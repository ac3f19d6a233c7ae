"""The running proxy: binds listeners, feeds the compiled engine, handles signals and workers.

`Proxy` is the in-process API (one engine, one thread); `serve()` is what the CLI runs: one
process, or a master that forks `workers` processes which each bind the same addresses with
SO_REUSEPORT and run their own engine.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Literal

from . import constants as C
from .config import PROXY_PROTOCOL_MODES, Address, Config, ListenerConfig, ServerConfig, key_path
from .boundary import PolicyDispatcher, RecordSink
from .metrics import Metrics
from .errors import ConfigError, EngineNotBuiltError
from .log import AccessLog, AccessLogs, policy_log, reopen_logs, server_log, setup_error_log, tls_log, upstream_log
from .record import Record
from .policy import ConnectGate, PolicyHook, engine_identity_checks, load_hook, needs_gate
from .tls import build_context

if TYPE_CHECKING:
    import asyncio

try:
    from . import _engine
except ImportError as e:  # pragma: no cover - only on an unbuilt checkout
    _engine = None  # type: ignore[assignment]
    _ENGINE_ERROR = e

REASONS: tuple[tuple[str, int], ...] = _engine.REASONS if _engine is not None else ()

# Reasons worth a line in the error log (the access log has every connection anyway).
_UPSTREAM_FAILURES = {"upstream-refused", "upstream-unreachable", "upstream-timeout", "upstream-reset",
                      "no-server", "upstream-down", "no-source-port"}
_CLIENT_FAILURES = {"tls-handshake-failed", "tls-handshake-timeout"}
_SILENT_CLOSE = "closed before the TLS handshake"   # the engine's detail for a socket that sent nothing


def _require_engine() -> Any:
    if _engine is None:
        raise EngineNotBuiltError(
            f"the compiled engine is not built ({_ENGINE_ERROR}); install with `pip install .` "
            "(needs gcc, python3-dev and libssl-dev)"
        )
    return _engine


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each session needs 2 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _mem_total() -> int:
    """Bytes of RAM (MemTotal, or a cgroup limit below it), 0 when unknown."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            v = f.read().strip()
        if v.isdigit() and (total == 0 or int(v) < total):
            total = int(v)
    except OSError:
        pass
    return total


def auto_max_connections(workers: int = 1) -> tuple[int, str]:
    """max_connections auto, per worker: the least of what the descriptor limit allows (two
    per session, a reserve for listeners, logs and pipes) and what memory allows
    (CONNECTION_MEMORY per busy TLS session in three quarters of RAM, shared by the
    workers). Returns the number and how it was derived, for the start-up line."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    by_fd = max(16, (soft - 64) // 2)
    mem = _mem_total()
    by_mem = max(16, int(mem * 0.75) // max(1, workers) // C.CONNECTION_MEMORY) if mem else by_fd
    return min(by_fd, by_mem), (f"descriptors (limit {soft}) allow {by_fd}, "
                                f"memory ({mem / 2**30:.1f} GiB) {by_mem}")


def bind_listener(addr: Address, backlog: int, *, reuseport: bool) -> socket.socket:
    """A listening TCP socket for addr; OSError names the address when it cannot bind."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {addr}: {e.strerror}") from None
    return sock


def check_config(cfg: Config) -> list[str]:
    """Validate what the schema cannot (certificates, keys, CAs); return warnings."""
    warnings = []
    for i, lc in enumerate(cfg.listeners):
        build_context(lc, source=cfg.source, index=i, n_listeners=len(cfg.listeners))
        if lc.policy:
            load_hook(lc.policy, source=cfg.source, key=_key(cfg, i, "policy"))
        _check_sources(cfg, i, lc)
        for sv in lc.servers:
            if not sv.address.is_loopback:
                warnings.append(
                    f"{lc.name}: upstream {sv} is not a loopback or unix address: "
                    "broker traffic leaves this host in plain text"
                )
            if _server_pp(lc, sv) != "none" and not sv.address.is_loopback:
                warnings.append(
                    f"{lc.name}: upstream {sv} gets PROXY headers but is not a loopback or unix address: "
                    "a broker that trusts PROXY headers must be reachable only through the proxy, or any client "
                    "can claim any address and certificate identity"
                )
        if not lc.tls and any(not a.is_loopback for a in lc.listen):
            warnings.append(f"{lc.name}: listens on {lc.listen[0]} without TLS")
        if lc.tls_key:
            try:
                mode = os.stat(lc.tls_key).st_mode
            except OSError:
                mode = 0
            if mode & 0o004:
                warnings.append(f"{lc.name}: private key {lc.tls_key} is readable by every user of this host "
                                f"(mode {mode & 0o777:o}): chmod 600 (or 640 with a group the proxy runs as)")
    from .checks import deployment_warnings

    warnings += deployment_warnings(cfg)
    if (cfg.user or cfg.group) and os.geteuid() != 0:
        import grp
        import pwd

        want_uid = pwd.getpwnam(cfg.user).pw_uid if cfg.user else os.getuid()
        want_gid = grp.getgrnam(cfg.group).gr_gid if cfg.group else os.getgid()
        if (want_uid, want_gid) != (os.getuid(), os.getgid()):
            raise ConfigError(f"switching to {cfg.user or ''}{':' + cfg.group if cfg.group else ''} needs "
                              f"root (running as uid {os.getuid()})", source=cfg.source,
                              key="user" if cfg.user else "group")
    return warnings


def drop_privileges(cfg: Config) -> None:
    """setgid/setuid to cfg.group/cfg.user (supplementary groups: the user's) after the ports
    are bound and keys read; the process can then no longer re-bind ports below 1024 nor read
    a key readable only by root. A no-op without user/group, or when already that user."""
    if not (cfg.user or cfg.group) or os.geteuid() != 0:
        return
    import grp
    import pwd

    pw = pwd.getpwnam(cfg.user) if cfg.user else None
    gid = grp.getgrnam(cfg.group).gr_gid if cfg.group else (pw.pw_gid if pw else os.getgid())
    if pw is not None:
        os.initgroups(pw.pw_name, gid)
    else:
        os.setgroups([])
    os.setgid(gid)
    if pw is not None:
        os.setuid(pw.pw_uid)
    server_log.info("running as uid %d gid %d (%s)", os.getuid(), os.getgid(),
                    ":".join(x for x in (cfg.user, cfg.group) if x))


def _server_pp(lc: ListenerConfig, sv: ServerConfig) -> str:
    return sv.proxy_protocol if sv.proxy_protocol is not None else lc.proxy_protocol


def _check_sources(cfg: Config, index: int, lc: ListenerConfig) -> None:
    """Each source address must be one of this host's: bind() it now, not at the first client."""
    for a in lc.upstream_source:
        fam = socket.AF_INET6 if ":" in a else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.bind((a, 0))
            except OSError as e:
                raise ConfigError(f"cannot use {a} as a source address: {e.strerror}", source=cfg.source,
                                  key=_key(cfg, index, "upstream_source")) from None


def _key(cfg: Config, index: int, key: str) -> str:
    return key_path(cfg.source, len(cfg.listeners), index, key)


ProxyState = Literal["created", "running", "stopped", "failed"]
_NOTICE = object()   # marks an engine notice among the connection records


class _BoundedCounter(Counter):
    """Refusals by cause: a hook's reason may hold a ClientId (one key each); past LIMIT
    distinct causes the rest are counted under one key, so the counters stay bounded."""

    LIMIT = 64
    OTHER = "other (more distinct reasons than the counters keep)"

    def __setitem__(self, key: Any, value: int) -> None:
        if key not in self and len(self) >= self.LIMIT:
            key = self.OTHER
            value = self.get(key, 0) + 1
        super().__setitem__(key, value)


class _LineLimiter:
    """At most one log line per key per `period` seconds (used on the records thread)."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self._last: dict[Any, tuple[float, int]] = {}

    def allow(self, key: Any) -> int | None:
        """None: hold this line back; else log it, with how many were held back before it."""
        now = time.monotonic()
        last, held = self._last.get(key, (-self.period, 0))
        if now - last < self.period:
            self._last[key] = (last, held + 1)
            return None
        if len(self._last) > 4096:
            self._last.clear()
        self._last[key] = (now, 0)
        return held
# The engine's rate-limited conditions (at most one line per kind per 10 s; n: how often since
# the last line).
_NOTICE_TEXT = {
    "fd-exhausted": "out of file descriptors: accepting failed {n} time(s) (fd limit {limit}); new clients wait "
                    "in the listen queue until sessions end: raise the limit (LimitNOFILE) or lower max_connections",
    "connection-cap": "max_connections ({max}) reached ({n} time(s)): not accepting until sessions end",
    "address-denied": "refused {n} connection(s) from addresses outside allow / inside deny",
    "too-many-connections": "refused {n} connection(s) over max_conns_per_ip",
    "rate-limited": "refused {n} connection(s) over conn_rate_per_ip",
    "reconnect-too-fast": "refused {n} CONNECT(s) over reconnect_rate_per_clientid (CONNACK 0x89 / 3.x 0x03)",
    "admission-full": "admission table full: admitted {n} client(s) without per-address accounting",
}
_START_LOCK = threading.Lock()   # two threads calling start() at once: one wins, one raises


class Proxy:
    """One engine serving every listener of a Config, in the calling process.

    Construction binds the sockets (so port 0 is resolved in `addresses`) and loads TLS
    material; run() blocks, start()/stop() run it in a background thread.
    """

    def __init__(
        self,
        config: Config,
        *,
        on_record: Callable[[Record], None] | None = None,
        policy: PolicyHook | None = None,
        reuseport: bool = False,
        access_log: AccessLog | None = None,
        loop: "asyncio.AbstractEventLoop | None" = None,
        inherit: dict[tuple[str, int], int] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        eng = _require_engine()
        self.config = config
        self._on_record = on_record
        # each listener's access log (its access_log / log_format, else the top-level ones);
        # access_log=AccessLog(...) serves every listener
        self._access = AccessLogs(config, access_log)
        self._thread: threading.Thread | None = None
        self._named: dict[str, int] = {}
        self._error: BaseException | None = None
        self._listener_names: list[str] = []
        self.addresses: list[list[tuple[str, int]]] = []
        self._log_failures = server_log.isEnabledFor(logging.INFO)
        self.refusals: Counter[str] = _BoundedCounter()
        self._upstream_lines = _LineLimiter()
        self.metrics = metrics if metrics is not None else Metrics()
        # listen address -> the descriptor the engine owns; a reload's next Proxy takes dups
        self.listen_fds: dict[tuple[str, int], int] = {}
        self._gates: list[ConnectGate | None] = []
        # engine upstream index -> (listener, server) for pool servers (named upstreams are in _named)
        self._servers: dict[int, tuple[ListenerConfig, ServerConfig]] = {}
        self._checkers: list[Any] = []
        self.max_connections = config.max_connections or auto_max_connections(config.workers)[0]
        self.engine = eng.Engine(on_close=self._queue_record, on_connect=self._submit_policy,
                                 on_notice=self._queue_notice, max_connections=self.max_connections,
                                 policy_timeout=config.policy_timeout)
        # Python work that leaves the loop thread (fastproxy.boundary): the records thread,
        # and the policy threads (or asyncio loop) once a listener has a gate.
        self._records = RecordSink(self._on_record_item, maxsize=config.record_queue)
        socks: list[socket.socket] = []
        try:
            named = {name: self._add_upstream(addr) for name, addr in config.upstreams}
            self._named = named
            for i, lc in enumerate(config.listeners):
                ctx = build_context(lc, source=config.source, index=i, n_listeners=len(config.listeners))
                pool = [self._add_server(lc, sv) for sv in lc.servers]
                hook = load_hook(lc.policy, source=config.source, key=_key(config, i, "policy")) if lc.policy else policy
                cid_cn, user_cn = engine_identity_checks(lc)
                identity = (eng.IDENTITY_CLIENTID_CN if cid_cn else 0) | (eng.IDENTITY_USERNAME_CN if user_cn else 0)
                gate = (
                    ConnectGate(lc, hook=hook, upstreams=named, counters=self.refusals, cn_checks_done=bool(identity),
                                metrics=self.metrics)
                    if needs_gate(lc, hook)
                    else None
                )
                bound = []
                for addr in lc.listen:
                    key = (addr.host, addr.port)
                    if inherit and addr.port and key in inherit:
                        # A reload: the same listening socket (its queue and port kept), a dup of
                        # the previous generation's, which closes its own copy when it retires.
                        s = socket.socket(fileno=os.dup(inherit[key]))
                    else:
                        s = bind_listener(addr, lc.backlog, reuseport=reuseport)
                    socks.append(s)
                    bound.append(s.getsockname()[:2])
                    fd = s.detach()
                    if addr.port:
                        self.listen_fds[key] = fd
                    # The engine owns the descriptor from here on (and closes it on failure).
                    self.engine.add_listener(fd, lc, pool, tls=ctx, gate=gate is not None, identity=identity)
                    self._listener_names.append(lc.name)
                    self._gates.append(gate)
                self.addresses.append(bound)
                if lc.health_interval > 0:
                    self._checkers.append(self._health_checker(lc, pool))
            self._policy = PolicyDispatcher(self._gates, self.engine.policy_answer, threads=config.policy_threads,
                                            loop=loop)
        except BaseException:
            for s in socks:
                if s.fileno() >= 0:
                    s.close()
            self.engine.close()     # the listening sockets it took over, now
            self.engine = None
            raise

    def _add_server(self, lc: ListenerConfig, sv: ServerConfig) -> int:
        a = sv.address
        pp = -1 if sv.proxy_protocol is None else PROXY_PROTOCOL_MODES.index(sv.proxy_protocol)
        # key: the address text, so every proxy listing this server ranks it the same way
        idx = self._add_upstream(a, weight=sv.weight, backup=sv.backup, maxconn=sv.max_connections,
                                 proxy_protocol=pp, key=str(a))
        self._servers[idx] = (lc, sv)
        return idx

    def _health_checker(self, lc: ListenerConfig, pool: list[int]) -> Any:
        from .health import CheckTarget, HealthChecker

        targets = [CheckTarget(index=idx, address=self._servers[idx][1].address,
                               proxy_protocol=_server_pp(lc, self._servers[idx][1])) for idx in pool]
        return HealthChecker(
            targets, interval=lc.health_interval, timeout=lc.health_timeout, rise=lc.health_rise,
            fall=lc.health_fall, kind=lc.health_check, proxy_command=lc.health_proxy_command,
            on_change=self._health_changed, passive_failures=self.engine.consecutive_failures,
            identity=lc.health_check_identity,
        )

    def _health_changed(self, target: Any, up: bool, why: str) -> None:
        # From a checker thread: the engine reads the byte at its next choice of a server.
        if self.engine is None:
            return
        self.engine.set_upstream_state(target.index, up)
        lc, sv = self._servers[target.index]
        if not up and lc.on_marked_down == "shutdown-sessions":
            n = self.engine.upstream_stats()[target.index]["sessions"]
            upstream_log.warning("%s: closing %d session(s) on %s (on_marked_down shutdown-sessions)", lc.name, n, sv)
            self.engine.shutdown_sessions(target.index)

    def _add_upstream(self, a: Address, **opts: Any) -> int:
        if a.is_unix:
            assert a.path is not None
            return int(self.engine.add_upstream(socket.AF_UNIX, a.path, 0, **opts))
        return int(self.engine.add_upstream(a.family, a.host, a.port, **opts))

    # -- the engine's two callbacks: on its loop thread, once per connection; both only queue
    def _submit_policy(self, token: int, request: tuple) -> None:
        self._policy.submit(token, request)

    def _queue_record(self, rec: tuple) -> None:
        self._records.put(rec)

    def _queue_notice(self, kind: str, count: int) -> None:
        self._records.put((_NOTICE, kind, count))

    # -- on the records thread
    def _on_record_item(self, rec: tuple) -> None:
        if rec[0] is _NOTICE:
            self._on_notice(rec[1], rec[2])
        else:
            self._on_close(rec)

    def _on_notice(self, kind: str, count: int) -> None:
        text = _NOTICE_TEXT.get(kind, kind + ": {n}")
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        server_log.warning(text.format(n=count, limit=limit, max=self.max_connections))

    # -- on the records thread
    def _on_close(self, rec: tuple) -> None:
        (li, host, port, protocol, reason_i, sent, received, t0, duration, detail, cn, client_id, refuse_code, up,
         cipher, tls_reason, websocket, username) = rec
        reason, status = REASONS[reason_i]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        record: Record = {
            "listener": self._listener_names[li],
            "addr": host,
            "port": port,
            "protocol": protocol,
            "reason": reason,
            "status": status,
            "bytes_sent": sent,
            "bytes_received": received,
            "start": t0,
            "duration": duration,
            "detail": detail,
            "cn": cn,
            "client_id": client_id,
            "upstream": self._server_name(up),
            "cipher": cipher,
            "tls_reason": tls_reason,
            "websocket": websocket,
            "refuse_code": refuse_code or None,
            "username": username,
        }
        self.metrics.observe(record)
        self._access.log(li, record)
        if refuse_code and detail:
            # refused by the engine's own identity rules (the policy gate logs its own)
            self.refusals[detail] += 1
            policy_log.warning(
                "%s: refused client %s:%d ClientId %r CN %r: %s (reason code 0x%02x)",
                self._listener_names[li], host, port, client_id or "", cn, detail, refuse_code,
            )
        elif reason != "ok" and self._log_failures:
            name = self._listener_names[li]
            if reason in _UPSTREAM_FAILURES:
                # A broker resetting an established session is routine in MQTT (a session taken
                # over by the same ClientId); failing to reach it is not; running out of local
                # ports is an operator's problem (add upstream_source addresses).
                level = {"upstream-reset": logging.INFO, "upstream-down": logging.INFO,
                         "no-source-port": logging.ERROR}.get(reason, logging.WARNING)
                server = self._server_name(up) or "(no server)"
                hint = ""
                if reason == "no-source-port":
                    hint = "; the local ports toward this server are used up: add upstream_source addresses"
                # A broker outage fails every client: one line per server and reason per 10 s,
                # saying how many were held back (each client is in the access log).
                held = self._upstream_lines.allow((server, reason))
                if held is not None:
                    upstream_log.log(
                        level, "%s: client %s:%d: %s %s%s%s%s", name, host, port, reason, server,
                        f" ({detail})" if detail else "", hint,
                        f" [{held} more like it since the last such line]" if held else "",
                    )
            elif reason in _CLIENT_FAILURES:
                # A socket that sent nothing (scanners, a flood of silent sockets) is in the
                # access log; a line each in the error log would only let floods fill it.
                tls_log.log(logging.DEBUG if detail == _SILENT_CLOSE else logging.INFO, "%s: client %s:%d: %s%s",
                            name, host, port, reason, f": {detail}" if detail else "")
            elif reason in ("bad-connect", "connect-timeout", "bad-proxy-header", "untrusted-proxy"):
                server_log.info("%s: client %s:%d: %s%s", name, host, port, reason, f": {detail}" if detail else "")
            elif reason == "internal-error":
                server_log.error("%s: client %s:%d: %s%s", name, host, port, reason, f": {detail}" if detail else "")
        if self._on_record is not None:
            self._on_record(record)

    def sessions(self, limit: int = 10000, client_id: str | None = None) -> list[dict[str, Any]]:
        """The live sessions (at most limit; only this ClientId's when given), read on the
        engine's loop thread: listener, addr, port, state, client_id, cn, upstream, age and idle
        (seconds), bytes_received / bytes_sent, websocket."""
        if self.engine is None:
            return []
        out = []
        for li, host, port, state, cid, cn, up, age, idle, received, sent, ws in self.engine.sessions(limit, client_id):
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]
            out.append({"listener": self._listener_names[li], "addr": host, "port": port, "state": state,
                        "client_id": cid, "cn": cn, "upstream": self._server_name(up), "age": round(age, 3),
                        "idle": round(idle, 3), "bytes_received": received, "bytes_sent": sent, "websocket": ws})
        return out

    def disconnect(self, client_id: str | None = None, addr: tuple[str, int] | None = None) -> int:
        """End the sessions of this ClientId and/or client address (logged `disconnected`);
        returns how many."""
        if self.engine is None:
            return 0
        return int(self.engine.disconnect(client_id, addr))

    def _server_name(self, index: int) -> str | None:
        if index < 0:
            return None
        entry = self._servers.get(index)
        if entry is not None:
            return str(entry[1])
        return next((f"{n} ({a})" for n, a in self.config.upstreams if self._named.get(n) == index), None)

    # -- running
    def run(self) -> None:
        """Serve until stop() (from another thread or a signal handler) completes.

        In the main thread, signals wake the engine (signal.set_wakeup_fd) so Python signal
        handlers run promptly; Ctrl-C with the default handler raises KeyboardInterrupt here.
        """
        if self.engine is None:
            raise RuntimeError("proxy already finished")
        old_fd = None
        if threading.current_thread() is threading.main_thread():
            old_fd = signal.set_wakeup_fd(self.engine.wakeup_fd, warn_on_full_buffer=False)
        self._records.start()
        self._policy.start()
        for ch in self._checkers:
            ch.start()
        try:
            self.engine.run()
        finally:
            for ch in self._checkers:
                ch.stop()
            self._policy.stop()
            self._records.stop()    # every record of the run is written before run() returns
            if old_fd is not None:
                signal.set_wakeup_fd(old_fd)

    # -- lifecycle: created -> running (start()) -> stopped, or failed when the engine thread
    # raised. A Proxy runs once. Class-level defaults: each instance sets its own on change.
    _state: ProxyState = "created"
    _failure: BaseException | None = None

    @property
    def state(self) -> ProxyState:
        """"created" (built, sockets bound), "running" (start() was called), "stopped" (stop()
        completed or close() released a Proxy never started) or "failed" (see `error`)."""
        return self._state

    @property
    def error(self) -> BaseException | None:
        """What the engine thread raised, when state is "failed" (it stays; stop() raises it once)."""
        return self._failure

    def start(self) -> "Proxy":
        """Run in a daemon thread ("fastproxy-engine"); returns self. Raises RuntimeError at once
        when the Proxy was already started, has finished or was closed."""
        with _START_LOCK:
            if self.engine is None:
                raise RuntimeError("proxy is closed; build a new Proxy")
            if self._state != "created":
                raise RuntimeError(f"proxy already {'started' if self._state == 'running' else self._state}; "
                                   "a Proxy runs once")
            self._state = "running"

        def target() -> None:
            try:
                self.run()
            except BaseException as e:  # reported now; stop() re-raises it
                self._engine_failed(e)
            else:
                self._state = "stopped"

        self._thread = threading.Thread(target=target, name="fastproxy-engine", daemon=True)
        self._thread.start()
        return self

    def _engine_failed(self, e: BaseException) -> None:
        self._failure = self._error = e
        self._state = "failed"
        server_log.error("the engine thread failed, the proxy is not serving: %s: %s", type(e).__name__, e,
                         exc_info=e)

    def stop(self, drain_timeout: float = 0.0, *, wait: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting; let sessions finish for drain_timeout seconds; close the rest.

        With wait (from another thread than the engine's), returns when the engine thread has
        ended and re-raises what it raised. A Proxy never started releases its listening
        sockets at once."""
        if self.engine is None:
            return
        self.engine.stop(drain_timeout)  # also ends a run() called directly, in another thread
        if self._thread is None:
            if self._state == "created":
                self._release()
            return
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._error is not None:
                err, self._error = self._error, None
                raise err

    def _release(self) -> None:
        """Close the listening sockets and free the engine, unless it is running."""
        eng = self.engine
        if eng is None or (self._thread is not None and self._thread.is_alive()):
            return
        try:
            eng.close()
        except RuntimeError:  # run() was called directly and is still running
            return
        self.engine = None
        if self._state == "created":
            self._state = "stopped"

    def stats(self) -> dict[str, int]:
        """The engine's counters (accepted, active, handshakes, bytes, closed_<reason>, ...) and
        refusals by cause (refused: <reason>)."""
        st = self.engine.stats()
        st["callback_errors"] += (self._records.errors + self._policy.errors
                                  + sum(g.errors for g in self._gates if g is not None))
        st["records_dropped"] = self._records.dropped
        for why, n in self.refusals.items():
            st[f"refused: {why}"] = n
        return st

    def status(self) -> dict[str, Any]:
        """Live state for `fastproxy status`: listeners, each pool server (up/down, sessions,
        totals, connect failures, last health check) and the engine's counters."""
        ups = self.engine.upstream_stats()
        health: dict[int, dict] = {}
        for ch in self._checkers:
            for h in ch.states():
                health[h["index"]] = h
        servers = []
        for idx, (lc, sv) in self._servers.items():
            h = health.get(idx)
            check = None
            if h is not None:
                check = {k: h.get(k) for k in ("checks", "failed_checks", "last_check", "last_result",
                                               "last_duration_ms", "changes", "since")}
            servers.append({"pool": lc.name, "server": str(sv), **ups[idx], "check": check})
        listeners = [
            {"name": lc.name, "listen": [f"{h}:{p}" for h, p in self.addresses[i]], "balance": lc.balance,
             "servers": len(lc.servers), "health_interval": lc.health_interval}
            for i, lc in enumerate(self.config.listeners)
        ]
        return {"pid": os.getpid(), "listeners": listeners, "servers": servers, "counters": self.stats(),
                "metrics": self.metrics.snapshot()}

    def close(self) -> None:
        """Release the listening sockets (also of a Proxy never started), the engine and the
        access log. A running Proxy is stopped at once first (drain 0)."""
        try:
            if self._thread is not None and self._thread.is_alive():
                self.stop(0.0)
        finally:
            self._release()
            self._access.close()

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.close()


# ----------------------------------------------------------------------------- serve (CLI)


def _describe(cfg: Config) -> str:
    parts = []
    for lc in cfg.listeners:
        mode = "TLS" if lc.tls else "TCP"
        if lc.websocket:
            mode = ("wss" if lc.tls else "ws") + " " + ",".join(lc.websocket) + (
                " passthrough" if lc.ws_passthrough else "")
        if lc.tls and lc.verify != "none":
            mode += f", client certificates {lc.verify}"
        to = str(lc.upstream) if len(lc.servers) == 1 else (
            f"{', '.join(str(sv) + (' (backup)' if sv.backup else '') for sv in lc.servers)} ({lc.balance})")
        for a in lc.listen:
            parts.append(f"{a} ({mode}) -> {to}")
    return "; ".join(parts)


def _install_stop_handlers(stop: Callable[[float], None], drain: float, *, master: int | None = None) -> None:
    """SIGTERM/SIGINT: drain for `drain` seconds, a second one stops at once. In a worker
    (master = the master's pid), a SIGTERM that finds the master gone (the parent-death signal,
    see _follow_master) stops at once: nobody is left to wait for the drain."""
    state = {"n": 0}

    def handler(signum: int, frame: Any) -> None:
        state["n"] += 1
        if master is not None and os.getppid() != master:
            server_log.warning("%s: the master process %d is gone; stopping now", signal.Signals(signum).name, master)
            stop(0.0)
        elif state["n"] == 1:
            server_log.info("%s: draining for %.1fs", signal.Signals(signum).name, drain)
            stop(drain)
        else:
            server_log.info("%s again: stopping now", signal.Signals(signum).name)
            stop(0.0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# Signals whose default action would end the process (status 129, 140) without a drain.
# Reload will take one of them; until it lands they are logged and ignored. (SIGUSR1 reopens
# the log files: _install_reopen_handler.)
_RESERVED_SIGNALS = (signal.SIGHUP, signal.SIGUSR2)    # SIGHUP: until serve installs the reload


def _install_ignored_signals(level: int = logging.INFO) -> None:
    """SIGHUP/SIGUSR2: one log line each time, and keep serving. The master (or the single
    process) logs at INFO and does not forward them; workers log at DEBUG, since a signal sent to
    the whole process group (a terminal hangup, `pkill -HUP fastproxy`) reaches the master too.
    SIGUSR1 reopens the log files (_install_reopen_handler, at the same level)."""

    def handler(signum: int, frame: Any) -> None:
        server_log.log(level, "%s received: ignored", signal.Signals(signum).name)

    for sig in _RESERVED_SIGNALS:
        signal.signal(sig, handler)
    _install_reopen_handler(level)


def _install_reopen_handler(level: int = logging.INFO, forward: Callable[[], list[int]] | None = None) -> None:
    """SIGUSR1: reopen this process's access-log files and its error-log file, so logrotate can
    rename them and signal (no copytruncate). The work runs on a thread of its own, not in the
    handler, which may have interrupted this thread inside a log write. The master also
    forwards the signal to each worker (`forward` gives their pids)."""

    def handler(signum: int, frame: Any) -> None:
        for pid in forward() if forward is not None else ():
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        threading.Thread(target=reopen_logs, args=(level,), name="fastproxy-reopen", daemon=True).start()

    signal.signal(signal.SIGUSR1, handler)


RETIRED_DRAIN_S = 10 * 365 * 86400.0    # a reload's previous generation: sessions end on their own


class _Generations:
    """The proxy of this process, replaced on reload (SIGHUP) without dropping a session: the
    new configuration is read and checked, a new Proxy is built on the same listening sockets
    (dups; new addresses bound, removed ones closed), started, and the previous one stops
    accepting and keeps relaying its sessions until they end. A configuration that does not
    load is refused with the reason logged; the running one stays. Runs the proxies in threads;
    the calling (main) thread waits for signals."""

    def __init__(self, cfg: Config, *, reuseport: bool, loader: Callable[[], Config] | None) -> None:
        self.cfg = cfg
        self.reuseport = reuseport
        self.loader = loader
        self.current = Proxy(cfg, reuseport=reuseport)
        self.retired: list[Proxy] = []
        self.stopping: float | None = None
        self.reloads = 0
        self._reload = threading.Event()
        self._wake = threading.Event()

    def status(self) -> dict[str, Any]:
        st = self.current.status()
        st["reloads"] = self.reloads
        st["retired_sessions"] = sum(p.stats()["active"] for p in self.retired if p.engine is not None)
        return st

    def sessions(self, limit: int = 10000, client_id: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in [self.current, *self.retired]:
            out += p.sessions(limit - len(out), client_id) if len(out) < limit else []
        return out

    def disconnect(self, client_id: str | None = None, addr: tuple[str, int] | None = None) -> int:
        return sum(p.disconnect(client_id, addr) for p in [self.current, *self.retired])

    def request_reload(self) -> None:          # from a signal handler: only flags
        self._reload.set()
        self._wake.set()

    def stop(self, drain: float) -> None:
        self.stopping = drain
        for p in [self.current, *self.retired]:
            if p.engine is not None:
                p.engine.stop(drain)
        self._wake.set()

    def reload(self) -> bool:
        """Build and start the next generation; False (logged) when the new one cannot be."""
        if self.loader is None:
            server_log.warning("reload: this process was not started from a configuration it can re-read")
            return False
        try:
            cfg = self.loader()
            for w in check_config(cfg):
                server_log.warning("%s", w)
            if cfg.workers != self.cfg.workers:
                server_log.warning("reload: workers stays %d (a restart changes it)", self.cfg.workers)
            new = Proxy(cfg, reuseport=self.reuseport, inherit=self.current.listen_fds, metrics=self.current.metrics)
        except (ConfigError, OSError, ValueError) as e:
            server_log.error("reload refused, the running configuration stays: %s", e)
            return False
        new.start()
        old, self.current, self.cfg = self.current, new, cfg
        old.stop(RETIRED_DRAIN_S, wait=False)
        self.retired.append(old)
        self.reloads += 1
        server_log.info("reloaded: listening on %s; the previous configuration keeps its %d session(s) "
                        "until they end", _describe(cfg), old.stats()["active"])
        return True

    def run(self) -> None:
        self.current.start()
        while self.stopping is None:
            self._wake.wait(1.0)
            self._wake.clear()
            if self._reload.is_set() and self.stopping is None:
                self._reload.clear()
                self.reload()
            for p in [p for p in self.retired if p.state != "running"]:
                self.retired.remove(p)
                p.close()
            if self.current.state != "running":
                break       # the engine failed: Proxy.stop() below re-raises its error
        drain = self.stopping or 0.0
        for p in [*self.retired, self.current]:
            try:
                p.stop(drain, timeout=drain + 30.0)
            finally:
                p.close()


def _run_single(cfg: Config, *, reuseport: bool, announce: str | None = None,
                link: Any = None, master: int | None = None, loader: Callable[[], Config] | None = None) -> int:
    gens = _Generations(cfg, reuseport=reuseport, loader=loader)
    drop_privileges(cfg)        # ports bound and TLS keys read: nothing further needs root
    admin = None
    if link is not None:
        link.serve(gens.status, sessions=gens.sessions, disconnect=gens.disconnect)  # a worker: the master asks
    elif cfg.admin is not None:
        from .admin import AdminServer

        admin = AdminServer(cfg.admin.host, cfg.admin.port, gens.status,
                            reload=lambda: os.kill(os.getpid(), signal.SIGHUP),
                            sessions=gens.sessions, disconnect=gens.disconnect).start()
    if announce:
        server_log.info("%s", announce)
    _install_stop_handlers(gens.stop, cfg.drain_timeout, master=master)
    signal.signal(signal.SIGHUP, lambda signum, frame: gens.request_reload())
    watcher = _CertWatcher(cfg, gens.request_reload) if cfg.watch_certs and link is None else None
    try:
        gens.run()
    finally:
        if watcher is not None:
            watcher.stop()
        if admin is not None:
            admin.stop()
    if announce:
        server_log.info("stopped")
    return 0


class _CertWatcher:
    """--watch-certs: re-read certificates when their files change (a renewal that does not
    signal): polls the listeners' certificate, key, CA and CRL files every `interval` seconds
    and calls `reload` once a change has been stable for one more poll."""

    def __init__(self, cfg: Config, reload: Callable[[], None], interval: float = 2.0) -> None:
        self.paths = sorted({p for lc in cfg.listeners for p in (lc.tls_cert, lc.tls_key, lc.client_ca, lc.crl) if p})
        self.reload = reload
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastproxy-watch-certs", daemon=True)
        self._thread.start()

    def _state(self) -> tuple:
        out: list[tuple] = []
        for p in self.paths:
            try:
                st = os.stat(p)
                out.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((p, None))
        return tuple(out)

    def _run(self) -> None:
        last = self._state()
        pending = None
        while not self._stop.wait(self.interval):
            now = self._state()
            if now != last:
                pending, last = now, now        # changed: wait for one quiet poll (a half-written file)
            elif pending is not None:
                pending = None
                server_log.info("certificate files changed: reloading")
                self.reload()

    def stop(self) -> None:
        self._stop.set()


def serve(cfg: Config, loader: Callable[[], Config] | None = None) -> int:
    """Run the configured proxy until SIGTERM/SIGINT; returns the exit status. loader() reads
    the configuration again, for a reload (SIGHUP, `fastproxy reload`, --watch-certs)."""
    setup_error_log(cfg.error_log, cfg.log_level)
    _install_ignored_signals()
    _require_engine()
    limit = raise_fd_limit()
    for w in check_config(cfg):
        server_log.warning("%s", w)
    n, why = auto_max_connections(cfg.workers)
    if cfg.max_connections == 0:
        server_log.info("max_connections auto: %d per worker (%s)", n, why)
    elif cfg.max_connections > (limit - 64) // 2:
        server_log.warning("max_connections %d is more than the descriptor limit %d allows (about %d sessions): "
                           "accepting will fail before it is reached", cfg.max_connections, limit,
                           max(16, (limit - 64) // 2))
    pid_file = _PidFile(cfg.pid_file, cfg.user)
    try:
        if cfg.workers <= 1:
            return _run_single(cfg, reuseport=False, announce=f"listening on {_describe(cfg)} (fd limit {limit})",
                               loader=loader)
        return _Master(cfg, loader).run()
    finally:
        pid_file.remove()


class _PidFile:
    """--pid-file: this (master) process's pid, for `fastproxy reload` and init scripts."""

    def __init__(self, path: str | None, user: str | None = None) -> None:
        self.path = path
        if path:
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")
            if user and os.geteuid() == 0:
                # after the privilege drop the process may not unlink it (/run is root's), but
                # can empty it: a stale pid must not be signalled by `fastproxy reload`
                import pwd

                os.chown(path, pwd.getpwnam(user).pw_uid, -1)

    def remove(self) -> None:
        if self.path:
            try:
                with open(self.path) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    try:
                        os.unlink(self.path)
                    except PermissionError:
                        open(self.path, "w").close()
            except OSError:
                pass


_PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def _pdeathsig_setter() -> Callable[[int], bool] | None:
    """prctl(PR_SET_PDEATHSIG, sig) from libc through ctypes, as a function returning success;
    None where libc or ctypes is missing."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def set_pdeathsig(sig: int) -> bool:
        return int(prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0

    return set_pdeathsig


class _Master:
    """Forks the workers, forwards signals, restarts a worker that dies unexpectedly."""

    RESTART_WINDOW_S = 10.0
    MAX_QUICK_RESTARTS = 5

    def __init__(self, cfg: Config, loader: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self.loader = loader
        self.children: dict[int, float] = {}
        self.links: dict[int, Any] = {}
        self.stopping = False
        self.quick_restarts = 0
        self.pid = os.getpid()
        self._pdeathsig = _pdeathsig_setter()   # looked up here: a worker does no dlopen after fork

    def _check_bind(self) -> list[socket.socket]:
        # Bind (without listening) in the master first: a taken port or bad address is
        # reported once, before any fork. Not listening, these sockets get no connections.
        held: list[socket.socket] = []
        for lc in self.cfg.listeners:
            for a in lc.listen:
                family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    s.bind((a.host, a.port))
                except OSError as e:
                    s.close()
                    for h in held:
                        h.close()
                    raise OSError(e.errno, f"cannot listen on {a}: {e.strerror}") from None
                held.append(s)
        if self.cfg.admin is not None:
            # Probed (and released) before any fork: a taken admin port fails the start.
            a = self.cfg.admin
            with socket.socket(a.family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((a.host, a.port))
                except OSError as e:
                    for h in held:
                        h.close()
                    raise OSError(e.errno, f"cannot listen on {a} (admin): {e.strerror}") from None
        return held

    def _spawn(self, held: list[socket.socket]) -> None:
        link = None
        if self.cfg.admin is not None:
            from .admin import WorkerLink

            link = WorkerLink()
        pid = self._fork()
        if pid == 0:  # worker
            code = 1
            try:
                # First the master's handlers go (they would act on the master's children),
                # then the worker follows the master: an early SIGTERM simply ends it.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _install_ignored_signals(logging.DEBUG)
                if not self._follow_master():
                    code = 0
                    return  # the master died before the worker could follow it (finally: exit)
                for h in held:
                    h.close()
                for other in self.links.values():
                    other.close()
                if link is not None:
                    link.in_worker()
                code = _run_single(self.cfg, reuseport=True, link=link, master=self.pid, loader=self.loader)
            except BaseException as e:
                server_log.error("worker failed: %s", e)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = time.monotonic()
        if link is not None:
            link.in_master()
            self.links[pid] = link

    def _reloads(self, requested: threading.Event) -> None:
        """SIGHUP in the master: check the new configuration here (a refusal is logged once,
        and the workers keep theirs), then each worker reloads itself; workers started later
        get the new configuration."""
        while True:
            requested.wait()
            requested.clear()
            if self.stopping or self.loader is None:
                continue
            try:
                cfg = self.loader()
                for w in check_config(cfg):
                    server_log.warning("%s", w)
            except (ConfigError, OSError, ValueError) as e:
                server_log.error("reload refused, the running configuration stays: %s", e)
                continue
            self.cfg = cfg
            server_log.info("reload: signalling %d worker(s)", len(self.children))
            for pid in list(self.children):
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def _fork(self) -> int:
        """os.fork() holding fastproxy's log handlers, so that no other thread of the master (the
        admin server, status requests; they run when a dead worker is replaced) is half-way
        through a log write at the fork. Python 3.11's logging makes its own locks safe across
        fork (os.register_at_fork in logging/__init__.py re-creates every handler's lock in the
        child, after taking the module lock in the parent), but not the lock of the stream
        buffer such a write would hold. Forks happen in the main thread only: the parent-death
        signal is tied to the thread that forked."""
        from .log import ROOT

        handlers = list(logging.getLogger(ROOT).handlers)
        for h in handlers:
            h.acquire()
        pid = -1
        # The worker shares the master's pages (copy-on-write) only while nothing writes to
        # them; the cyclic GC writes into every tracked object it scans. Frozen objects are
        # left alone, so a worker's private memory is what it allocates itself.
        gc.freeze()
        try:
            pid = os.fork()
        finally:
            if pid != 0:  # in the child, logging re-created these locks unlocked
                for h in handlers:
                    h.release()
        return pid

    def _follow_master(self) -> bool:
        """In a worker right after fork: have the kernel send SIGTERM when the master dies
        (prctl PR_SET_PDEATHSIG), so `kill -9` of the master does not leave workers accepting
        on its port. False if the master is already gone (it died before the prctl)."""
        if self._pdeathsig is None or not self._pdeathsig(signal.SIGTERM):
            server_log.warning("worker %d: no parent-death signal (prctl failed): it would outlive a master "
                               "killed with SIGKILL", os.getpid())
        return os.getppid() == self.pid

    def status(self) -> dict[str, Any]:
        from .admin import ask_all, merge_worker_status

        pids = sorted(self.links)
        return merge_worker_status(list(zip(pids, ask_all([self.links[p] for p in pids], timeout=2.0))))

    def run(self) -> int:
        for lc in self.cfg.listeners:
            if any(a.port == 0 for a in lc.listen):
                raise ConfigError("port 0 cannot be shared by several workers; give a port", key="listen",
                                  source=self.cfg.source)
        held = self._check_bind()
        sys.stdout.flush()
        sys.stderr.flush()
        drain = self.cfg.drain_timeout

        def on_signal(signum: int, frame: Any) -> None:
            first = not self.stopping
            self.stopping = True
            for pid in list(self.children):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            if first:
                server_log.info("%s: draining %d workers for %.1fs", signal.Signals(signum).name, len(self.children), drain)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        _install_reopen_handler(forward=lambda: list(self.children))   # SIGUSR1: here and in each worker
        reload_requested = threading.Event()
        signal.signal(signal.SIGHUP, lambda signum, frame: reload_requested.set())
        threading.Thread(target=self._reloads, args=(reload_requested,), name="fastproxy-reload", daemon=True).start()
        if self.cfg.watch_certs:
            _CertWatcher(self.cfg, reload_requested.set)
        for _ in range(self.cfg.workers):
            self._spawn(held)
        for h in held:
            h.close()
        admin = None
        if self.cfg.admin is not None:
            from .admin import AdminServer, disconnect_in_workers, sessions_from_workers

            admin = AdminServer(self.cfg.admin.host, self.cfg.admin.port, self.status,
                                reload=lambda: os.kill(os.getpid(), signal.SIGHUP),
                                sessions=lambda limit, cid: sessions_from_workers(self.links, limit, cid),
                                disconnect=lambda cid, addr: disconnect_in_workers(self.links, cid, addr)).start()
        server_log.info("listening on %s with %d workers", _describe(self.cfg), self.cfg.workers)
        status = 0
        while self.children:
            # Polled, not a blocking waitpid: a signal the kernel hands to another thread of
            # the master (reload, admin, watcher) runs its Python handler only when this, the
            # main thread, gets back to Python.
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if pid == 0:
                time.sleep(0.1)
                continue
            started = self.children.pop(pid, None)
            if started is None:
                continue
            gone = self.links.pop(pid, None)
            if gone is not None:
                gone.close()
            code = os.waitstatus_to_exitcode(st)
            if self.stopping:
                if code != 0:
                    status = 1
                continue
            server_log.error("worker %d exited with status %d; starting a new one", pid, code)
            if time.monotonic() - started < self.RESTART_WINDOW_S:
                self.quick_restarts += 1
                if self.quick_restarts > self.MAX_QUICK_RESTARTS:
                    server_log.error("workers keep dying; giving up")
                    self.stopping = True
                    on_signal(signal.SIGTERM, None)
                    status = 1
                    continue
            self._spawn(held)
        if admin is not None:
            admin.stop()
        server_log.info("stopped")
        return status
