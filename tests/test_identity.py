"""Device identity at the CONNECT: ClientId / username == certificate CN, ClientId templates,
ClientId from the CN (docs/CONTRACT.md, "MQTT awareness and device identity").

Real Mosquitto behind the proxy, real clients (mosquitto_pub/mosquitto_sub, paho-mqtt 3.1.1
and 5.0, raw sockets for exact bytes), real TLS with client certificates from the test CA.
A refused client must never reach the broker: every refusal test checks Mosquitto's log (it
logs "New connection from ..." for every TCP connection and "New client connected ... as ID"
for every CONNECT it sees), then proves the proxy still serves a good client.
"""
from __future__ import annotations

import hashlib
import re
import ssl

import pytest

import proxyutil as U
from mqtt_reference import encode_connect

TOPIC = "id/t"


def mtls(certs, verify: str = "required") -> list[str]:
    return ["--client-ca", certs.ca_cert, "--verify", verify]


def ctx_for(certs, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    return U.client_context(certs, cert=cert, key=key)


def pub(port: int, certs, client_id: str | None, *, cert: str | None = None, key: str | None = None,
        version: str | None = None, username: str | None = None, message: str = "hello",
        topic: str = TOPIC) -> "U.subprocess.CompletedProcess":
    """mosquitto_pub through the proxy with a client certificate; client_id None: no -i."""
    cmd = ["mosquitto_pub", *U.mosq_conn_args(port, certs), "-t", topic, "-m", message, "-q", "1"]
    if client_id is not None:
        cmd += ["-i", client_id]
    if cert:
        cmd += ["--cert", cert, "--key", key]
    if username is not None:
        cmd += ["-u", username, "-P", "secret"]
    if version:
        cmd += ["-V", version]
    return U.subprocess.run(cmd, capture_output=True, timeout=30)


def out_of(r) -> str:
    return (r.stdout + r.stderr).decode(errors="replace")


def refusal_lines(fp) -> list[re.Match]:
    return list(re.finditer(
        r"refused client (?P<addr>[0-9.]+):(?P<port>\d+) ClientId (?P<cid>\S+) CN (?P<cn>\S+): "
        r"(?P<why>.+?) \(reason code 0x(?P<code>[0-9a-f]{2})\)", fp.stderr()))


def assert_nothing_reached_broker(broker, before: int, refused_ids=()) -> None:
    """Called after a good client `proof_id` connected: exactly that one connection is new."""
    log = broker.log()
    ids = U.broker_client_ids(log)
    for cid in refused_ids:
        if cid:
            assert cid not in ids, f"refused ClientId {cid!r} reached the broker:\n{log[-3000:]}"
    assert U.broker_connections(log) == before + 1, (
        f"expected exactly one new broker connection (the good client), log:\n{log[-3000:]}")


def good_client_proof(fp, broker, certs, identity_certs, *, require_id: bool = True) -> None:
    """A client with certificate thing002 (ClientId thing002) gets through and is seen by the broker."""
    r = pub(fp.port, certs, "thing002", cert=identity_certs.thing002_cert, key=identity_certs.thing002_key,
            username="thing002", message="still serving")
    assert r.returncode == 0, f"a good client was refused after the refusals: {out_of(r)}\n{fp.stderr()[-2000:]}"
    U.wait_until(lambda: "thing002" in U.broker_client_ids(broker.log()), 10, what="thing002 at the broker")


# ----------------------------------------------------------------------------- --require-clientid-cn


def test_clientid_equal_to_cn_is_accepted_and_delivered(certs, mosquitto, start_proxy):
    """mosquitto_pub -i thing001 --cert thing001.crt, in MQTT 3.1.1, 5.0 and 3.1: accepted, the
    messages reach a subscriber, the access log has 200 ok with clientid and cn thing001."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-clientid-cn")
    sub = U.MosqSub(mosquitto.port, None, TOPIC, count=3, client_id="direct-sub", qos=1, timeout=20)
    try:
        sub.wait_subscribed(mosquitto.log)
        for i, version in enumerate(["mqttv311", "mqttv5", "mqttv31"]):
            r = pub(fp.port, certs, "thing001", cert=certs.client_cert, key=certs.client_key, version=version,
                    message=f"telemetry {i}")
            assert r.returncode == 0, f"{version}: {out_of(r)}\n{fp.stderr()[-2000:]}"
        rc, out, err = sub.result(timeout=20)
    finally:
        sub.kill()
    assert rc == 0, (rc, out, err)
    assert out.decode().split("\n")[:3] == ["telemetry 0", "telemetry 1", "telemetry 2"], out
    entries = fp.wait_access(n=3)
    assert [(e.status, e.reason, e.clientid, e.cn) for e in entries] == [(200, "ok", "thing001", "thing001")] * 3, \
        [e.raw for e in entries]
    assert U.broker_client_ids(mosquitto.log()).count("thing001") == 3
    assert "refused client" not in fp.stderr()


@pytest.mark.parametrize("version,code,text", [
    ("mqttv311", 0x02, "identifier rejected"),
    ("mqttv5", 0x85, "Client Identifier not valid"),
    ("mqttv31", 0x02, "identifier rejected"),
])
def test_clientid_not_cn_refused_mosquitto_pub(certs, identity_certs, mosquitto, start_proxy, version, code, text):
    """mosquitto_pub -i BADTHING with the thing001 certificate: CONNACK 0x02 (3.x) / 0x85 (5.0),
    access log 403 denied with clientid and cn, one error-log line with the reason, nothing at
    the broker; the proxy keeps serving."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-clientid-cn")
    before = U.broker_connections(mosquitto.log())
    r = pub(fp.port, certs, "BADTHING", cert=certs.client_cert, key=certs.client_key, version=version)
    assert r.returncode != 0, out_of(r)
    assert text in out_of(r), out_of(r)
    # mosquitto_pub exits with the CONNACK code it received
    assert r.returncode == code, (r.returncode, out_of(r))
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid, e.cn) == (403, "denied", "BADTHING", "thing001"), e.raw
    assert e.sent == (4 if code < 0x80 else 5), f"the CONNACK is the only thing sent: {e.raw}"
    lines = U.wait_until(lambda: refusal_lines(fp), 10, what="the refusal in the error log")
    assert len(lines) == 1, fp.stderr()
    m = lines[0]
    assert (m["addr"], m["cid"], m["cn"]) == ("127.0.0.1", "'BADTHING'", "'thing001'"), m.group(0)
    assert "CN" in m["why"] and "ClientId" in m["why"], m.group(0)
    assert int(m["code"], 16) in (code, 0x85), m.group(0)
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, ["BADTHING"])
    assert "BADTHING" not in mosquitto.log()


@pytest.mark.parametrize("version,code", [(4, 0x02), (5, 0x85)])
def test_clientid_not_cn_refused_paho(certs, identity_certs, mosquitto, start_proxy, version, code):
    """paho-mqtt reads the refusal CONNACK: 0x02 (3.1.1) / 0x85 (5.0); thing001 itself is accepted."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-clientid-cn")
    before = U.broker_connections(mosquitto.log())
    rc = U.paho_connack(fp.port, certs, "BADTHING", version=version, certfile=certs.client_cert,
                        keyfile=certs.client_key)
    assert rc == code, f"paho read CONNACK code {rc!r}, expected {code:#x}"
    fp.wait_access(lambda e: e.status == 403, n=1)
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, ["BADTHING"])
    rc = U.paho_connack(fp.port, certs, "thing001", version=version, certfile=certs.client_cert,
                        keyfile=certs.client_key)
    assert rc == 0
    U.wait_until(lambda: "thing001" in U.broker_client_ids(mosquitto.log()), 10, what="thing001 at the broker")


# ClientIds that are not exactly the CN thing001: case, prefixes, extensions, padding, empty.
NEAR_MISSES = ["THING001", "Thing001", "thing0011", "thing00", "thing001/", "xthing001", ""]


@pytest.mark.parametrize("version,code", [(4, 0x02), (5, 0x85)])
def test_clientid_cn_is_exact_and_case_sensitive(certs, identity_certs, mosquitto, start_proxy, version, code):
    """Exact, case-sensitive comparison: no prefix match either way, no case folding; an empty
    ClientId is not the CN either (without --clientid-from-cn). Each refusal: CONNACK then close."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-clientid-cn")
    before = U.broker_connections(mosquitto.log())
    ctx = ctx_for(certs, certs.client_cert, certs.client_key)
    problems = []
    for cid in NEAR_MISSES:
        o = U.try_connect(fp.port, U.connect_packet(cid, version=version), tls_ctx=ctx)
        want = bytes([0x20, 2, 0, code]) if version == 4 else bytes([0x20, 3, 0, code, 0])
        if o.connack != want or not o.closed:
            problems.append(f"ClientId {cid!r}: connack={o.connack!r} closed={o.closed} error={o.error}")
    assert not problems, "\n".join(problems)
    entries = fp.wait_access(lambda e: e.status == 403, n=len(NEAR_MISSES))
    assert sorted(e.clientid for e in entries) == sorted(c or "-" for c in NEAR_MISSES), [e.raw for e in entries]
    assert all((e.reason, e.cn) == ("denied", "thing001") for e in entries), [e.raw for e in entries]
    assert len(refusal_lines(fp)) == len(NEAR_MISSES), fp.stderr()
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, NEAR_MISSES)
    # and the exact CN is accepted on a raw socket too
    o = U.try_connect(fp.port, U.connect_packet("thing001", version=version), tls_ctx=ctx)
    assert o.code == 0, o


@pytest.mark.parametrize("version", [4, 5])
def test_no_verified_certificate_with_verify_optional(certs, identity_certs, mosquitto, start_proxy, version):
    """--verify optional + --require-clientid-cn: a client without a certificate gets CONNACK
    0x05 / 0x87; a certificate that fails verification (rogue CA or expired, CN thing001) is no
    identity: refused in the handshake or with 0x05 / 0x87, never accepted, never logged as
    thing001. A valid certificate still works."""
    fp = start_proxy(mosquitto, *mtls(certs, "optional"), "--require-clientid-cn")
    before = U.broker_connections(mosquitto.log())
    code = 0x05 if version == 4 else 0x87
    pkt = U.connect_packet("thing001", version=version)
    o = U.try_connect(fp.port, pkt, tls_ctx=ctx_for(certs))
    assert o.code == code and o.closed, o
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid, e.cn) == (403, "denied", "thing001", "-"), e.raw
    (m,) = U.wait_until(lambda: refusal_lines(fp), 10, what="the refusal in the error log")
    assert int(m["port"]) == o.local_port, m.group(0)
    assert "no verified client certificate" in m["why"], m.group(0)
    assert int(m["code"], 16) in (0x87, code), m.group(0)

    for cert, key in [(certs.rogue_client_cert, certs.rogue_client_key),
                      (certs.expired_client_cert, certs.expired_client_key)]:
        o = U.try_connect(fp.port, pkt, tls_ctx=ctx_for(certs, cert, key))
        assert o.code != 0, f"{cert}: an unverified certificate with CN thing001 was accepted"
        if o.connack is not None:
            assert o.code == code and o.closed, o
        else:
            assert o.closed, o
    entries = fp.wait_access(n=3)
    assert all(e.status in (400, 403) for e in entries), [e.raw for e in entries]
    assert all(e.cn != "thing001" for e in entries[1:]), [e.raw for e in entries]
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, [])
    assert U.broker_client_ids(mosquitto.log()) == ["thing002"]


def test_verify_required_refuses_in_handshake_before_any_connect(certs, identity_certs, mosquitto, start_proxy):
    """--verify required + --require-clientid-cn: no certificate, an untrusted CA's thing001 and an
    expired thing001 fail the TLS handshake (400 tls-handshake-failed), before any CONNACK."""
    fp = start_proxy(mosquitto, *mtls(certs, "required"), "--require-clientid-cn")
    before = U.broker_connections(mosquitto.log())
    pkt = U.connect_packet("thing001")
    for cert, key in [(None, None), (certs.rogue_client_cert, certs.rogue_client_key),
                      (certs.expired_client_cert, certs.expired_client_key)]:
        o = U.try_connect(fp.port, pkt, tls_ctx=ctx_for(certs, cert, key))
        assert o.connack is None and o.closed, (cert, o)
    entries = fp.wait_access(n=3)
    assert [(e.status, e.reason, e.clientid) for e in entries] == [(400, "tls-handshake-failed", "-")] * 3, \
        [e.raw for e in entries]
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, [])


def test_certificate_without_cn_is_refused(certs, identity_certs, mosquitto, start_proxy):
    """A verified certificate without a CN cannot match any ClientId: refused (0x02 or 0x05)."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-clientid-cn")
    before = U.broker_connections(mosquitto.log())
    ctx = ctx_for(certs, identity_certs.nocn_cert, identity_certs.nocn_key)
    for cid in ["", "nocn", "fastproxy tests"]:
        o = U.try_connect(fp.port, U.connect_packet(cid), tls_ctx=ctx)
        assert o.code in (0x02, 0x05) and o.closed, (cid, o)
    entries = fp.wait_access(n=3)
    assert all((e.status, e.reason) == (403, "denied") for e in entries), [e.raw for e in entries]
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, ["nocn"])


# ----------------------------------------------------------------------------- --require-username-cn


@pytest.mark.parametrize("version,code,text", [
    ("mqttv311", 0x05, "not authori"),
    ("mqttv5", 0x87, "Not authorized"),
])
def test_require_username_cn(certs, identity_certs, mosquitto, start_proxy, version, code, text):
    """--require-username-cn: -u thing001 is accepted (any ClientId); another user name or none is
    refused with 0x05 / 0x87; the password is never logged."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-username-cn")
    r = pub(fp.port, certs, "any-id-1", cert=certs.client_cert, key=certs.client_key, username="thing001",
            version=version)
    assert r.returncode == 0, out_of(r)
    U.wait_until(lambda: "any-id-1" in U.broker_client_ids(mosquitto.log()), 10, what="any-id-1 at the broker")
    before = U.broker_connections(mosquitto.log())
    for user in ["other", "THING001", "thing0011"]:
        r = pub(fp.port, certs, f"refused-{user}", cert=certs.client_cert, key=certs.client_key, username=user,
                version=version)
        assert r.returncode == code and text in out_of(r), (user, r.returncode, out_of(r))
    r = pub(fp.port, certs, "refused-nouser", cert=certs.client_cert, key=certs.client_key, version=version)
    assert r.returncode == code, (r.returncode, out_of(r))
    v = 5 if version == "mqttv5" else 4
    assert U.paho_connack(fp.port, certs, "refused-paho", version=v, certfile=certs.client_cert,
                          keyfile=certs.client_key, username="nobody", password="pw") == code
    entries = fp.wait_access(lambda e: e.status == 403, n=5)
    assert all((e.reason, e.cn) == ("denied", "thing001") for e in entries), [e.raw for e in entries]
    assert {e.clientid for e in entries} == {"refused-other", "refused-THING001", "refused-thing0011",
                                             "refused-nouser", "refused-paho"}
    lines = refusal_lines(fp)
    assert len(lines) == 5 and all("username" in m["why"] for m in lines), fp.stderr()
    assert "secret" not in fp.stderr() + "\n".join(fp.access_log())
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, [e.clientid for e in entries])


# ----------------------------------------------------------------------------- --clientid-template


@pytest.mark.parametrize("version,code", [(4, 0x02), (5, 0x85)])
def test_clientid_template_cn(certs, identity_certs, mosquitto, start_proxy, version, code):
    """--clientid-template '{cn}' behaves like --require-clientid-cn."""
    fp = start_proxy(mosquitto, *mtls(certs), "--clientid-template", "{cn}")
    before = U.broker_connections(mosquitto.log())
    ctx = ctx_for(certs, certs.client_cert, certs.client_key)
    for cid in ["thing001x", "THING001", "{cn}"]:
        o = U.try_connect(fp.port, U.connect_packet(cid, version=version), tls_ctx=ctx)
        assert o.code == code and o.closed, (cid, o)
    fp.wait_access(lambda e: e.status == 403, n=3)
    r = pub(fp.port, certs, "thing001", cert=certs.client_cert, key=certs.client_key,
            version="mqttv5" if version == 5 else None)
    assert r.returncode == 0, out_of(r)
    U.wait_until(lambda: "thing001" in U.broker_client_ids(mosquitto.log()), 10, what="thing001 at the broker")
    assert_nothing_reached_broker(mosquitto, before, ["thing001x", "THING001", "{cn}"])


def test_clientid_template_san_dns_any_value_matches(certs, identity_certs, mosquitto, start_proxy):
    """--clientid-template 'dev-{san_dns}' with a certificate carrying two SAN DNS names: either
    one is accepted (mosquitto_pub, and the broker sees it); other names, the CN, and a certificate
    without SAN DNS are refused with 0x02."""
    ic = identity_certs
    fp = start_proxy(mosquitto, *mtls(certs), "--clientid-template", "dev-{san_dns}")
    for name in ic.sensor_dns:
        r = pub(fp.port, certs, f"dev-{name}", cert=ic.sensor_cert, key=ic.sensor_key)
        assert r.returncode == 0, (name, out_of(r), fp.stderr()[-2000:])
    U.wait_until(lambda: {f"dev-{n}" for n in ic.sensor_dns} <= set(U.broker_client_ids(mosquitto.log())), 10,
                 what="both SAN ClientIds at the broker")
    entries = fp.wait_access(n=2)
    assert [(e.status, e.clientid, e.cn) for e in entries] == [(200, f"dev-{n}", "sensor-7") for n in ic.sensor_dns]
    before = U.broker_connections(mosquitto.log())
    refused = ["dev-sensor-7", "dev-c.sensor-7.example", "a.sensor-7.example", "dev-a.sensor-7.example.evil",
               "dev-" + ",".join(ic.sensor_dns), "sensor-7"]
    ctx = ctx_for(certs, ic.sensor_cert, ic.sensor_key)
    for cid in refused:
        o = U.try_connect(fp.port, U.connect_packet(cid), tls_ctx=ctx)
        assert o.code == 0x02 and o.closed, (cid, o)
    # a certificate without SAN DNS names matches nothing
    o = U.try_connect(fp.port, U.connect_packet("dev-thing001"), tls_ctx=ctx_for(certs, certs.client_cert,
                                                                                   certs.client_key))
    assert o.code in (0x02, 0x05) and o.closed, o
    fp.wait_access(lambda e: e.status == 403, n=len(refused) + 1)
    r = pub(fp.port, certs, f"dev-{ic.sensor_dns[1]}", cert=ic.sensor_cert, key=ic.sensor_key, message="again")
    assert r.returncode == 0, out_of(r)
    U.wait_until(lambda: U.broker_connections(mosquitto.log()) >= before + 1, 10, what="the good client")
    assert_nothing_reached_broker(mosquitto, before, refused + ["dev-thing001"])


@pytest.mark.parametrize("template", ["{san_uri}", "{cn}@{san_email}", "{cn}-{serial}", "fp-{fingerprint}"])
def test_clientid_template_other_fields(certs, identity_certs, mosquitto, start_proxy, template):
    """The other template fields expand from the certificate ({serial} and {fingerprint} as the
    policy's PeerCertificate reports them: lowercase hex); a wrong value is refused."""
    from fastproxy._tls import certificate_info

    ic = identity_certs
    der = U.cert_der(ic.sensor_cert)
    info = certificate_info(der)
    assert info["fingerprint_sha256"].replace(":", "").lower() == hashlib.sha256(der).hexdigest()
    good = template.format(cn="sensor-7", san_uri=ic.sensor_uri, san_email=ic.sensor_email,
                           serial=info["serial"], fingerprint=info["fingerprint_sha256"])
    fp = start_proxy(mosquitto, *mtls(certs), "--clientid-template", template)
    ctx = ctx_for(certs, ic.sensor_cert, ic.sensor_key)
    o = U.try_connect(fp.port, U.connect_packet(good, version=5), tls_ctx=ctx)
    assert o.code == 0, (good, o, fp.stderr()[-2000:])
    o = U.try_connect(fp.port, U.connect_packet(good + "0", version=5), tls_ctx=ctx)
    assert o.code == 0x85 and o.closed, o
    entries = fp.wait_access(n=2)
    assert [(e.status, e.clientid) for e in entries] == [(200, good), (403, good + "0")], [e.raw for e in entries]
    assert good in U.broker_client_ids(mosquitto.log())


# ----------------------------------------------------------------------------- --clientid-from-cn


def test_clientid_from_cn_mosquitto_pub_v5_empty_id(certs, mosquitto, start_proxy):
    """mosquitto_pub -V mqttv5 without -i sends an empty ClientId: with --clientid-from-cn the
    broker sees the CN as ClientId ("as thing001"), the message is delivered, the access log
    shows clientid thing001."""
    fp = start_proxy(mosquitto, *mtls(certs), "--clientid-from-cn")
    sub = U.MosqSub(mosquitto.port, None, TOPIC, count=1, client_id="direct-sub", qos=1, timeout=20)
    try:
        sub.wait_subscribed(mosquitto.log)
        r = pub(fp.port, certs, None, cert=certs.client_cert, key=certs.client_key, version="mqttv5",
                message="from-cn")
        assert r.returncode == 0, out_of(r)
        rc, out, err = sub.result(timeout=20)
    finally:
        sub.kill()
    assert out.strip() == b"from-cn", (rc, out, err)
    ids = U.broker_client_ids(mosquitto.log())
    assert "thing001" in ids, mosquitto.log()[-2000:]
    assert not any(i.startswith("auto-") for i in ids), f"the broker assigned a ClientId itself: {ids}"
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.clientid, e.cn) == (200, "thing001", "thing001"), e.raw


@pytest.mark.parametrize("version", [3, 4, 5])
def test_clientid_from_cn_rewrite_keeps_following_packets(certs, mosquitto, start_proxy, version):
    """An empty ClientId CONNECT coalesced with a PUBLISH in one write: the CONNECT is re-encoded
    with ClientId thing001 and the PUBLISH behind it reaches the broker intact. A non-empty
    ClientId is left alone."""
    fp = start_proxy(mosquitto, *mtls(certs), "--clientid-from-cn")
    sub = U.MosqSub(mosquitto.port, None, TOPIC, count=2, client_id="direct-sub", timeout=20)
    try:
        sub.wait_subscribed(mosquitto.log)
        ctx = ctx_for(certs, certs.client_cert, certs.client_key)
        payload = bytes(range(33, 127)) * 50
        pub_pkt = U.publish_packet(TOPIC, payload, version=5 if version == 5 else 4)
        s = U.open_socket(fp.port, tls_ctx=ctx)
        try:
            s.sendall(encode_connect(version, "", keepalive=30) + pub_pkt)
            ptype, _, body = U.read_packet(s)
            assert ptype == 2 and body[1] == 0, body
        finally:
            s.close()
        s = U.open_socket(fp.port, tls_ctx=ctx)
        try:
            s.sendall(encode_connect(version, "kept-id", keepalive=30) + pub_pkt)
            ptype, _, body = U.read_packet(s)
            assert ptype == 2 and body[1] == 0, body
            s.sendall(U.DISCONNECT)
            U.wait_closed(s, 10)
        finally:
            s.close()
        rc, out, err = sub.result(timeout=20)
    finally:
        sub.kill()
    assert out == payload + b"\n" + payload + b"\n", (rc, len(out), err)
    ids = U.broker_client_ids(mosquitto.log())
    assert ids == ["direct-sub", "thing001", "kept-id"], ids
    entries = fp.wait_access(n=2)
    assert sorted(e.clientid for e in entries) == ["kept-id", "thing001"], [e.raw for e in entries]


def test_clientid_from_cn_with_require_clientid_cn(certs, identity_certs, mosquitto, start_proxy):
    """--clientid-from-cn with --require-clientid-cn: empty is rewritten then accepted (paho v5 with
    an empty ClientId), the CN itself is accepted, anything else is still refused."""
    fp = start_proxy(mosquitto, *mtls(certs), "--clientid-from-cn", "--require-clientid-cn")
    assert U.paho_connack(fp.port, certs, "", version=5, certfile=certs.client_cert,
                          keyfile=certs.client_key) == 0
    U.wait_until(lambda: "thing001" in U.broker_client_ids(mosquitto.log()), 10, what="thing001 at the broker")
    before = U.broker_connections(mosquitto.log())
    assert U.paho_connack(fp.port, certs, "other", version=4, certfile=certs.client_cert,
                          keyfile=certs.client_key) == 0x02
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, ["other"])
    entries = fp.access_entries()
    assert [(e.status, e.clientid) for e in entries[:2]] == [(200, "thing001"), (403, "other")], \
        [e.raw for e in entries]


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("flags,flag", [
    (["--require-clientid-cn"], "--require-clientid-cn"),
    (["--require-username-cn"], "--require-username-cn"),
    (["--clientid-from-cn"], "--clientid-from-cn"),
    (["--clientid-template", "{cn}"], "--clientid-template"),
    (["--clientid-template", "{common_name}", "--client-ca", "CA"], "--clientid-template"),
    (["--clientid-template", "plain", "--client-ca", "CA"], "--clientid-template"),
    (["--require-clientid-cn", "--client-ca", "CA", "--mqtt", "off"], "--require-clientid-cn"),
])
def test_identity_flags_need_client_certificates_and_mqtt(certs, flags, flag):
    """Identity checks without client certificates, with an unknown template field, or with
    --mqtt off are configuration errors: exit 2, one line naming the flag."""
    flags = [certs.ca_cert if f == "CA" else f for f in flags]
    r = U.run_cli("check", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1883",
                  "--tls-cert", certs.server_cert, "--tls-key", certs.server_key, *flags)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastproxy: configuration error: command line: " + flag), r.stderr


# ----------------------------------------------------------------------------- refusals leak nothing


@pytest.mark.parametrize("version,code", [(4, 0x02), (5, 0x85)])
def test_refused_connect_with_coalesced_publish_leaks_nothing(certs, identity_certs, mosquitto, start_proxy,
                                                              version, code):
    """A refused CONNECT written together with a PUBLISH: the client still reads its CONNACK, and
    neither packet reaches the broker (no connection, no PUBLISH in Mosquitto's log)."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-clientid-cn")
    before = U.broker_connections(mosquitto.log())
    data = U.connect_packet("BADTHING", version=version) + U.publish_packet(
        "leak/t", b"must not arrive", version=version) * 20
    o = U.try_connect(fp.port, data, tls_ctx=ctx_for(certs, certs.client_cert, certs.client_key))
    assert o.code == code and o.closed, o
    good_client_proof(fp, mosquitto, certs, identity_certs)
    assert_nothing_reached_broker(mosquitto, before, ["BADTHING"])
    assert "leak/t" not in mosquitto.log()


def test_clientid_with_newline_cannot_forge_log_lines(certs, identity_certs, mosquitto, start_proxy):
    """ClientIds are attacker-controlled. One holding a newline and a fake access-log line is
    refused by the CONNECT check itself (control characters, as Mosquitto refuses them: CONNACK
    0x85, 400 bad-connect) and appears in no log; one holding spaces and a fake line's fields
    is refused by the identity rule and stays one field of one access-log line and of one
    error-log line."""
    fp = start_proxy(mosquitto, *mtls(certs), "--require-clientid-cn")
    dev = ctx_for(certs, certs.client_cert, certs.client_key)
    forged = "x\n127.0.0.1 [01/Jan/2030:00:00:00 +0000] TLSv1.3 200 1 1 0.001 ok thing001 thing001"
    o = U.try_connect(fp.port, U.connect_packet(forged, version=5), tls_ctx=dev)
    assert o.code == 0x85 and o.closed, o
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid) == (400, "bad-connect", "-"), e.raw
    spaced = "x 127.0.0.1 [01/Jan/2031:00:00:00 +0000] TLSv1.3 200 1 1 0.001 ok thing001 thing001"
    o = U.try_connect(fp.port, U.connect_packet(spaced, version=5), tls_ctx=dev)
    assert o.code == 0x85 and o.closed, o
    e = fp.wait_access(n=2)[1]
    assert (e.status, e.reason, e.cn) == (403, "denied", "thing001"), e.raw
    assert " " not in e.clientid
    assert len(fp.access_log()) == 2, fp.access_log()
    assert not [ln for ln in fp.stderr().splitlines() if "01/Jan/2030" in ln]
    err = [ln for ln in fp.stderr().splitlines() if "01/Jan/2031" in ln]
    assert len(err) == 1 and "refused client" in err[0], err
