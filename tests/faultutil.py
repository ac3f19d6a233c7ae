"""Helpers for tests/test_faults.py and tests/test_soak.py: a fleet of MQTT devices driven by one
selector loop (thousands of TLS sessions from one test process), broker restarts on the same
port, descriptor counts of a proxy and its workers, the admin status JSON.

Loopback only; every wait is bounded.
"""
from __future__ import annotations

import collections
import errno
import heapq
import json
import os
import random
import selectors
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

import proxyutil as U

HOST = U.HOST
CONNACK_OK = b"\x20\x02\x00\x00"
PINGRESP = b"\xd0\x00"

# device states
IDLE, TCP, HANDSHAKE, CONNACK, HELD, WAIT, DONE = range(7)
IN_PROGRESS = (TCP, HANDSHAKE, CONNACK)


# ----------------------------------------------------------------------------- processes


def fd_count(pid: int) -> int:
    """Open descriptors of one process (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def family_fds(pid: int) -> int:
    """Open descriptors of pid and every process below it (a master and its workers)."""
    return fd_count(pid) + sum(fd_count(c) for c in U.descendants(pid))


def family_rss_kib(pid: int) -> int:
    total = 0
    for p in {pid} | U.descendants(pid):
        try:
            total += U.rss_kib(p)
        except (OSError, AssertionError):
            pass
    return total


def restart_broker(broker, *, kill: bool = True, timeout: float = 10.0) -> None:
    """SIGKILL the broker (or leave it dead when kill=False and it already is) and start the same
    configuration again: same port, same log file (appended). broker.proc is replaced, so the
    fixture's teardown stops the new process."""
    from conftest import MOSQUITTO

    if kill and broker.proc.poll() is None:
        broker.proc.kill()
    broker.proc.wait(5)
    workdir = os.path.dirname(broker.conf_path)
    with open(os.path.join(workdir, "mosquitto.stderr"), "ab") as err:
        broker.proc = subprocess.Popen([MOSQUITTO, "-c", broker.conf_path], stdin=subprocess.DEVNULL,
                                       stdout=err, stderr=err, preexec_fn=U._preexec_raise_nofile)
    deadline = time.monotonic() + timeout
    while not U.port_is_listening(broker.port):
        if broker.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"restarted mosquitto on port {broker.port} did not listen "
                                 f"(exit {broker.proc.poll()}):\n{broker.log()[-2000:]}")
        time.sleep(0.02)


def http_status(admin: str, timeout: float = 3.0) -> dict | None:
    """The proxy's status JSON from its admin endpoint; None if it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{admin}/status", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def server_up(admin: str, server: str) -> bool | None:
    st = http_status(admin)
    if st is None:
        return None
    for s in st["servers"]:
        if s["server"] == server:
            return s["up"]
    return None


def wait_server_up(admin: str, server: str, up: bool, timeout: float = 15.0) -> None:
    U.wait_until(lambda: server_up(admin, server) is up, timeout, interval=0.05,
                 what=f"admin status to show {server} up={up}")


def no_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" not in text


def kill_tree(pid: int) -> None:
    """SIGKILL pid and its descendants (cleanup after a failed test; only our own processes)."""
    for p in [pid, *U.descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


# ----------------------------------------------------------------------------- the fleet


class Device:
    __slots__ = ("i", "client_id", "sock", "state", "buf", "deadline", "connacks", "refusals", "failures",
                 "eofs", "churned", "last_error", "next_ping", "next_pub", "pings_out", "pongs")

    def __init__(self, i: int, client_id: str) -> None:
        self.i = i
        self.client_id = client_id
        self.sock = None
        self.state = IDLE
        self.buf = b""
        self.deadline = 0.0
        self.connacks = 0      # CONNACK 0 received (sessions established)
        self.refusals = 0      # CONNACK with another code
        self.failures = 0      # refused / reset / handshake failure / timeout before a CONNACK
        self.eofs = 0          # held sessions closed by the far side
        self.churned = 0       # held sessions this fleet closed itself (churn)
        self.last_error = ""
        self.next_ping = 0.0
        self.next_pub = 0.0
        self.pings_out = 0
        self.pongs = 0


class Fleet:
    """n MQTT 3.1.1 devices through a (TLS) proxy port, driven by one selector thread.

    Each device: TCP connect, TLS handshake (when ctx), CONNECT (`U.connect_packet`), CONNACK;
    then it holds its session. With `reconnect`, a device whose session ends, or whose attempt
    fails (refused, reset, CONNACK refused, no answer within `attempt_timeout`), tries again
    after a random backoff. At most `concurrency` attempts are in flight at once.
    `ping_every` (seconds, jittered) sends PINGREQ on held sessions; `publish_every` sends a QoS 0
    PUBLISH to `fleet/<ClientId>`. `churn(k)` closes k held sessions (DISCONNECT) and reconnects
    them at once. All counters are read without a lock (ints under the GIL)."""

    def __init__(self, port: int, n: int, *, ctx: ssl.SSLContext | None, prefix: str = "dev",
                 keepalive: int = 0, concurrency: int = 200, reconnect: bool = True,
                 backoff: tuple[float, float] = (0.1, 1.0), attempt_timeout: float = 15.0,
                 ping_every: float | None = None, publish_every: float | None = None,
                 seed: int = 1) -> None:
        self.port, self.ctx, self.keepalive = port, ctx, keepalive
        self.concurrency, self.reconnect, self.backoff = concurrency, reconnect, backoff
        self.attempt_timeout = attempt_timeout
        self.ping_every, self.publish_every = ping_every, publish_every
        self.devices = [Device(i, f"{prefix}-{i:05d}") for i in range(n)]
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.ready: collections.deque[Device] = collections.deque(self.devices)
        self.timers: list[tuple[float, int, Device]] = []
        self._seq = 0
        self.in_flight = 0
        self.held = 0
        self.attempts = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.loop_error: BaseException | None = None
        self._cmds: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._paused = False
        self.thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    # ---------------------------------------------------------------- control (any thread)

    def start(self) -> "Fleet":
        self.thread.start()
        return self

    def churn(self, k: int) -> None:
        self._cmds.append(("churn", k))

    def pause_connecting(self, paused: bool = True) -> None:
        """Stop (or resume) starting new attempts; held sessions stay."""
        self._cmds.append(("pause", paused))

    def close(self, disconnect: bool = False, timeout: float = 30.0) -> None:
        """Stop the loop and close every socket (optionally after a DISCONNECT)."""
        self._cmds.append(("close", disconnect))
        self._stop.set()
        self.thread.join(timeout)
        for d in self.devices:  # if the loop thread died or hung
            if d.sock is not None:
                try:
                    d.sock.close()
                except OSError:
                    pass
                d.sock = None
        try:
            self.sel.close()
        except (OSError, ValueError):
            pass

    # ---------------------------------------------------------------- figures (any thread)

    def connacks(self) -> int:
        return sum(d.connacks for d in self.devices)

    def devices_with(self, pred) -> list[Device]:
        return [d for d in self.devices if pred(d)]

    def summary(self) -> str:
        states = collections.Counter(d.state for d in self.devices)
        names = {IDLE: "idle", TCP: "tcp", HANDSHAKE: "handshake", CONNACK: "connack", HELD: "held",
                 WAIT: "backoff", DONE: "done"}
        return (f"held={self.held} in_flight={self.in_flight} attempts={self.attempts} "
                f"states={ {names[k]: v for k, v in states.items()} } "
                f"connacks={self.connacks()} errors={dict(self.errors.most_common(8))}"
                + (f" LOOP ERROR {self.loop_error!r}" if self.loop_error else ""))

    def wait(self, pred, timeout: float, what: str, interval: float = 0.1):
        def check():
            if self.loop_error is not None:
                raise AssertionError(f"fleet loop died: {self.loop_error!r}")
            return pred()
        try:
            return U.wait_until(check, timeout, interval=interval, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\nfleet: {self.summary()}") from None

    def wait_held(self, n: int, timeout: float) -> None:
        self.wait(lambda: self.held >= n, timeout, f"{n} held sessions")

    # ---------------------------------------------------------------- the loop

    def _run(self) -> None:
        try:
            last_check = 0.0
            while True:
                while self._cmds:
                    cmd, arg = self._cmds.popleft()
                    if cmd == "churn":
                        self._do_churn(arg)
                    elif cmd == "pause":
                        self._paused = arg
                    elif cmd == "close":
                        self._close_all(arg)
                        return
                if self._stop.is_set():
                    self._close_all(False)
                    return
                now = time.monotonic()
                while self.timers and self.timers[0][0] <= now:
                    _, _, d = heapq.heappop(self.timers)
                    if d.state == WAIT:
                        d.state = IDLE
                        self.ready.append(d)
                while not self._paused and self.ready and self.in_flight < self.concurrency:
                    self._begin(self.ready.popleft(), now)
                timeout = 0.05
                if self.timers:
                    timeout = max(0.0, min(timeout, self.timers[0][0] - now))
                for key, mask in self.sel.select(timeout):
                    self._event(key.data, mask)
                now = time.monotonic()
                if now - last_check >= 0.2:
                    last_check = now
                    self._periodic(now)
        except BaseException as e:  # surfaced by wait()/summary()
            self.loop_error = e

    def _schedule_retry(self, d: Device, now: float) -> None:
        if not self.reconnect:
            d.state = DONE
            return
        d.state = WAIT
        self._seq += 1
        heapq.heappush(self.timers, (now + self.rng.uniform(*self.backoff), self._seq, d))

    def _drop(self, d: Device) -> None:
        if d.sock is not None:
            try:
                self.sel.unregister(d.sock)
            except (KeyError, ValueError):
                pass
            try:
                d.sock.close()
            except OSError:
                pass
            d.sock = None
        if d.state in IN_PROGRESS:
            self.in_flight -= 1
        elif d.state == HELD:
            self.held -= 1
        d.buf = b""

    def _fail(self, d: Device, why: str) -> None:
        self._drop(d)
        d.failures += 1
        d.last_error = why
        self.errors[why] += 1
        self._schedule_retry(d, time.monotonic())

    def _begin(self, d: Device, now: float) -> None:
        self.attempts += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        d.sock, d.state, d.deadline, d.buf = s, TCP, now + self.attempt_timeout, b""
        self.in_flight += 1
        err = s.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(d, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.sel.register(s, selectors.EVENT_WRITE, d)

    def _event(self, d: Device, mask: int) -> None:
        if d.sock is None:
            return
        if d.state == TCP:
            err = d.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(d, f"connect: {errno.errorcode.get(err, err)}")
                return
            if self.ctx is None:
                self._send_connect(d)
                return
            self.sel.unregister(d.sock)
            raw = d.sock
            try:
                d.sock = self.ctx.wrap_socket(raw, server_hostname=HOST, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as e:
                d.sock = raw
                self._fail(d, f"wrap: {type(e).__name__}")
                return
            d.state = HANDSHAKE
            self.sel.register(d.sock, selectors.EVENT_READ, d)
            self._handshake(d)
        elif d.state == HANDSHAKE:
            self._handshake(d)
        else:
            self._read(d)

    def _handshake(self, d: Device) -> None:
        try:
            d.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.sel.modify(d.sock, selectors.EVENT_READ, d)
            return
        except ssl.SSLWantWriteError:
            self.sel.modify(d.sock, selectors.EVENT_WRITE, d)
            return
        except (ssl.SSLError, OSError) as e:
            self._fail(d, f"handshake: {type(e).__name__}")
            return
        self._send_connect(d)

    def _send_connect(self, d: Device) -> None:
        try:
            d.sock.send(U.connect_packet(d.client_id, keepalive=self.keepalive))
        except (ssl.SSLError, OSError) as e:
            self._fail(d, f"send connect: {type(e).__name__}")
            return
        d.state = CONNACK
        self.sel.modify(d.sock, selectors.EVENT_READ, d)
        self._read(d)

    def _read(self, d: Device) -> None:
        eof = None
        while True:
            try:
                chunk = d.sock.recv(4096)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            except ssl.SSLWantWriteError:
                break
            except (ssl.SSLError, OSError) as e:
                eof = f"reset: {type(e).__name__}"
                break
            if not chunk:
                eof = "eof"
                break
            d.buf += chunk
        if d.state == CONNACK and len(d.buf) >= 4:
            if d.buf[:4] == CONNACK_OK:
                d.buf = d.buf[4:]
                d.connacks += 1
                self.in_flight -= 1
                self.held += 1
                d.state = HELD
                now = time.monotonic()
                if self.ping_every:
                    d.next_ping = now + self.rng.uniform(0.5, 1.0) * self.ping_every
                if self.publish_every:
                    d.next_pub = now + self.rng.uniform(0.0, 1.0) * self.publish_every
            else:
                d.refusals += 1
                self._fail(d, f"connack {d.buf[:4].hex()}")
                return
        if d.state == HELD and d.buf:
            while d.buf.startswith(PINGRESP):
                d.pongs += 1
                d.buf = d.buf[2:]
        if eof is not None:
            if d.state == HELD:
                self._drop(d)
                d.eofs += 1
                self._schedule_retry(d, time.monotonic())
            else:
                self._fail(d, f"before connack: {eof}")

    def _periodic(self, now: float) -> None:
        for d in self.devices:
            if d.state in IN_PROGRESS and now > d.deadline:
                self._fail(d, "attempt timeout")
            elif d.state == HELD:
                out = b""
                if self.ping_every and now >= d.next_ping:
                    out += U.PINGREQ
                    d.pings_out += 1
                    d.next_ping = now + self.rng.uniform(0.8, 1.2) * self.ping_every
                if self.publish_every and now >= d.next_pub:
                    out += U.publish_packet(f"fleet/{d.client_id}", b"x" * 32)
                    d.next_pub = now + self.rng.uniform(0.5, 1.5) * self.publish_every
                if out:
                    try:
                        d.sock.send(out)
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                        pass  # a tiny write on a quiet socket: not expected; the next one goes
                    except (ssl.SSLError, OSError):
                        self._drop(d)
                        d.eofs += 1
                        self._schedule_retry(d, now)

    def _do_churn(self, k: int) -> None:
        held = [d for d in self.devices if d.state == HELD]
        for d in self.rng.sample(held, min(k, len(held))):
            try:
                d.sock.send(U.DISCONNECT)
            except (ssl.SSLError, OSError):
                pass
            self._drop(d)
            d.churned += 1
            d.state = IDLE
            self.ready.append(d)

    def _close_all(self, disconnect: bool) -> None:
        for d in self.devices:
            if d.sock is not None:
                if disconnect and d.state == HELD:
                    try:
                        d.sock.send(U.DISCONNECT)
                    except (ssl.SSLError, OSError):
                        pass
                self._drop(d)
            d.state = DONE
        self.ready.clear()
