"""fastproxy in front of a real PROXY-protocol receiver: Mosquitto 2.1.2 (README, "mTLS + PROXY v2
to Mosquitto >= 2.1"), built from the vendored source by scripts/build-mosquitto. Skipped with a
reason when it is not built (the mosquitto21_factory fixture).

Every mode the README names toward the broker: `--proxy-protocol v1` (broker `enable_proxy_protocol
1`), `v2`, `v2-ssl` and `v2-ssl-cn` (`enable_proxy_protocol 2`; v2-ssl-cn with the README's
`proxy_protocol_v2_require_tls` + `require_certificate` + `use_identity_as_username`, plus
`allow_anonymous true` and an ACL file: without an auth plugin, `allow_anonymous false` refuses
everyone). Devices are real paho-mqtt clients with certificates from the tests' CA; they connect
from 127.0.0.2, so the broker's log can only show that address if it came from the PROXY header
(fastproxy itself connects to the broker from 127.0.0.1). Loopback only; every wait is bounded.
"""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

import proxyutil as U

DEVICE_ADDR = "127.0.0.2"  # the devices' source address; fastproxy reaches the broker from 127.0.0.1


def mtls(certs, verify: str = "required") -> list[str]:
    return ["--client-ca", certs.ca_cert, "--verify", verify]


class Device(U.PahoClient):
    """A paho-mqtt client (3.1.1) that connects from `source` (DEVICE_ADDR) and knows its port."""

    def __init__(self, port: int, certs, client_id: str, *, cert: str | None, key: str | None,
                 username: str | None = None, host: str = U.HOST, source: str = DEVICE_ADDR) -> None:
        super().__init__(port, client_id=client_id, tls=True, certs=certs, certfile=cert, keyfile=key, host=host)
        self.bind_address = source
        self.client.reconnect_delay_set(30, 30)  # one attempt within a test's bounds
        if username is not None:
            self.client.username_pw_set(username, "unused")

    def connect(self, timeout: float = 10.0, **kw) -> "Device":
        """Connect from the source address; AssertionError unless CONNACK 0 comes within timeout
        (a close without CONNACK ends the wait early)."""
        self.client.connect(self.host, self.port, keepalive=self.keepalive, bind_address=self.bind_address, **kw)
        self.client.loop_start()
        U.wait_until(lambda: self.connected.is_set() or self.disconnected.is_set(), timeout,
                     what=f"CONNACK or close through {self.host}:{self.port}")
        assert self.connected.is_set() and not self.connect_rc.is_failure, f"not connected: {self.connect_rc}"
        return self

    @property
    def source(self) -> tuple[str, int]:
        return self.client.socket().getsockname()[:2]

    def suback(self, topic: str, timeout: float = 10.0) -> int:
        """Subscribe (QoS 0) and return the SUBACK code, failures included (0x80: refused)."""
        rc, mid = self.client.subscribe(topic, 0)
        assert rc == self.mqtt.MQTT_ERR_SUCCESS, rc
        with self._sub_cv:
            assert self._sub_cv.wait_for(lambda: mid in self._subacks, timeout), f"no SUBACK for {topic}"
        return self._subacks[mid][0].value


@pytest.fixture
def device(certs):
    made: list[Device] = []

    def make(port: int, client_id: str, *, cert: str | None, key: str | None, **kw) -> Device:
        d = Device(port, certs, client_id, cert=cert, key=key, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        try:
            d.close()
        except Exception:
            pass


def connected_line(log: str, client_id: str) -> re.Match | None:
    """Mosquitto's "New client connected from ADDR:PORT as ID (p4, c1, k60[, u'USER'])." line."""
    return re.search(rf"New client connected from (?P<addr>\S+):(?P<port>\d+) as {re.escape(client_id)} "
                     rf"\(p\d, c\d, k\d+(?:, u'(?P<user>[^']*)')?\)", log)


def wait_connected_line(broker, client_id: str, timeout: float = 10.0) -> re.Match:
    found: list[re.Match] = []

    def seen() -> bool:
        m = connected_line(broker.log(), client_id)
        if m:
            found.append(m)
        return bool(m)

    U.wait_until(seen, timeout, what=f"{client_id} in the broker's log")
    return found[0]


def round_trip(dev: Device, topic: str, payload: bytes) -> None:
    """Subscribe to topic, publish to it (QoS 1), and get the message back through the broker."""
    assert dev.suback(topic) == 0
    dev.publish(topic, payload, qos=1)
    got = dev.collect(1, timeout=10)
    assert [(m.topic, m.payload) for m in got] == [(topic, payload)]


# ----------------------------------------------------------------------------- the client's address


PLAIN_MODES = {
    # mode: broker lines after `listener`
    "v1": ["enable_proxy_protocol 1"],
    "v2": ["enable_proxy_protocol 2"],
    "v2-ssl": ["enable_proxy_protocol 2", "proxy_protocol_v2_require_tls true"],
}


@pytest.mark.parametrize("mode", list(PLAIN_MODES))
def test_broker_sees_device_address(mode, certs, mosquitto21_factory, start_proxy, device):
    """The broker logs the device's own address and source port (127.0.0.2:P), not fastproxy's
    127.0.0.1 connection, and relays a publish/subscribe round trip. (v2-ssl: the broker requires
    the SSL TLV, so the header carried one.)"""
    broker = mosquitto21_factory([*PLAIN_MODES[mode], "allow_anonymous true"])
    fp = start_proxy(broker, *mtls(certs), "--proxy-protocol", mode)
    dev = device(fp.port, f"pp-{mode}", cert=certs.client_cert, key=certs.client_key).connect()
    addr, port = dev.source
    assert addr == DEVICE_ADDR
    m = wait_connected_line(broker, f"pp-{mode}")
    assert (m["addr"], int(m["port"])) == (DEVICE_ADDR, port), m.group(0)
    round_trip(dev, f"pp/{mode}", b"hello " + mode.encode())
    assert "127.0.0.1" not in broker.log(), f"fastproxy's own address reached the log:\n{broker.log()}"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_broker_sees_ipv6_device_address(mode, certs, mosquitto21_factory, run_fastproxy, device):
    """A device on ::1 through fastproxy listening on [::1] to an IPv4 broker: the header is TCP6
    (v1) / AF_INET6 (v2) and the broker logs ::1 with the device's port, although fastproxy's
    own connection to it is IPv4."""
    broker = mosquitto21_factory([*PLAIN_MODES[mode], "allow_anonymous true"])
    port = U.free_port("::1")
    fp = run_fastproxy("--listen", f"[::1]:{port}", "--upstream", broker.upstream, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key, *mtls(certs), "--proxy-protocol", mode)
    dev = device(fp.port, f"pp6-{mode}", cert=certs.client_cert, key=certs.client_key, host="::1",
                 source="::1").connect()
    m = wait_connected_line(broker, f"pp6-{mode}")
    assert (m["addr"], int(m["port"])) == ("::1", dev.source[1]), m.group(0)
    round_trip(dev, f"pp6/{mode}", b"over v6")


def test_v2_ssl_cipher_option_reaches_broker(certs, mosquitto21_factory, start_proxy, device):
    """With `--proxy-protocol-options ssl-cipher` the SSL TLV carries VERSION and CIPHER, which
    Mosquitto logs as "Connection from ADDR:PORT negotiated VERSION cipher CIPHER": the values
    are the device's TLS session's."""
    broker = mosquitto21_factory(["enable_proxy_protocol 2", "proxy_protocol_v2_require_tls true",
                                  "allow_anonymous true"])
    fp = start_proxy(broker, *mtls(certs), "--proxy-protocol", "v2-ssl", "--proxy-protocol-options", "ssl-cipher")
    dev = device(fp.port, "pp-cipher", cert=certs.client_cert, key=certs.client_key).connect()
    _, port = dev.source
    tls = dev.client.socket()
    want = f"Connection from {DEVICE_ADDR}:{port} negotiated {tls.version()} cipher {tls.cipher()[0]}"
    U.wait_until(lambda: want in broker.log(), 10, what=f"{want!r} in the broker's log")


def test_v2_without_ssl_tlv_refused_by_require_tls_broker(certs, mosquitto21_factory, start_proxy, device):
    """The receiver's own check, seen through fastproxy: plain `v2` carries no SSL TLV, so a broker
    with `proxy_protocol_v2_require_tls true` refuses the device (logged with the device's
    address); the same broker takes `v2-ssl` (test_broker_sees_device_address)."""
    broker = mosquitto21_factory(["enable_proxy_protocol 2", "proxy_protocol_v2_require_tls true",
                                  "allow_anonymous true"])
    fp = start_proxy(broker, *mtls(certs), "--proxy-protocol", "v2")
    dev = device(fp.port, "pp-notls", cert=certs.client_cert, key=certs.client_key)
    with pytest.raises(AssertionError):
        dev.connect(timeout=5)
    assert dev.connect_rc is None or dev.connect_rc.is_failure
    U.wait_until(lambda: f"Connection from {DEVICE_ADDR}:" in broker.log()
                 and "rejected, client did not connect using TLS." in broker.log(), 10,
                 what="the broker's require-TLS refusal")
    assert connected_line(broker.log(), "pp-notls") is None


# ----------------------------------------------------------------------------- v2-ssl-cn: the CN is the user


def readme_block(first_line: str) -> list[str]:
    """The lines of the README code block that starts with first_line (comments and blank
    lines dropped): the tests run the configuration the README gives, not a copy of it."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```\n" + first_line + "\n") + 4
    block = text[start:text.index("```", start)]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.fixture
def cn_broker(mosquitto21_factory, tmp_path):
    """The README's v2-ssl-cn broker (mosquitto.conf and ACL, verbatim but for the paths and
    the listener, which the factory writes): user X may use devices/X/# only."""
    acl = tmp_path / "acl"
    acl.write_text("\n".join(readme_block("# /etc/mosquitto/acl: each device may use its own subtree. "
                                          "fastproxy's health checks connect as")) + "\n")
    acl.chmod(0o600)
    conf = readme_block("# mosquitto.conf (Mosquitto 2.1 or later)")
    assert conf[0] == "listener 1883 127.0.0.1" and conf[-1] == "acl_file /etc/mosquitto/acl", conf
    return mosquitto21_factory([*conf[1:-1], f"acl_file {acl}"])


def test_v2_ssl_cn_certificate_cn_is_the_broker_username(certs, identity_certs, cn_broker, start_proxy, device):
    """The broker takes the certificate CN from the SSL TLV as the username: the device thing001
    claims username thing002 in its CONNECT, yet the broker logs u'thing001' with the device's
    address, lets it use devices/thing001/#, and not devices/thing002/#: its publish there is
    denied and it receives nothing from there, while thing002 uses its own topics."""
    fp = start_proxy(cn_broker, *mtls(certs), "--proxy-protocol", "v2-ssl-cn")
    one = device(fp.port, "dev-one", cert=certs.client_cert, key=certs.client_key, username="thing002").connect()
    two = device(fp.port, "dev-two", cert=identity_certs.thing002_cert, key=identity_certs.thing002_key).connect()

    m1, m2 = wait_connected_line(cn_broker, "dev-one"), wait_connected_line(cn_broker, "dev-two")
    assert (m1["addr"], int(m1["port"]), m1["user"]) == (DEVICE_ADDR, one.source[1], "thing001"), m1.group(0)
    assert (m2["addr"], int(m2["port"]), m2["user"]) == (DEVICE_ADDR, two.source[1], "thing002"), m2.group(0)

    round_trip(one, "devices/thing001/temp", b"21.5")
    # Mosquitto's ACL file does not check subscriptions (SUBACK 0), only each delivery (read)
    # and each publish (write).
    assert one.suback("devices/thing002/#") == 0
    assert two.suback("devices/thing002/#") == 0
    one.publish("devices/thing002/cmd", b"forged", qos=1)  # PUBACK'd (3.1.1) but dropped: no write
    two.publish("devices/thing002/cmd", b"genuine", qos=1)
    got = two.collect(1, timeout=10)
    assert [(m.topic, m.payload) for m in got] == [("devices/thing002/cmd", b"genuine")]
    assert two.collect(1, timeout=0.3) == []
    assert one.collect(1, timeout=0.3) == [], "thing001 read thing002's topic"
    assert "Denied PUBLISH from dev-one (d0, q1, r0, m" in cn_broker.log()


@pytest.mark.parametrize("client_cert", ["none", "untrusted-ca", "expired"])
def test_v2_ssl_cn_unverified_device_is_no_certificate_holder(client_cert, certs, cn_broker, start_proxy, device):
    """Through a `--verify optional` listener a device without a certificate, or with one that
    does not verify (CN thing001 from another CA, or expired), completes TLS with fastproxy, but
    the header does not claim a verified certificate: the broker (require_certificate) refuses
    it, logging its address, and never lets it in as thing001. A good device still gets in."""
    cert, key = {
        "none": (None, None),
        "untrusted-ca": (certs.rogue_client_cert, certs.rogue_client_key),
        "expired": (certs.expired_client_cert, certs.expired_client_key),
    }[client_cert]
    fp = start_proxy(cn_broker, *mtls(certs, "optional"), "--proxy-protocol", "v2-ssl-cn")
    intruder = device(fp.port, "intruder", cert=cert, key=key)
    with pytest.raises(AssertionError):
        intruder.connect(timeout=5)
    assert intruder.connect_rc is None or intruder.connect_rc.is_failure, intruder.connect_rc
    refusal = re.compile(rf"Connection from {re.escape(DEVICE_ADDR)}:\d+ rejected, "
                         r"client did not provide a certificate\.")
    U.wait_until(lambda: refusal.search(cn_broker.log()), 10, what="the broker's no-certificate refusal")
    assert connected_line(cn_broker.log(), "intruder") is None, cn_broker.log()

    good = device(fp.port, "dev-good", cert=certs.client_cert, key=certs.client_key).connect()
    m = wait_connected_line(cn_broker, "dev-good")
    assert (m["addr"], int(m["port"]), m["user"]) == (DEVICE_ADDR, good.source[1], "thing001")


def test_two_cn_certificate_never_reaches_the_broker(certs, identity_certs, cn_broker, start_proxy, device):
    """A certificate with subject "CN=admin, CN=thing001" from the trusted CA: Mosquitto would
    take the first CN (admin) as the user name, an identity check the last. Under v2-ssl-cn
    the proxy refuses it (CONNACK 0x05) whatever ClientId it claims; the broker never sees a
    connection from the device's address."""
    fp = start_proxy(cn_broker, *mtls(certs), "--proxy-protocol", "v2-ssl-cn")
    for cid in ("thing001", "admin"):
        d = device(fp.port, cid, cert=identity_certs.twocn_cert, key=identity_certs.twocn_key)
        with pytest.raises(AssertionError):
            d.connect(timeout=5)
        assert d.connect_rc is not None and d.connect_rc.value == 0x87, d.connect_rc   # 3.1.1 0x05
    U.wait_until(lambda: "client certificate has more than one CN" in fp.stderr(), 10, what="the refusal log")
    assert DEVICE_ADDR not in cn_broker.log(), cn_broker.log()[-2000:]
    assert "u'admin'" not in cn_broker.log()


# ----------------------------------------------------------------------------- health checks


@pytest.mark.parametrize("mode,identity", [("v2-ssl", None), ("v2-ssl-cn", None), ("v2-ssl-cn", "probe-7")])
def test_default_health_check_keeps_the_pool_up(mode, identity, certs, cn_broker, mosquitto21_factory,
                                                 start_proxy):
    """The default (MQTT) health check every 0.2s against a broker that requires TLS and a
    certificate in the header (the README's v2-ssl-cn broker; for v2-ssl, require_tls only):
    the check's header carries an SSL TLV with the check identity, the broker answers its
    CONNECT (it logs the identity as the user name), the server stays UP through several
    health-fall periods and a device with a valid certificate gets CONNACK 0."""
    broker = cn_broker if mode == "v2-ssl-cn" else mosquitto21_factory(
        ["enable_proxy_protocol 2", "proxy_protocol_v2_require_tls true", "allow_anonymous true"])
    extra = ["--health-check-identity", identity] if identity else []
    fp = start_proxy(broker, *mtls(certs), "--proxy-protocol", mode,
                     "--health-interval", "0.2", "--health-timeout", "0.5", *extra)
    checks = re.compile(r"New client connected from 127\.0\.0\.1:\d+ as fastproxy-check-\d+-0 \(.*?\)")
    U.wait_until(lambda: len(checks.findall(broker.log())) >= 5, 10, what="five answered health checks")
    time.sleep(0.2)
    assert "DOWN" not in fp.stderr(), fp.stderr()[-2000:]
    assert "rejected" not in broker.log(), broker.log()[-2000:]
    if mode == "v2-ssl-cn":
        assert f"u'{identity or 'fastproxy-health'}'" in checks.findall(broker.log())[-1], broker.log()[-1000:]
    rc = U.paho_connack(fp.port, certs, "dev-health", certfile=certs.client_cert, keyfile=certs.client_key,
                        timeout=5)
    assert rc == 0, f"CONNACK {rc}; fastproxy:\n{fp.stderr()[-2000:]}\nbroker:\n{broker.log()[-2000:]}"
