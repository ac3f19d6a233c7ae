"""Active health checks (fastproxy.health) against a real Mosquitto — frozen with SIGSTOP for the
"hung broker" cases — and against a small recording server for the bytes on the wire.

Only loopback addresses; every wait is bounded; every SIGSTOP is undone in a finally.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import pytest

import mqtt_reference as MR
import proxyutil as U

pp = pytest.importorskip("fastproxy.proxy_protocol")
pytest.importorskip("fastproxy._proxyproto", reason="compiled module not built")

from fastproxy.config import Address  # noqa: E402
from fastproxy.errors import ConfigError  # noqa: E402
from fastproxy.health import CheckTarget, HealthChecker  # noqa: E402

CONNACK_OK = b"\x20\x02\x00\x00"
DISCONNECT = b"\xe0\x00"
PREFIX = "hc-test"


def client_id(index: int) -> str:
    return f"{PREFIX}-{os.getpid()}-{index}"


def target_of(broker, index: int = 0, proxy_protocol: str = "none") -> CheckTarget:
    addr = Address(path=broker.path) if broker.path else Address(broker.host, broker.port)
    return CheckTarget(index, addr, proxy_protocol)


@contextmanager
def frozen(broker) -> Iterator[None]:
    """SIGSTOP the broker for the block (the kernel still completes TCP handshakes); always SIGCONT."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


class Changes:
    """on_change recorder: [(up, reason), ...] in call order, with the targets seen."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []
        self.targets: list[CheckTarget] = []
        self.lock = threading.Lock()

    def __call__(self, target: CheckTarget, up: bool, reason: str) -> None:
        with self.lock:
            self.calls.append((up, reason))
            self.targets.append(target)

    def ups(self) -> list[bool]:
        with self.lock:
            return [up for up, _ in self.calls]


@pytest.fixture
def upstream_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the fastproxy.upstream logger, whatever the rest of the logging set-up is."""
    records: list[logging.LogRecord] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("fastproxy.upstream")
    h, old = H(level=logging.DEBUG), logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(h)
    logger.setLevel(old)


@pytest.fixture
def checkers() -> Iterator[list[HealthChecker]]:
    """Started checkers are stopped at teardown, before the brokers are."""
    made: list[HealthChecker] = []
    yield made
    for hc in made:
        hc.stop(timeout=3)


# ----------------------------------------------------------------------------- a recording server


@dataclass
class Session:
    peer: object                  # the checker socket's address as the server sees it
    first: bytes = b""            # the first recv(): the PROXY header and CONNECT must both be in it
    data: bytearray = field(default_factory=bytearray)
    accepted_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class CheckServer(U.ThreadedServer):
    """A loopback (or unix-socket) server for the checker: keeps what each connection sent and
    answers its first bytes with `reply` (None: never answer; b"": close at once), then reads
    until the checker closes (or, with close=True, closes right after the reply)."""

    def __init__(self, reply: bytes | None = CONNACK_OK, *, close: bool = False, path: str | None = None) -> None:
        self.reply = reply
        self.close_after_reply = close
        self.sessions: list[Session] = []
        super().__init__(path=path, poll=0.1, join_timeout=3)
        self.address = Address(path=path) if path else Address(U.HOST, self.port)

    def on_accept(self, peer) -> Session:
        s = Session(peer, accepted_at=time.monotonic())
        self.sessions.append(s)
        return s

    def handle(self, conn: socket.socket, peer, s: Session) -> None:
        conn.settimeout(5)
        try:
            with conn:
                s.first = conn.recv(65536)
                s.data += s.first
                if self.reply == b"" or not s.first:
                    return
                if self.reply is not None:
                    conn.sendall(self.reply)
                    if self.close_after_reply:
                        return
                while chunk := conn.recv(65536):
                    s.data += chunk
        except OSError:
            pass
        finally:
            s.done.set()

    def session(self, n: int = 0, timeout: float = 5.0) -> Session:
        U.wait_until(lambda: len(self.sessions) > n, timeout, what=f"connection #{n + 1}")
        s = self.sessions[n]
        assert s.done.wait(timeout), "the checker did not close its connection"
        return s


@pytest.fixture
def check_server() -> Iterator:
    made: list[CheckServer] = []

    def make(reply: bytes | None = CONNACK_OK, **kw) -> CheckServer:
        srv = CheckServer(reply, **kw)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def split_connect(data: bytes) -> tuple[dict, bytes]:
    """The CONNECT at the start of data, decoded by the tests' reference parser; and what follows."""
    r = MR.parse(data)
    assert r.status == "valid", (r.status, r.reason, data)
    n = 2 + data[1]  # short packet: one length byte
    return r.fields, data[n:]


# ----------------------------------------------------------------------------- the MQTT check


def test_check_once_real_broker_connects_and_disconnects_cleanly(mosquitto_factory):
    broker = mosquitto_factory()
    hc = HealthChecker([], client_id_prefix=PREFIX)
    assert hc.check_once(target_of(broker, 7)) == (True, "ok")
    cid = client_id(7)
    U.wait_until(lambda: f"Client {cid} disconnected." in broker.log(), 5, what="the broker's log")
    log = broker.log()
    assert cid in U.broker_client_ids(log)
    assert f"Received DISCONNECT from {cid}" in log  # a clean MQTT disconnect, not a dropped socket
    assert f"{cid} (p2, c1, k0)" in log  # MQTT 3.1.1, clean session, keepalive 0


def test_check_once_closed_port_is_refused():
    hc = HealthChecker([])
    assert hc.check_once(CheckTarget(0, Address(U.HOST, U.free_port()))) == (False, "connection refused")


def test_check_once_frozen_broker_times_out_waiting_for_connack(mosquitto_factory):
    broker = mosquitto_factory()
    hc = HealthChecker([], timeout=0.5)
    with frozen(broker):
        t0 = time.monotonic()
        result = hc.check_once(target_of(broker))
        took = time.monotonic() - t0
    assert result == (False, "CONNACK timeout after 0.5s")
    assert 0.4 < took < 1.5  # bounded by the timeout overall


def test_tcp_check_passes_a_frozen_broker_that_the_mqtt_check_catches(mosquitto_factory):
    broker = mosquitto_factory()
    tcp = HealthChecker([], timeout=0.5, kind="tcp")
    mqtt = HealthChecker([], timeout=0.5)
    with frozen(broker):
        assert tcp.check_once(target_of(broker)) == (True, "ok")
        assert mqtt.check_once(target_of(broker)) == (False, "CONNACK timeout after 0.5s")


def test_check_once_unix_socket_broker(mosquitto_factory):
    broker = mosquitto_factory(unix=True)
    hc = HealthChecker([], client_id_prefix=PREFIX)
    assert hc.check_once(target_of(broker, 3)) == (True, "ok")
    U.wait_until(lambda: f"Client {client_id(3)} disconnected." in broker.log(), 5, what="the broker's log")


@pytest.mark.parametrize("reply, close, expected", [
    (b"\x20\x02\x00\x05", False, (True, "ok (CONNACK 0x05)")),  # "not authorized": up, speaking MQTT
    (b"\x30\x02\x00\x00", False, (False, "not a CONNACK (first byte 0x30)")),
    (b"\x20\x03\x00\x00\x00", False, (False, "malformed CONNACK (remaining length 3)")),
    (b"", True, (False, "closed before CONNACK")),
    (b"\x20\x02", True, (False, "closed before CONNACK")),
    (b"\x20\x02", False, (False, "CONNACK timeout after 0.3s")),
    (None, False, (False, "CONNACK timeout after 0.3s")),
])
def test_check_once_answers(check_server, reply, close, expected):
    srv = check_server(reply, close=close)
    hc = HealthChecker([], timeout=0.3)
    assert hc.check_once(CheckTarget(0, srv.address)) == expected


# ----------------------------------------------------------------------------- PROXY headers


@pytest.mark.parametrize("mode", ["v2", "v2-ssl", "v2-ssl-cn"])
def test_proxy_v2_header_carries_the_checkers_addresses(check_server, mode):
    srv = check_server()
    hc = HealthChecker([], client_id_prefix=PREFIX)
    assert hc.check_once(CheckTarget(4, srv.address, mode)) == (True, "ok")
    s = srv.session()
    hdr = pp.parse(s.first)
    assert hdr is not None and hdr.version == 2 and hdr.command == "PROXY"
    assert (hdr.family, hdr.transport) == ("INET", "STREAM")
    assert (hdr.src_addr, hdr.src_port) == s.peer
    assert (hdr.dst_addr, hdr.dst_port) == (U.HOST, srv.address.port)
    if mode == "v2":
        assert hdr.tlvs == () and hdr.ssl is None
    else:
        # as for a device with a verified certificate: receivers that require TLS and a
        # certificate (Mosquitto 2.1) answer the CONNECT instead of refusing the check
        assert hdr.ssl.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
        assert (hdr.ssl.verify, hdr.ssl.version) == (0, "TLSv1.3")
        assert hdr.ssl.cn == ("fastproxy-health" if mode == "v2-ssl-cn" else None)
    # header and CONNECT arrived in one read: Mosquitto 2.1 drops a header split from the CONNECT
    fields, rest = split_connect(s.first[hdr.length:])
    assert (fields["client_id"], fields["version"], fields["clean_start"], fields["keepalive"]) == \
        (client_id(4), 4, True, 0)
    assert fields["username"] is None
    assert rest == b"" and bytes(s.data[len(s.first):]) == DISCONNECT


def test_proxy_v1_header(check_server):
    srv = check_server()
    hc = HealthChecker([])
    assert hc.check_once(CheckTarget(0, srv.address, "v1")) == (True, "ok")
    s = srv.session()
    assert s.first.startswith(b"PROXY TCP4 ")
    hdr = pp.parse(s.first)
    assert hdr is not None and hdr.version == 1 and hdr.command == "PROXY"
    assert (hdr.src_addr, hdr.src_port) == s.peer
    assert (hdr.dst_addr, hdr.dst_port) == (U.HOST, srv.address.port)
    split_connect(s.first[hdr.length:])


def test_health_check_identity_is_the_cn_sent(check_server):
    srv = check_server()
    hc = HealthChecker([], identity="probe-7")
    assert hc.check_once(CheckTarget(0, srv.address, "v2-ssl-cn")) == (True, "ok")
    assert pp.parse(srv.session().first).ssl.cn == "probe-7"


@pytest.mark.parametrize("mode, header", [("v2", pp.build_v2(command="local")), ("v1", b"PROXY UNKNOWN\r\n")])
def test_proxy_command_local(check_server, mode, header):
    srv = check_server()
    hc = HealthChecker([], proxy_command="local")
    assert hc.check_once(CheckTarget(0, srv.address, mode)) == (True, "ok")
    s = srv.session()
    assert s.first.startswith(header)
    hdr = pp.parse(s.first)
    assert hdr is not None
    assert hdr.command == ("LOCAL" if mode == "v2" else "PROXY") and hdr.src_addr is None
    split_connect(s.first[hdr.length:])


def test_proxy_header_to_a_unix_socket_server(check_server, tmp_path):
    srv = check_server(path=str(tmp_path / "b.sock"))
    hc = HealthChecker([])
    assert hc.check_once(CheckTarget(0, srv.address, "v2")) == (True, "ok")
    hdr = pp.parse(srv.session().first)
    assert hdr is not None and hdr.command == "PROXY"
    assert (hdr.src, hdr.dst) == ((U.HOST, 0), (U.HOST, 0))


def test_tcp_check_sends_only_the_header(check_server):
    srv = check_server()
    hc = HealthChecker([], kind="tcp")
    assert hc.check_once(CheckTarget(0, srv.address, "v2")) == (True, "ok")
    s = srv.session()
    hdr = pp.parse(s.first)
    assert hdr is not None and bytes(s.data) == s.first[:hdr.length]


# ----------------------------------------------------------------------------- the state machine


def test_state_machine_down_on_freeze_and_up_on_thaw(mosquitto_factory, checkers, upstream_log):
    broker = mosquitto_factory()
    changes = Changes()
    t = target_of(broker, 5)
    hc = HealthChecker([t], interval=0.2, timeout=0.5, rise=2, fall=2, on_change=changes)
    checkers.append(hc)
    hc.start()
    assert any(th.name == f"fastproxy-health-{t.name}" for th in threading.enumerate())
    U.wait_until(lambda: hc.states()[0]["checks"] >= 2, 5, what="two checks")
    st = hc.states()[0]
    assert (st["index"], st["server"], st["up"], st["last_result"], st["changes"]) == (5, t.name, True, "ok", 0)
    assert changes.calls == [] and hc.is_up(5)

    with frozen(broker):
        U.wait_until(lambda: changes.ups(), 5, what="the DOWN change")
        st = hc.states()[0]
        assert changes.calls == [(False, "CONNACK timeout after 0.5s")]
        assert changes.targets == [t]
        assert not st["up"] and not hc.is_up(5)
        assert "timeout" in st["last_result"] and st["consecutive"] >= 2 and st["failed_checks"] >= 2
        assert st["changes"] == 1
    U.wait_until(lambda: len(changes.ups()) >= 2, 5, what="the UP change")
    assert changes.ups() == [False, True]
    assert hc.is_up(5) and hc.states()[0]["changes"] == 2

    lines = [(r.levelno, r.getMessage()) for r in upstream_log]
    assert lines == [
        (logging.WARNING, f"server {t.name} is DOWN after 2 failed checks (last: CONNACK timeout after 0.5s)"),
        (logging.INFO, f"server {t.name} is UP after 2 good checks"),
    ]
    t0 = time.monotonic()
    hc.stop()
    assert time.monotonic() - t0 < 1.5
    assert not any(th.name.startswith("fastproxy-health-") and th.is_alive() for th in threading.enumerate())


def test_passive_failures_mark_down_at_once_and_checks_bring_it_back(mosquitto_factory, checkers, upstream_log):
    broker = mosquitto_factory()
    changes = Changes()
    failures = {0: 5}   # the engine's count of consecutive failed connects from client sessions
    hc = HealthChecker([target_of(broker)], interval=0.1, timeout=0.5, rise=2, fall=3,
                       on_change=changes, passive_failures=failures.__getitem__)
    checkers.append(hc)
    hc.start()
    U.wait_until(lambda: len(changes.ups()) >= 2, 5, what="DOWN then UP")
    assert changes.calls == [(False, "5 consecutive connect failures from client sessions"), (True, "ok")]
    assert hc.states()[0]["failed_checks"] == 0  # no active check failed
    assert upstream_log[0].levelno == logging.WARNING and "5 consecutive connect failures" in upstream_log[0].getMessage()

    # The engine's count stays at 5 while nobody connects: the old failures do not count again.
    n = hc.states()[0]["checks"]
    U.wait_until(lambda: hc.states()[0]["checks"] >= n + 3, 5, what="three more checks")
    assert changes.ups() == [False, True] and hc.is_up(0)

    # Three new failures (fall) do.
    failures[0] = 8
    U.wait_until(lambda: len(changes.ups()) >= 4, 5, what="DOWN then UP again")
    assert changes.ups() == [False, True, False, True]
    assert changes.calls[2] == (False, "8 consecutive connect failures from client sessions")


def test_interval_is_measured_from_the_start_of_each_check(check_server, checkers):
    srv = check_server(reply=None)   # every check waits the full timeout for a CONNACK
    hc = HealthChecker([CheckTarget(0, srv.address)], interval=0.5, timeout=0.3, fall=100)
    checkers.append(hc)
    hc.start()
    U.wait_until(lambda: len(srv.sessions) >= 3, 5, what="three checks")
    hc.stop()
    starts = [s.accepted_at for s in srv.sessions[:3]]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0.4 < g < 0.7 for g in gaps), gaps  # not 0.5 + 0.3


def test_a_failing_callback_does_not_stop_the_checks(checkers, upstream_log):
    def boom(target: CheckTarget, up: bool, reason: str) -> None:
        raise RuntimeError("callback bug")

    hc = HealthChecker([CheckTarget(0, Address(U.HOST, U.free_port()))], interval=0.05, timeout=0.5,
                       fall=1, on_change=boom)
    checkers.append(hc)
    hc.start()
    U.wait_until(lambda: hc.states()[0]["checks"] >= 3, 5, what="checks after the callback failed")
    st = hc.states()[0]
    assert not st["up"] and st["last_result"] == "connection refused" and st["changes"] == 1
    assert any(r.exc_info and "on_change" in r.getMessage() for r in upstream_log)


def test_arguments_are_validated():
    t = CheckTarget(0, Address(U.HOST, 1883))
    for kw in ({"interval": 0}, {"timeout": -1}, {"rise": 0}, {"fall": 0}, {"kind": "http"},
               {"proxy_command": "unknown"}):
        with pytest.raises(ConfigError):
            HealthChecker([t], **kw)
    with pytest.raises(ValueError):
        HealthChecker([CheckTarget(0, Address(U.HOST, 1883), "v3")])
    with pytest.raises(ValueError):
        HealthChecker([t, CheckTarget(0, Address(U.HOST, 1884))])
    with pytest.raises(KeyError):
        HealthChecker([t]).is_up(1)
    assert CheckTarget(0, Address(path="/run/m.sock")).name == "unix:/run/m.sock"


# ----------------------------------------------------------------------------- the default check


@pytest.mark.parametrize("check", [None, "mqtt"])
def test_mqtt_off_checks_with_tcp_by_default(check, certs, mosquitto_factory, start_proxy):
    """--mqtt off in front of a broker that speaks TLS itself (a blind relay): the default check
    is a TCP check, which keeps the server UP and the devices served; an explicit MQTT check
    (plain CONNECT to a TLS port) marks it DOWN, which is why it is not the default."""
    broker = mosquitto_factory(extra=[f"certfile {certs.server_cert}", f"keyfile {certs.server_key}"])
    flags = ["--health-check", check] if check else []
    fp = start_proxy(broker, "--mqtt", "off", "--health-interval", "0.1", "--health-timeout", "0.5", *flags,
                     tls=False)
    if check == "mqtt":
        U.wait_until(lambda: "is DOWN" in fp.stderr(), 10, what="the server marked DOWN")
        return
    time.sleep(1.0)  # 10 intervals: 3 failed checks would have marked it DOWN
    assert "DOWN" not in fp.stderr(), fp.stderr()[-2000:]
    assert U.paho_connack(fp.port, certs, "through-blind-relay", timeout=5) == 0
