"""Active health checks of upstream brokers: HAProxy's `check inter/rise/fall`, with an MQTT check.

One daemon thread per server runs a blocking check every `interval` seconds and keeps HAProxy's
state machine: every server starts UP, goes DOWN after `fall` failed checks in a row, and comes
back UP after `rise` good checks in a row. Each change is logged on ``fastproxy.upstream`` and
handed to ``on_change`` (the engine's hook to stop routing to a server).

The MQTT check (the default) opens a connection, sends the PROXY header the server expects (if
any) and a clean MQTT 3.1.1 CONNECT in one write, waits for the CONNACK and says DISCONNECT. A
plain TCP check is not enough for a broker: a hung or SIGSTOPped Mosquitto still completes TCP
handshakes (the kernel does that), so only an MQTT answer shows the broker is processing.

Decisions:
- Any well-formed CONNACK counts as alive, whatever its return code: a broker that answers
  "not authorized" (0x05, e.g. `allow_anonymous false`) is up and processing MQTT, and that is
  all a health check can learn without credentials. A non-zero code is kept in the result
  ("ok (CONNACK 0x05)") so it is visible in states().
- The PROXY header is a PROXY command with the check socket's own addresses, not LOCAL:
  Mosquitto 2.1 closes LOCAL connections. ``proxy_command="local"`` sends LOCAL (v2) or
  "PROXY UNKNOWN" (v1) for brokers that want HAProxy's behaviour (with Mosquitto, only with
  the tcp check).
- Toward a `v2-ssl` / `v2-ssl-cn` server the header carries an SSL TLV as for a device with a
  verified certificate (client SSL|CERT_CONN|CERT_SESS, verify 0, VERSION "TLSv1.3") and, for
  v2-ssl-cn, the CN ``identity`` (default "fastproxy-health"): a broker that requires TLS and
  a certificate (Mosquitto 2.1 `proxy_protocol_v2_require_tls`, `require_certificate`) refuses
  a check without them before MQTT, and every server would be marked DOWN. The broker takes
  the identity as the user name (`use_identity_as_username`): it needs no topic in any ACL,
  and must be a name no device certificate carries.
- The ClientId is ``<prefix>-<pid>-<index>``: unique per process and server, so the checks of
  several workers never take over each other's sessions.
- Passive failures mark a server DOWN only when they are new since it last came UP: the engine's
  count of consecutive failed connects does not reset while no client is routed to the server,
  and counting the old failures again would flap it straight back DOWN.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastproxy import proxy_protocol
from fastproxy.config import PROXY_PROTOCOL_MODES, Address
from fastproxy.errors import ConfigError
from fastproxy.log import UPSTREAM

__all__ = ["CheckTarget", "HealthChecker", "CHECK_KINDS", "PROXY_COMMANDS"]

log = logging.getLogger(UPSTREAM)

CHECK_KINDS = ("mqtt", "tcp")
PROXY_COMMANDS = ("proxy", "local")

# MQTT 3.1.1 §3.1 CONNECT: protocol name "MQTT", level 4, flags 0x02 (clean session),
# keepalive 0 (none: the check disconnects at once). §3.14 DISCONNECT.
_CONNECT_VARIABLE_HEADER = b"\x00\x04MQTT\x04\x02\x00\x00"
_CONNACK = 0x20           # §3.2: packet type 2, flags 0
_CONNACK_REMAINING = 2    # §3.2.1: always 2 in 3.1.1
_DISCONNECT = b"\xe0\x00"
# A unix-socket server still gets an INET header: the v1 line has no UNIX form, and a broker
# only needs *some* source address for a connection it will close at once.
_UNIX_PEER = ("127.0.0.1", 0)


@dataclass(frozen=True)
class CheckTarget:
    """One server to check: the engine's upstream index (opaque here, passed back in the
    callbacks), its address, and the PROXY header it expects first ("none" for no header)."""

    index: int
    address: Address
    proxy_protocol: str = "none"

    @property
    def name(self) -> str:
        return str(self.address)


class _CheckFailed(Exception):
    """A check failed; the message is the short reason shown in logs and states()."""


class _State:
    """Per-target counters, guarded by HealthChecker._lock."""

    __slots__ = ("up", "checks", "failed_checks", "consecutive", "last_ok", "last_check",
                 "last_result", "last_duration_ms", "changes", "since", "passive_base")

    def __init__(self, now: float) -> None:
        self.up = True
        self.checks = 0
        self.failed_checks = 0
        self.consecutive = 0              # current run of checks with the same result
        self.last_ok: bool | None = None  # the result that run is made of
        self.last_check: float | None = None
        self.last_result = ""
        self.last_duration_ms: float | None = None
        self.changes = 0
        self.since = now
        self.passive_base = 0             # passive failure count already acted on / forgiven


def _varint(n: int) -> bytes:
    """MQTT §1.5.3 variable byte integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class HealthChecker:
    """Checks servers in background threads and keeps their UP/DOWN state.

    ``on_change(target, up, reason)`` is called from the checking thread after each change;
    ``passive_failures(index)`` returns the engine's count of consecutive failed connects to a
    server (reset by a successful one). states() and is_up() may be called from any thread.
    """

    def __init__(
        self,
        targets: Sequence[CheckTarget],
        *,
        interval: float = 2.0,
        timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        kind: str = "mqtt",
        proxy_command: str = "proxy",
        on_change: Callable[[CheckTarget, bool, str], None] | None = None,
        passive_failures: Callable[[int], int] | None = None,
        client_id_prefix: str = "fastproxy-check",
        identity: str = "fastproxy-health",
    ) -> None:
        if not interval > 0:
            raise ConfigError(f"must be > 0, not {interval!r}", key="health interval")
        if not timeout > 0:
            raise ConfigError(f"must be > 0, not {timeout!r}", key="health timeout")
        if rise < 1 or fall < 1:
            raise ConfigError(f"rise and fall must be >= 1, not {rise}/{fall}", key="health rise/fall")
        if kind not in CHECK_KINDS:
            raise ConfigError(f"must be one of {', '.join(CHECK_KINDS)}, not {kind!r}", key="health kind")
        if proxy_command not in PROXY_COMMANDS:
            raise ConfigError(f"must be one of {', '.join(PROXY_COMMANDS)}, not {proxy_command!r}",
                              key="health proxy_command")
        seen: set[int] = set()
        for t in targets:
            if t.proxy_protocol not in PROXY_PROTOCOL_MODES:
                raise ConfigError(f"{t.name}: unknown mode {t.proxy_protocol!r}", key="proxy_protocol")
            if t.index in seen:
                raise ConfigError(f"upstream index {t.index} is checked twice", key="health targets")
            seen.add(t.index)
        self.targets = tuple(targets)
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.rise = rise
        self.fall = fall
        self.kind = kind
        self.proxy_command = proxy_command
        self.on_change = on_change
        self.passive_failures = passive_failures
        self.client_id_prefix = client_id_prefix
        self.identity = identity
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        now = time.time()
        self._states = {t.index: _State(now) for t in self.targets}

    # ------------------------------------------------------------------ threads

    def start(self) -> None:
        """Start one daemon thread per target; each checks at once, then every interval."""
        if self._threads:
            raise RuntimeError("HealthChecker is already running")
        self._stop.clear()
        now = time.time()
        with self._lock:
            for st in self._states.values():
                st.since = now
        for t in self.targets:
            th = threading.Thread(target=self._run, args=(t,), name=f"fastproxy-health-{t.name}", daemon=True)
            self._threads.append(th)
            th.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Wake the threads and join them, `timeout` seconds at most in all (a check in flight
        ends within the check timeout; the threads are daemons if one outlives this)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))
        self._threads = [th for th in self._threads if th.is_alive()]

    def _run(self, target: CheckTarget) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._round(target)
            except Exception:  # a bug here must not end checking for good
                log.exception("health check of %s failed unexpectedly", target.name)
            # Wait from the start of this check, so the period stays `interval` whatever
            # the check took (a check slower than that is followed by the next at once).
            self._stop.wait(max(0.0, started + self.interval - time.monotonic()))

    def _round(self, target: CheckTarget) -> None:
        passive = 0
        if self.passive_failures is not None:
            try:
                passive = int(self.passive_failures(target.index))
            except Exception:
                log.exception("passive failure count of %s", target.name)
            else:
                self._observe_passive(target, passive)
        if self._stop.is_set():
            return
        t0 = time.monotonic()
        ok, result = self.check_once(target)
        self._record(target, ok, result, (time.monotonic() - t0) * 1000.0, passive)

    # ------------------------------------------------------------------ state machine

    def _observe_passive(self, target: CheckTarget, count: int) -> None:
        with self._lock:
            st = self._states[target.index]
            if count < st.passive_base:  # the engine saw a good connect: its count restarted
                st.passive_base = 0
            if not st.up or count - st.passive_base < self.fall:
                return
            st.up = False
            st.changes += 1
            st.since = time.time()
            st.consecutive = 0  # the checks' run did not decide this: rise counts from here
            st.last_ok = None
            st.passive_base = count
        reason = f"{count} consecutive connect failures from client sessions"
        log.warning("server %s is DOWN: %s", target.name, reason)
        self._notify(target, False, reason)

    def _record(self, target: CheckTarget, ok: bool, result: str, duration_ms: float, passive: int) -> None:
        with self._lock:
            st = self._states[target.index]
            st.checks += 1
            if not ok:
                st.failed_checks += 1
            st.consecutive = st.consecutive + 1 if st.last_ok is ok else 1
            st.last_ok = ok
            st.last_check = time.time()
            st.last_result = result
            st.last_duration_ms = round(duration_ms, 3)
            run = st.consecutive
            changed = (st.up and not ok and run >= self.fall) or (not st.up and ok and run >= self.rise)
            if not changed:
                return
            st.up = ok
            st.changes += 1
            st.since = st.last_check
            if ok:
                # The failures the engine counted before this round are answered by the
                # recovery; only new ones may mark the server down again.
                st.passive_base = passive
        if ok:
            log.info("server %s is UP after %s", target.name, _plural(run, "good check"))
        else:
            log.warning("server %s is DOWN after %s (last: %s)", target.name, _plural(run, "failed check"), result)
        self._notify(target, ok, result)

    def _notify(self, target: CheckTarget, up: bool, reason: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(target, up, reason)
        except Exception:
            log.exception("on_change callback for %s failed", target.name)

    # ------------------------------------------------------------------ queries

    def states(self) -> list[dict[str, Any]]:
        """A snapshot per target, in the order given."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for t in self.targets:
                st = self._states[t.index]
                out.append({
                    "index": t.index,
                    "server": t.name,
                    "up": st.up,
                    "checks": st.checks,
                    "failed_checks": st.failed_checks,
                    "consecutive": st.consecutive,
                    "last_check": st.last_check,
                    "last_result": st.last_result,
                    "last_duration_ms": st.last_duration_ms,
                    "changes": st.changes,
                    "since": st.since,
                })
        return out

    def is_up(self, index: int) -> bool:
        """The state of the target with this upstream index (KeyError for an unknown one)."""
        with self._lock:
            return self._states[index].up

    # ------------------------------------------------------------------ the check

    def check_once(self, target: CheckTarget) -> tuple[bool, str]:
        """One blocking check, `timeout` seconds at most in all: (True, "ok"), (True,
        "ok (CONNACK 0x05)") for a broker that refused the check's CONNECT, or (False, reason)."""
        deadline = time.monotonic() + self.timeout
        try:
            sock = self._connect(target.address, deadline)
        except _CheckFailed as e:
            return False, str(e)
        try:
            header = self._proxy_header(sock, target)
            if self.kind == "tcp":
                if header:
                    self._send(sock, header, deadline)
                return True, "ok"
            self._send(sock, header + self._connect_packet(target), deadline)
            code = self._read_connack(sock, deadline)
            try:
                sock.sendall(_DISCONNECT)  # so the broker logs a clean disconnect, not an error
            except OSError:
                pass
            return True, "ok" if code == 0 else f"ok (CONNACK 0x{code:02x})"
        except _CheckFailed as e:
            return False, str(e)
        except OSError as e:
            return False, e.strerror or str(e)
        except Exception as e:  # e.g. a PROXY header that cannot be built for this address
            return False, f"check error: {e}"
        finally:
            sock.close()

    def _connect(self, addr: Address, deadline: float) -> socket.socket:
        sock = socket.socket(addr.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(addr.path if addr.path is not None else (addr.host, addr.port))
        except (socket.timeout, TimeoutError):
            sock.close()
            raise _CheckFailed(f"connect timeout after {self.timeout}s") from None
        except ConnectionRefusedError:
            sock.close()
            raise _CheckFailed("connection refused") from None
        except OSError as e:
            sock.close()
            raise _CheckFailed(e.strerror or str(e)) from None
        if addr.path is None and sock.getsockname()[:2] == sock.getpeername()[:2]:
            # A loopback port with no listener, and the kernel picked that same port as our
            # source: TCP's simultaneous open connects the socket to itself. Nothing listens.
            sock.close()
            raise _CheckFailed("connection refused (connected to itself)")
        return sock

    def _proxy_header(self, sock: socket.socket, target: CheckTarget) -> bytes:
        mode = target.proxy_protocol
        if mode == "none":
            return b""
        if self.proxy_command == "local":
            return proxy_protocol.build_v1() if mode == "v1" else proxy_protocol.build_v2(command="local")
        if target.address.path is not None:
            src, dst = _UNIX_PEER, _UNIX_PEER
        else:
            src, dst = sock.getsockname()[:2], sock.getpeername()[:2]
        if mode == "v1":
            return proxy_protocol.build_v1(src, dst)
        ssl = None
        if mode in ("v2-ssl", "v2-ssl-cn"):
            ssl = proxy_protocol.SSLInfo(
                client=proxy_protocol.PP2_CLIENT_SSL | proxy_protocol.PP2_CLIENT_CERT_CONN
                | proxy_protocol.PP2_CLIENT_CERT_SESS,
                verify=0, version="TLSv1.3", cn=self.identity if mode == "v2-ssl-cn" else None)
        return proxy_protocol.build_v2(src, dst, ssl=ssl)

    def _connect_packet(self, target: CheckTarget) -> bytes:
        cid = f"{self.client_id_prefix}-{os.getpid()}-{target.index}".encode()
        body = _CONNECT_VARIABLE_HEADER + len(cid).to_bytes(2, "big") + cid
        return b"\x10" + _varint(len(body)) + body

    def _send(self, sock: socket.socket, data: bytes, deadline: float) -> None:
        # One sendall: Mosquitto 2.1 drops a PROXY header that arrives split from the CONNECT.
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.sendall(data)
        except (socket.timeout, TimeoutError):
            raise _CheckFailed(f"send timeout after {self.timeout}s") from None

    def _read_connack(self, sock: socket.socket, deadline: float) -> int:
        """Read exactly the 4 bytes of a CONNACK (nothing past it); return its code."""
        buf = b""
        while len(buf) < 4:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _CheckFailed(f"CONNACK timeout after {self.timeout}s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(4 - len(buf))
            except (socket.timeout, TimeoutError):
                raise _CheckFailed(f"CONNACK timeout after {self.timeout}s") from None
            if not chunk:
                raise _CheckFailed("closed before CONNACK")
            buf += chunk
            if buf[0] != _CONNACK:
                raise _CheckFailed(f"not a CONNACK (first byte 0x{buf[0]:02x})")
            if len(buf) >= 2 and buf[1] != _CONNACK_REMAINING:
                raise _CheckFailed(f"malformed CONNACK (remaining length {buf[1]})")
        return buf[3]
