"""MQTT traffic relayed through the proxy: QoS 0/1/2, TLS and plain TCP, MQTT 3.1.1 and 5,
order, large payloads, unix-socket upstream, and the access-log line of a finished session."""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import ssl

import pytest

import proxyutil as U

MODES = [pytest.param(True, id="tls"), pytest.param(False, id="tcp")]


@pytest.mark.parametrize("tls", MODES)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_relay(mosquitto, start_proxy, paho_client, tls, qos):
    """paho 3.1.1 subscriber and publisher through the proxy: every message arrives, in order, at the QoS."""
    fp = start_proxy(mosquitto, tls=tls)
    sub = paho_client(fp.port, client_id=f"sub-{qos}", tls=tls)
    sub.subscribe("relay/+", qos)
    pub = paho_client(fp.port, client_id=f"pub-{qos}", tls=tls)
    payloads = [f"message {i} qos {qos}".encode() for i in range(50)]
    for p in payloads:
        pub.publish("relay/a", p, qos=qos)
    got = sub.collect(len(payloads), timeout=20)
    assert [m.payload for m in got] == payloads
    assert all(m.qos == qos for m in got)
    assert all(m.topic == "relay/a" for m in got)


@pytest.mark.parametrize("tls", MODES)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_clients_relay(certs, mosquitto, start_proxy, tls, qos):
    """mosquitto_sub / mosquitto_pub (libmosquitto, OpenSSL) through the proxy."""
    fp = start_proxy(mosquitto, tls=tls)
    c = certs if tls else None
    msgs = [f"line-{i}-q{qos}" for i in range(10)]
    sub = U.MosqSub(fp.port, c, "mq/#", count=len(msgs), qos=qos, client_id=f"msub{qos}")
    try:
        sub.wait_subscribed(mosquitto.log)
        r = U.mosquitto_pub(fp.port, c, "mq/x", messages=msgs, qos=qos, client_id=f"mpub{qos}")
        assert r.returncode == 0, r.stderr
        rc, out, err = sub.result()
    finally:
        sub.kill()
    assert rc == 0, err
    assert out.decode().splitlines() == msgs


def test_thousand_messages_in_order(mosquitto, start_proxy, paho_client):
    """1000 QoS 1 messages published back to back arrive complete and in order through TLS."""
    fp = start_proxy(mosquitto)
    sub = paho_client(fp.port, client_id="order-sub")
    sub.subscribe("order/t", 1)
    pub = paho_client(fp.port, client_id="order-pub")
    infos = [pub.publish("order/t", b"%06d" % i, qos=1, wait=False) for i in range(1000)]
    got = sub.collect(1000, timeout=60)
    assert len(got) == 1000, f"only {len(got)} of 1000 messages arrived"
    assert [int(m.payload) for m in got] == list(range(1000))
    for info in infos[-5:]:
        info.wait_for_publish(10)
        assert info.is_published()


@pytest.mark.parametrize("tls", MODES)
def test_one_mib_payload(mosquitto, start_proxy, paho_client, tls):
    """A 1 MiB payload (many TLS records, many relay buffers) arrives byte for byte."""
    fp = start_proxy(mosquitto, tls=tls)
    payload = os.urandom(1 << 20)
    sub = paho_client(fp.port, client_id="big-sub", tls=tls)
    sub.subscribe("big/one", 1)
    pub = paho_client(fp.port, client_id="big-pub", tls=tls)
    pub.publish("big/one", payload, qos=1, timeout=30)
    got = sub.collect(1, timeout=30)
    assert got, "the 1 MiB message did not arrive"
    assert len(got[0].payload) == len(payload)
    assert hashlib.sha256(got[0].payload).hexdigest() == hashlib.sha256(payload).hexdigest()
    # the byte counters of the access log see the megabyte on both sessions
    sub.close()
    pub.close()
    entries = fp.wait_access(n=2)
    assert max(e.received for e in entries) >= len(payload), [e.raw for e in entries]  # from the publisher
    assert max(e.sent for e in entries) >= len(payload), [e.raw for e in entries]  # to the subscriber
    assert all(e.received < 2 * len(payload) and e.sent < 2 * len(payload) for e in entries)


@pytest.mark.parametrize("tls", MODES)
def test_full_duplex_burst(mosquitto, start_proxy, paho_client, tls):
    """A client that floods a topic it is subscribed to: both directions are busy at once
    (16 KiB relay buffers each way) and nothing deadlocks or goes missing."""
    fp = start_proxy(mosquitto, tls=tls)
    c = paho_client(fp.port, client_id="duplex", tls=tls)
    c.subscribe("echo/t", 0)
    n, size = 200, 50_000
    for i in range(n):
        c.publish("echo/t", i.to_bytes(4, "big") * (size // 4), qos=0)
    got = c.collect(n, timeout=30)
    assert len(got) == n, f"{len(got)} of {n} echoed messages arrived"
    assert [int.from_bytes(m.payload[:4], "big") for m in got] == list(range(n))
    assert all(len(m.payload) == size for m in got)


def test_mqtt5_paho(mosquitto, start_proxy, paho_client):
    """An MQTT 5 session (paho v5) with properties passes through untouched."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    fp = start_proxy(mosquitto)
    sub = paho_client(fp.port, client_id="v5-sub", version=5)
    assert sub.connect_rc.value == 0
    sub.subscribe("v5/t", 2)
    pub = paho_client(fp.port, client_id="v5-pub", version=5)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("origin", "fastproxy-test"), ("n", "1")]
    props.ContentType = "text/plain"
    props.ResponseTopic = "v5/reply"
    props.CorrelationData = b"\x00\x01corr"
    for qos in (0, 1, 2):
        pub.publish("v5/t", f"v5 qos {qos}".encode(), qos=qos, properties=props)
    got = sub.collect(3, timeout=20)
    assert [m.payload for m in got] == [b"v5 qos 0", b"v5 qos 1", b"v5 qos 2"]
    for m in got:
        p = m.properties
        assert ("origin", "fastproxy-test") in p.UserProperty
        assert p.ContentType == "text/plain"
        assert p.ResponseTopic == "v5/reply"
        assert p.CorrelationData == b"\x00\x01corr"
    sub.close()
    pub.close()
    entries = fp.wait_access(lambda e: e.status == 200, n=2, timeout=10)
    assert all(e.protocol == "TLSv1.3" for e in entries)
    assert {e.clientid for e in entries} <= {"v5-sub", "v5-pub", "-"}


@pytest.mark.parametrize("tls", MODES)
def test_mqtt5_mosquitto_clients(certs, mosquitto, start_proxy, tls):
    """`mosquitto_pub -V mqttv5` and `mosquitto_sub -V mqttv5` through the proxy, with a user property."""
    fp = start_proxy(mosquitto, tls=tls)
    c = certs if tls else None
    sub = U.MosqSub(fp.port, c, "v5m/#", count=3, qos=1, client_id="m5sub", version="mqttv5",
                    extra=["-F", "%t|%p"])
    try:
        sub.wait_subscribed(mosquitto.log)
        r = U.mosquitto_pub(fp.port, c, "v5m/a", messages=["one", "two", "three"], qos=1, client_id="m5pub",
                            version="mqttv5", extra=["-D", "publish", "user-property", "k", "v"])
        assert r.returncode == 0, r.stderr
        rc, out, err = sub.result()
    finally:
        sub.kill()
    assert rc == 0, err
    assert out.decode().splitlines() == ["v5m/a|one", "v5m/a|two", "v5m/a|three"]


@pytest.mark.parametrize("tls", MODES)
def test_unix_socket_upstream(certs, mosquitto_unix, start_proxy, paho_client, tls):
    """--upstream unix:/path relays both ways (paho and mosquitto clients)."""
    fp = start_proxy(mosquitto_unix, tls=tls)
    sub = paho_client(fp.port, client_id="unix-sub", tls=tls)
    sub.subscribe("unix/t", 1)
    pub = paho_client(fp.port, client_id="unix-pub", tls=tls)
    for i in range(20):
        pub.publish("unix/t", b"u%d" % i, qos=1)
    got = sub.collect(20, timeout=20)
    assert [m.payload for m in got] == [b"u%d" % i for i in range(20)]
    r = U.mosquitto_pub(fp.port, certs if tls else None, "unix/t", message="from mosquitto_pub", qos=2,
                        client_id="unix-mpub")
    assert r.returncode == 0, r.stderr
    got = sub.collect(1, timeout=10)
    assert got and got[0].payload == b"from mosquitto_pub"
    assert "unix-sub" in mosquitto_unix.log()


# ----------------------------------------------------------------------------- access log


def _check_time_local(e: U.AccessLine) -> None:
    t = dt.datetime.strptime(e.time, "%d/%b/%Y:%H:%M:%S %z")
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((now - t).total_seconds()) < 300, f"time_local {e.time} is not now ({now})"


@pytest.mark.parametrize("tls", MODES)
def test_access_log_line_format(certs, mosquitto, start_proxy, tls):
    """One line per connection, in the contract format, with exact application byte counts."""
    fp = start_proxy(mosquitto, tls=tls)
    ctx = U.client_context(certs) if tls else None
    s = U.open_socket(fp.port, tls_ctx=ctx)
    connect = U.connect_packet("fmt-client", keepalive=30)
    s.sendall(connect)
    ptype, _, body = U.read_packet(s)
    assert ptype == 2 and body[1] == 0
    s.sendall(U.PINGREQ)
    ptype, _, body = U.read_packet(s)
    assert ptype == 13 and body == b""
    s.sendall(U.DISCONNECT)
    closed, extra, _ = U.wait_closed(s, 10)  # the broker closes after DISCONNECT
    s.close()
    assert closed and extra == b""

    (e,) = fp.wait_access(n=1, timeout=10)
    lines = fp.access_log()
    assert len(lines) == 1, lines
    assert U.ACCESS_RE.match(lines[0]), lines[0]
    assert e.remote == "127.0.0.1"
    assert e.protocol == ("TLSv1.3" if tls else "TCP")
    assert (e.status, e.reason) == (200, "ok")
    assert e.received == len(connect) + len(U.PINGREQ) + len(U.DISCONNECT)  # bytes from the client
    assert e.sent == 4 + 2  # CONNACK + PINGRESP to the client
    assert 0 <= e.session_time < 30
    assert e.clientid in ("fmt-client", "-")
    assert e.cn == "-"
    _check_time_local(e)


def test_access_log_tls12_protocol_field(certs, mosquitto, start_proxy):
    """A TLS 1.2 session is logged with protocol TLSv1.2."""
    fp = start_proxy(mosquitto)
    ctx = U.client_context(certs, max_version=ssl.TLSVersion.TLSv1_2)
    s = U.open_socket(fp.port, tls_ctx=ctx)
    assert s.version() == "TLSv1.2"
    assert U.mqtt_handshake(s, "tls12-client") == 0
    s.sendall(U.DISCONNECT)
    U.wait_closed(s, 10)
    s.close()
    (e,) = fp.wait_access(n=1)
    assert (e.protocol, e.status, e.reason) == ("TLSv1.2", 200, "ok")
