"""MQTT over WebSocket (issue 11): browsers' clients reach a plain-TCP broker through
fastproxy (bridged), with the same identity rules as mqtts.

Real Mosquitto with only its TCP listener, real paho-mqtt clients with transport="websockets"
(3.1.1 and 5.0, ws and wss), and raw sockets for the exact bytes of the handshake and the
frames (RFC 6455). Loopback only; every wait is bounded.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import threading
import time

import pytest

import proxyutil as U
from mqtt_reference import encode_connect
from recorder import Recorder

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ----------------------------------------------------------------------------- raw WebSocket client


def upgrade_request(path: str = "/mqtt", *, key: bytes | None = None, protocols: str | None = "mqtt",
                    version: str = "13", method: str = "GET", extra: str = "") -> tuple[bytes, bytes]:
    key = key or base64.b64encode(os.urandom(16))
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key.decode()}", f"Sec-WebSocket-Version: {version}"]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode(), key


def read_http(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names), and any bytes after the blank line."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    if n < 126:
        hdr = bytes([b0, (0x80 if mask else 0) | n])
    elif n < 65536:
        hdr = bytes([b0, (0x80 if mask else 0) | 126]) + struct.pack("!H", n)
    else:
        hdr = bytes([b0, (0x80 if mask else 0) | 127]) + struct.pack("!Q", n)
    if not mask:
        return hdr + payload
    key = os.urandom(4)
    return hdr + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


class WsClient:
    """A raw WebSocket client over TCP (or TLS) that keeps what it reads."""

    def __init__(self, port: int, *, tls_ctx: ssl.SSLContext | None = None, source: str | None = None,
                 timeout: float = 10.0, rcvbuf: int | None = None) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            s.bind((source, 0))
        s.connect((U.HOST, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls_ctx.wrap_socket(s, server_hostname=U.HOST) if tls_ctx else s
        self.buf = b""      # bytes read, not yet parsed as frames
        self.mqtt = b""     # frame payloads, not yet parsed as MQTT packets

    def upgrade(self, **kw) -> tuple[int, dict[str, str]]:
        req, key = upgrade_request(**kw)
        self.sock.sendall(req)
        status, headers, self.buf = read_http(self.sock)
        if status == 101:
            want = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
            assert headers.get("sec-websocket-accept") == want, headers
        return status, headers

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._need(2)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8))[0]
        return bool(b0 & 0x80), b0 & 0x0F, self._need(n)

    def read_mqtt(self) -> tuple[int, bytes]:
        """The next MQTT packet, from the payloads of binary frames: (type, body)."""
        while True:
            data = self.mqtt
            if len(data) >= 2:
                rl, i = 0, 1
                while i < len(data) and i <= 4:
                    rl |= (data[i] & 0x7F) << (7 * (i - 1))
                    i += 1
                    if not data[i - 1] & 0x80:
                        if len(data) >= i + rl:
                            self.mqtt = data[i + rl:]
                            return data[0] >> 4, data[i:i + rl]
                        break
            fin, op, payload = self.read_frame()
            assert op in (0x2, 0x0), f"expected a binary frame, got opcode {op} {payload!r}"
            self.mqtt += payload

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionError, ssl.SSLError, OSError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def ws_clients():
    made: list[WsClient] = []

    def make(*a, **kw) -> WsClient:
        c = WsClient(*a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def ws_proxy(start_proxy, broker, *flags, tls: bool = False, **kw):
    return start_proxy(broker, "--websocket", *flags, tls=tls, **kw)


# ----------------------------------------------------------------------------- paho over WebSocket


def paho_ws(port: int, client_id: str, *, version: int, certs=None, cert=None, key=None, path="/mqtt"):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, transport="websockets",
                    protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311, reconnect_on_failure=False)
    c.ws_set_options(path=path)
    if certs is not None:
        c.tls_set(ca_certs=certs.ca_cert, certfile=cert, keyfile=key)
    return c


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_paho_over_websocket_to_a_tcp_only_broker(scheme, version, certs, mosquitto, start_proxy):
    """paho-mqtt (transport websockets) through fastproxy to a Mosquitto with only its TCP
    listener: QoS 1 messages come back in order, a 200 KiB payload intact, and the session is
    logged with its ClientId."""
    fp = ws_proxy(start_proxy, mosquitto, tls=scheme == "wss")
    c = paho_ws(fp.port, f"ws-{scheme}-{version}", version=version, certs=certs if scheme == "wss" else None)
    got: list[bytes] = []
    done = threading.Event()
    subscribed = threading.Event()
    n = 100
    big = os.urandom(200 * 1024)

    def on_message(cl, u, m):
        got.append(m.payload)
        if len(got) == n + 1:
            done.set()

    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect(U.HOST, fp.port, 30)
    c.loop_start()
    try:
        c.subscribe("ws/t", qos=1)
        assert subscribed.wait(10), "no SUBACK over WebSocket"
        for i in range(n):
            c.publish("ws/t", f"m{i}".encode(), qos=1)
        c.publish("ws/t", big, qos=1)
        assert done.wait(20), f"{len(got)} of {n + 1} messages came back"
        assert got[:n] == [f"m{i}".encode() for i in range(n)]
        assert got[n] == big
    finally:
        c.disconnect()
        c.loop_stop()
    (e,) = fp.wait_access(n=1)
    # paho closes its socket right after DISCONNECT, with acknowledgements unread: a reset, as
    # over plain TCP
    assert (e.status, e.clientid) == (200, f"ws-{scheme}-{version}"), e.raw
    assert e.reason in ("ok", "client-reset") and e.received > 200 * 1024, e.raw
    assert f"ws-{scheme}-{version}" in U.broker_client_ids(mosquitto.log())


@pytest.mark.parametrize("version,code", [(4, 0x05), (5, 0x85)])
def test_wss_clientid_must_equal_certificate_cn(version, code, certs, mosquitto, start_proxy, ws_clients):
    """wss with client certificates and --require-clientid-cn: thing001's certificate with
    ClientId thing001 is served; with another ClientId it is refused with a CONNACK carried in
    a binary frame (3.1.1 0x02... here 0x05/0x85 as for mqtts), and nothing reaches the broker."""
    fp = ws_proxy(start_proxy, mosquitto, "--client-ca", certs.ca_cert, "--require-clientid-cn", tls=True)
    dev = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    before = U.broker_connections(mosquitto.log())
    w = ws_clients(fp.port, tls_ctx=dev)
    assert w.upgrade()[0] == 101
    w.send(frame(2, encode_connect(version, "not-thing001")))
    ptype, body = w.read_mqtt()
    want = 0x02 if version == 4 else 0x85
    assert ptype == 2 and body[1] == want, (ptype, body)
    assert w.closed(), "the refused client was not closed"
    assert U.broker_connections(mosquitto.log()) == before
    w2 = ws_clients(fp.port, tls_ctx=dev)
    assert w2.upgrade()[0] == 101
    w2.send(frame(2, encode_connect(version, "thing001", keepalive=30)))
    ptype, body = w2.read_mqtt()
    assert (ptype, body[1] if version == 4 else body[1]) == (2, 0), body
    U.wait_until(lambda: "thing001" in U.broker_client_ids(mosquitto.log()), 10, what="thing001 at the broker")
    entries = fp.wait_access(n=1)
    assert (entries[0].status, entries[0].reason, entries[0].cn) == (403, "denied", "thing001"), entries[0].raw


# ----------------------------------------------------------------------------- the handshake


def test_handshake_negotiates_the_mqtt_subprotocol(mosquitto, start_proxy, ws_clients):
    fp = ws_proxy(start_proxy, mosquitto)
    for offered, chosen in [("mqtt", "mqtt"), ("chat, mqttv3.1", "mqttv3.1"), ("mqttv3.1, mqtt", "mqttv3.1")]:
        w = ws_clients(fp.port)
        status, headers = w.upgrade(protocols=offered)
        assert status == 101 and headers["sec-websocket-protocol"] == chosen, (offered, headers)
        assert headers["upgrade"].lower() == "websocket" and headers["connection"].lower() == "upgrade"


@pytest.mark.parametrize("case,kw,status,reason", [
    ("unknown path", dict(path="/other"), 404, "ws-not-found"),
    ("no subprotocol", dict(protocols=None), 400, "ws-bad-request"),
    ("other subprotocol", dict(protocols="chat"), 400, "ws-bad-request"),
    ("version 8", dict(version="8"), 426, "ws-upgrade-required"),
    ("POST", dict(method="POST"), 400, "ws-bad-request"),
    ("bad key", dict(key=b"short"), 400, "ws-bad-request"),
])
def test_bad_upgrades_get_an_http_answer_and_no_upstream(case, kw, status, reason, mosquitto, start_proxy,
                                                        ws_clients):
    """Each refusal is an HTTP status with a reason in the body, logged with it; the broker
    never sees a connection. 426 carries Sec-WebSocket-Version: 13."""
    fp = ws_proxy(start_proxy, mosquitto, "/mqtt", "--websocket", "/ws")
    before = U.broker_connections(mosquitto.log())
    w = ws_clients(fp.port)
    got, headers = w.upgrade(**kw)
    assert got == status, (case, got, headers)
    if status == 426:
        assert headers.get("sec-websocket-version") == "13"
    assert w.closed()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (status, reason), e.raw
    # the second path works
    w2 = ws_clients(fp.port)
    assert w2.upgrade(path="/ws?x=1")[0] == 101
    assert U.broker_connections(mosquitto.log()) == before


def test_origin_allow_list(mosquitto, start_proxy, ws_clients):
    fp = ws_proxy(start_proxy, mosquitto, "--ws-origins", "https://app.example.com,http://localhost:8080")
    w = ws_clients(fp.port)
    assert w.upgrade(extra="Origin: https://evil.example.net\r\n")[0] == 403
    w = ws_clients(fp.port)
    assert w.upgrade()[0] == 403                      # no Origin at all: not a listed one
    w = ws_clients(fp.port)
    assert w.upgrade(extra="Origin: https://APP.example.com\r\n")[0] == 101
    (e, e2) = fp.wait_access(n=2)[:2]
    assert (e.status, e.reason) == (403, "ws-origin-denied"), e.raw


def test_oversized_or_slow_request_is_refused(mosquitto, start_proxy, ws_clients):
    """Request headers above 8 KiB: 400. A request that never completes: closed at the
    handshake timeout."""
    fp = ws_proxy(start_proxy, mosquitto, "--handshake-timeout", "1")
    w = ws_clients(fp.port)
    w.send(b"GET /mqtt HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n")
    status, _, _ = read_http(w.sock)
    assert status == 400
    w = ws_clients(fp.port)
    w.send(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
    assert w.closed(timeout=5)
    entries = fp.wait_access(n=2)
    assert {e.reason for e in entries} == {"ws-bad-request"}, [e.raw for e in entries]


# ----------------------------------------------------------------------------- frames


def upgraded(fp, ws_clients, **kw) -> WsClient:
    w = ws_clients(fp.port, **kw)
    assert w.upgrade()[0] == 101
    return w


def test_connect_split_across_frames_and_reads(mosquitto, start_proxy, ws_clients):
    """A CONNECT in a fragmented message (binary without FIN, two continuations), written one
    byte at a time, with a ping in the middle of the message: the pong comes back, the CONNECT
    is accepted (CONNACK in a binary frame), and a PUBLISH then flows both ways."""
    fp = ws_proxy(start_proxy, mosquitto)
    w = upgraded(fp, ws_clients)
    pkt = encode_connect(4, "split-dev", keepalive=30)
    data = (frame(2, pkt[:3], fin=False) + frame(0, pkt[3:9], fin=False) + frame(9, b"are you there")
            + frame(0, pkt[9:], fin=True))
    for i in range(len(data)):
        w.send(data[i:i + 1])
    fin, op, payload = w.read_frame()
    assert (fin, op, payload) == (True, 0xA, b"are you there")
    ptype, body = w.read_mqtt()
    assert (ptype, body) == (2, b"\x00\x00")
    w.send(frame(2, U.subscribe_packet(1, "split/t")))
    assert w.read_mqtt()[0] == 9
    w.send(frame(2, U.publish_packet("split/t", b"back to me")))
    ptype, body = w.read_mqtt()
    assert ptype == 3 and body.endswith(b"back to me")


@pytest.mark.parametrize("bad,code", [
    (lambda: frame(2, encode_connect(4, "x"), mask=False), 1002),
    (lambda: frame(1, b"text is not MQTT"), 1003),
    (lambda: frame(2, b"\x00" * 70000), 1009),
    (lambda: frame(2, encode_connect(4, "x"), rsv=4), 1002),
    (lambda: frame(0, b"continuation of nothing"), 1002),
    (lambda: frame(9, b"x" * 126), 1002),
    (lambda: frame(0xB, b""), 1002),
])
def test_protocol_violations_close_with_a_status_code(bad, code, mosquitto, start_proxy, ws_clients):
    """Each violation is answered with a close frame carrying its status code, the session
    ends (400 ws-protocol-error) and nothing reaches the broker."""
    fp = ws_proxy(start_proxy, mosquitto, "--ws-max-frame", "65536")
    before = U.broker_connections(mosquitto.log())
    w = upgraded(fp, ws_clients)
    w.send(bad())
    fin, op, payload = w.read_frame()
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == code, (op, payload)
    assert w.closed()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (400, "ws-protocol-error"), e.raw
    assert U.broker_connections(mosquitto.log()) == before


def test_protocol_violation_in_an_established_session(mosquitto, start_proxy, ws_clients):
    fp = ws_proxy(start_proxy, mosquitto)
    w = upgraded(fp, ws_clients)
    w.send(frame(2, encode_connect(4, "then-bad", keepalive=30)))
    assert w.read_mqtt() == (2, b"\x00\x00")
    w.send(frame(1, b"oops"))
    fin, op, payload = w.read_frame()
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == 1003
    assert w.closed()
    (e,) = fp.wait_access(n=1)
    assert (e.reason, e.clientid) == ("ws-protocol-error", "then-bad"), e.raw


def test_close_handshake(mosquitto, start_proxy, ws_clients):
    """The client's close is answered with the same status code and ends the session (the
    broker sees the client go: its will is published); the broker ending the session sends
    a close 1000 before the TCP close."""
    fp = ws_proxy(start_proxy, mosquitto)
    w = upgraded(fp, ws_clients)
    w.send(frame(2, encode_connect(4, "closer", keepalive=30)))
    assert w.read_mqtt() == (2, b"\x00\x00")
    w.send(frame(8, struct.pack("!H", 1001) + b"bye"))
    fin, op, payload = w.read_frame()
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == 1001
    assert w.closed()
    # the broker side: a second client with the same ClientId takes the session over, so
    # Mosquitto closes the first one
    w1 = upgraded(fp, ws_clients)
    w1.send(frame(2, encode_connect(4, "taken-over", keepalive=30)))
    assert w1.read_mqtt() == (2, b"\x00\x00")
    w2 = upgraded(fp, ws_clients)
    w2.send(frame(2, encode_connect(4, "taken-over", keepalive=30)))
    assert w2.read_mqtt() == (2, b"\x00\x00")
    fin, op, payload = w1.read_frame()
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == 1000
    assert w1.closed()


def test_invalid_connect_inside_frames_never_reaches_the_broker(mosquitto, start_proxy, ws_clients):
    fp = ws_proxy(start_proxy, mosquitto)
    before = U.broker_connections(mosquitto.log())
    w = upgraded(fp, ws_clients)
    w.send(frame(2, encode_connect(5, "x", flags=0x01)))       # reserved flag: malformed
    ptype, body = w.read_mqtt()
    assert ptype == 2 and body[1] == 0x81
    assert w.closed()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (400, "bad-connect"), e.raw
    assert U.broker_connections(mosquitto.log()) == before


def test_broker_bytes_are_framed_per_read(mosquitto, start_proxy, ws_clients):
    """The broker's packets arrive in binary frames whose payloads, joined, are exactly the MQTT
    stream; a burst of 500 messages to a slow reader comes in fewer frames than packets (coalesced per
    read, not one frame per packet)."""
    fp = ws_proxy(start_proxy, mosquitto)
    w = ws_clients(fp.port, rcvbuf=4096)    # a slow reader: the broker's packets queue up
    assert w.upgrade()[0] == 101
    w.send(frame(2, encode_connect(4, "burst-sub", keepalive=30)))
    assert w.read_mqtt() == (2, b"\x00\x00")
    w.send(frame(2, U.subscribe_packet(1, "burst/t")))
    assert w.read_mqtt()[0] == 9
    msgs = [f"n{i:04d}".ljust(100, ".") for i in range(500)]
    U.mosquitto_pub(mosquitto.port, None, "burst/t", messages=msgs)
    time.sleep(0.5)
    stream, frames = b"", 0
    want = b"".join(U.publish_packet("burst/t", m.encode()) for m in msgs)
    w.sock.settimeout(10)
    while len(stream) < len(want):
        fin, op, payload = w.read_frame()
        assert op == 2 and fin
        stream += payload
        frames += 1
    assert stream == want
    assert frames < 500, f"{frames} frames for 500 packets"


# ----------------------------------------------------------------------------- addresses


def test_x_forwarded_for_only_from_a_trusted_proxy(certs, start_proxy, ws_clients):
    """Behind a trusted reverse proxy (127.0.0.1 listed in --trusted-proxies), the last
    X-Forwarded-For address is the client's: in the access log and in the PROXY header to the
    broker. From any other peer (127.0.0.2) the header is ignored."""
    rec = Recorder()
    try:
        fp = ws_proxy(start_proxy, rec.upstream, "--trusted-proxies", "127.0.0.1/32", "--proxy-protocol", "v2")
        w = ws_clients(fp.port)
        assert w.upgrade(extra="X-Forwarded-For: 198.51.100.1, 203.0.113.9\r\n")[0] == 101
        w.send(frame(2, encode_connect(4, "behind-proxy", keepalive=30)))
        assert w.read_mqtt()[0] == 2
        h = rec.wait_connect(1).parsed
        assert (h.src_addr, h.src_port) == ("203.0.113.9", 0)
        w2 = ws_clients(fp.port, source="127.0.0.2")
        assert w2.upgrade(extra="X-Forwarded-For: 203.0.113.9\r\n")[0] == 101
        w2.send(frame(2, encode_connect(4, "direct", keepalive=30)))
        assert w2.read_mqtt()[0] == 2
        assert rec.wait_connect(2).parsed.src_addr == "127.0.0.2"
        w.close()
        w2.close()
        entries = fp.wait_access(n=2)
        assert sorted(e.remote for e in entries) == ["127.0.0.2", "203.0.113.9"], [e.raw for e in entries]
    finally:
        rec.close()


# ----------------------------------------------------------------------------- passthrough


@pytest.fixture
def ws_broker(mosquitto21_factory):
    """Mosquitto 2.1 with only a WebSocket listener (its built-in one)."""
    return mosquitto21_factory(["protocol websockets", "allow_anonymous true"])


@pytest.mark.parametrize("version", [4, 5])
def test_passthrough_to_a_websocket_broker(version, certs, ws_broker, start_proxy):
    """--ws-passthrough: the broker speaks WebSocket itself and gets the client's own request
    and frames; fastproxy still reads the CONNECT (access log with the ClientId) and paho's
    publish/subscribe round trip works."""
    fp = ws_proxy(start_proxy, ws_broker, "--ws-passthrough", tls=True)
    c = paho_ws(fp.port, f"pass-{version}", version=version, certs=certs)
    got, subscribed = [], threading.Event()
    done = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_message = lambda cl, u, m: (got.append(m.payload), done.set())
    c.connect(U.HOST, fp.port, 30)
    c.loop_start()
    try:
        c.subscribe("pass/t", qos=1)
        assert subscribed.wait(10), "no SUBACK through passthrough"
        c.publish("pass/t", b"through the broker's own WebSocket", qos=1)
        assert done.wait(10) and got == [b"through the broker's own WebSocket"]
    finally:
        c.disconnect()
        c.loop_stop()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.clientid) == (200, f"pass-{version}"), e.raw
    assert f"pass-{version}" in ws_broker.log()


def test_passthrough_checks_the_connect_before_the_broker(certs, ws_broker, start_proxy, ws_clients):
    """wss with client certificates and --require-clientid-cn in passthrough: a CONNECT in
    fragmented frames with a ClientId other than the CN is refused by fastproxy (CONNACK in a
    frame) and the broker never sees a connection; thing001 as thing001 gets the broker's own
    CONNACK."""
    fp = ws_proxy(start_proxy, ws_broker, "--ws-passthrough", "--client-ca", certs.ca_cert,
                  "--require-clientid-cn", tls=True)
    dev = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    w = upgraded(fp, ws_clients, tls_ctx=dev)
    bad = encode_connect(4, "intruder")
    w.send(frame(2, bad[:4], fin=False) + frame(9, b"ping") + frame(0, bad[4:]))
    assert w.read_frame()[1] == 0xA
    assert w.read_mqtt() == (2, b"\x00\x02")
    assert w.closed()
    assert "New connection" not in ws_broker.log() and "intruder" not in ws_broker.log()
    w = upgraded(fp, ws_clients, tls_ctx=dev)
    good = encode_connect(4, "thing001", keepalive=30)
    w.send(frame(2, good[:5], fin=False) + frame(0, good[5:]))
    assert w.read_mqtt() == (2, b"\x00\x00")
    w.send(frame(2, U.subscribe_packet(1, "pt/t")))
    assert w.read_mqtt()[0] == 9
    w.send(frame(2, U.publish_packet("pt/t", b"echo")))
    ptype, body = w.read_mqtt()
    assert ptype == 3 and body.endswith(b"echo")
    U.wait_until(lambda: "thing001" in ws_broker.log(), 10, what="thing001 at the broker")


def test_passthrough_to_a_broker_without_websocket_is_a_502(mosquitto, start_proxy, ws_clients):
    """A passthrough broker that does not answer the upgrade with 101 (here a plain MQTT
    listener): the session ends 502 upstream-refused, with the reason logged."""
    fp = ws_proxy(start_proxy, mosquitto, "--ws-passthrough")
    w = upgraded(fp, ws_clients)
    w.send(frame(2, encode_connect(4, "no-ws-broker", keepalive=30)))
    assert w.closed()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid) == (502, "upstream-refused", "no-ws-broker"), e.raw


def test_websocket_flags_are_checked(certs):
    for flags, problem in [(["--ws-origins", "https://a.example"], "--ws-origins: needs a WebSocket listener"),
                           (["--websocket", "mqtt"], "--websocket: 'mqtt' is not a path"),
                           (["--websocket", "--ws-origins", "a.example"], "is not an origin"),
                           (["--websocket", "--ws-passthrough", "--tls-cert", certs.server_cert, "--tls-key",
                             certs.server_key, "--client-ca", certs.ca_cert, "--clientid-from-cn"],
                            "--clientid-from-cn: cannot rewrite the CONNECT inside passthrough WebSocket frames")]:
        line = U.one_error_line(U.run_cli("check", "--listen", "127.0.0.1:18830", "--upstream",
                                          "127.0.0.1:1883", *flags))
        assert problem in line, (flags, line)


def test_plain_mqtt_on_a_websocket_listener_is_refused_at_once(mosquitto, start_proxy):
    """An MQTT client that connects to the WebSocket port by mistake is answered 400 at its
    first bytes (not held until the handshake timeout) and never reaches the broker."""
    fp = ws_proxy(start_proxy, mosquitto, "--handshake-timeout", "60")
    before = U.broker_connections(mosquitto.log())
    s = socket.create_connection((U.HOST, fp.port), timeout=10)
    try:
        s.sendall(encode_connect(4, "wrong-port"))
        status, _, _ = read_http(s, timeout=5)
        assert status == 400
    finally:
        s.close()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (400, "ws-bad-request"), e.raw
    assert e.session_time < 30, e.raw
    assert U.broker_connections(mosquitto.log()) == before
