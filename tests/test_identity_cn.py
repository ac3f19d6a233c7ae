"""The identity the broker is told is the identity checked (issue 13, part 1).

One CN reader serves the identity rules, templates, the access log, policy's PeerCertificate
and the PROXY v2 CN sub-TLV. A certificate whose subject has two CNs (`CN=admin, CN=thing001`,
signed by the trusted CA) has no CN at all: it is refused wherever a CN-based rule or the CN
TLV applies, and nothing reaches the broker. A certificate that was not verified (`--verify
optional`) is never forwarded as an identity: no CN sub-TLV, no CERT_CONN/CERT_SESS bits.

Real TLS with the tests' PKI, a real Mosquitto where the broker only has to be reached, and a
recording upstream where the PROXY header's bytes are the point.
"""
from __future__ import annotations

import socket
import ssl

import pytest

import proxyutil as U
from fastproxy import _tls
from fastproxy import proxy_protocol as pp
from recorder import Recorder


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def ctx_with(certs, cert=None, key=None):
    return U.client_context(certs, cert=cert, key=key)


def refusal_detail(fp, text: str) -> None:
    U.wait_until(lambda: text in fp.stderr(), 10, what=f"{text!r} in the error log")


def test_two_cn_certificate_has_no_cn_for_policy(identity_certs):
    """policy's PeerCertificate.cn (certificate_info) reads the CN the engine reads: none."""
    assert _tls.certificate_info(U.cert_der(identity_certs.twocn_cert))["cn"] is None
    assert _tls.certificate_info(U.cert_der(identity_certs.thing002_cert))["cn"] == "thing002"


@pytest.mark.parametrize("version,code", [(4, 0x05), (5, 0x87)])
@pytest.mark.parametrize("cid", ["thing001", "admin"])
def test_two_cn_certificate_refused_by_require_clientid_cn(certs, identity_certs, mosquitto, start_proxy,
                                                           version, code, cid):
    """Neither CN passes --require-clientid-cn: the first is what HAProxy/Mosquitto would take,
    the last what OpenSSL-style readers take; either lets one identity be checked and another
    be forwarded. Refused with CONNACK 0x05 / 0x87, logged, nothing at the broker."""
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--verify", "required",
                     "--require-clientid-cn", "--proxy-protocol", "v2-ssl-cn")
    before = U.broker_connections(mosquitto.log())
    o = U.try_connect(fp.port, U.connect_packet(cid, version=version),
                      tls_ctx=ctx_with(certs, identity_certs.twocn_cert, identity_certs.twocn_key))
    assert o.code == code and o.closed, o
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid, e.cn) == (403, "denied", cid, "-"), e.raw
    refusal_detail(fp, "client certificate has more than one CN")
    assert U.broker_connections(mosquitto.log()) == before


@pytest.mark.parametrize("version,code", [(4, 0x05), (5, 0x87)])
def test_two_cn_certificate_refused_where_the_cn_tlv_is_sent(certs, identity_certs, start_proxy, recorder,
                                                            version, code):
    """No identity rule, but --proxy-protocol v2-ssl-cn would tell the broker a CN: refused
    with 0x05 / 0x87 before any upstream connection. The same certificate under v2-ssl (no CN
    sent) and a one-CN certificate under v2-ssl-cn get through."""
    fp = start_proxy(recorder.upstream, "--client-ca", certs.ca_cert, "--proxy-protocol", "v2-ssl-cn")
    two = ctx_with(certs, identity_certs.twocn_cert, identity_certs.twocn_key)
    o = U.try_connect(fp.port, U.connect_packet("thing001", version=version), tls_ctx=two)
    assert o.code == code and o.closed, o
    refusal_detail(fp, "client certificate has more than one CN")
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (403, "denied"), e.raw
    o = U.try_connect(fp.port, U.connect_packet("thing002", keepalive=30, version=version),
                      tls_ctx=ctx_with(certs, identity_certs.thing002_cert, identity_certs.thing002_key))
    assert o.code == 0, o
    rec = recorder.wait_connect(1)
    assert rec.parsed.ssl.cn == "thing002"
    assert recorder.connection_count() == 1, "the two-CN client reached the upstream"

    fp2 = start_proxy(recorder.upstream, "--client-ca", certs.ca_cert, "--proxy-protocol", "v2-ssl")
    o = U.try_connect(fp2.port, U.connect_packet("whoever", keepalive=30, version=version), tls_ctx=two)
    assert o.code == 0, o
    rec = recorder.wait_connect(2)
    assert rec.parsed.ssl.cn is None and rec.parsed.ssl.verify == 0


def test_two_cn_certificate_refused_by_template_and_logged_without_cn(certs, identity_certs, mosquitto,
                                                                     start_proxy):
    """--clientid-template '{cn}' (policy side): no CN, so no ClientId can match. Without any
    CN rule the client is served, and the access log shows no CN for it."""
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--clientid-template", "{cn}")
    two = ctx_with(certs, identity_certs.twocn_cert, identity_certs.twocn_key)
    for cid in ("admin", "thing001"):
        o = U.try_connect(fp.port, U.connect_packet(cid), tls_ctx=two)
        assert o.code not in (None, 0) and o.closed, (cid, o)
    plain = start_proxy(mosquitto, "--client-ca", certs.ca_cert)
    o = U.try_connect(plain.port, U.connect_packet("two-cn-dev", keepalive=30), tls_ctx=two)
    assert o.code == 0, o
    U.wait_until(lambda: "two-cn-dev" in U.broker_client_ids(mosquitto.log()), 10, what="two-cn-dev at the broker")
    assert "admin" not in U.broker_client_ids(mosquitto.log())


@pytest.mark.parametrize("cert_kind", ["rogue", "expired"])
def test_unverified_certificate_is_never_forwarded_as_identity(certs, start_proxy, recorder, cert_kind):
    """--verify optional + v2-ssl-cn: a certificate that failed verification (untrusted CA, or
    expired) with CN thing001 gets through (no rule asks for identity), but the SSL TLV says
    only "TLS": no CERT_CONN/CERT_SESS, no CN sub-TLV, and verify is non-zero. A verified one
    gets all three."""
    cert, key = ((certs.rogue_client_cert, certs.rogue_client_key) if cert_kind == "rogue"
                 else (certs.expired_client_cert, certs.expired_client_key))
    fp = start_proxy(recorder.upstream, "--client-ca", certs.ca_cert, "--verify", "optional",
                     "--proxy-protocol", "v2-ssl-cn")
    o = U.try_connect(fp.port, U.connect_packet("thing001", keepalive=30), tls_ctx=ctx_with(certs, cert, key))
    assert o.code == 0, o
    h = recorder.wait_connect(1).parsed
    assert h.ssl.client == pp.PP2_CLIENT_SSL, h.ssl
    assert h.ssl.cn is None and h.ssl.verify != 0, h.ssl
    (e,) = fp.wait_access(lambda e: e.status == 200, n=1)
    assert e.cn == "-", e.raw

    o = U.try_connect(fp.port, U.connect_packet("thing001", keepalive=30),
                      tls_ctx=ctx_with(certs, certs.client_cert, certs.client_key))
    assert o.code == 0, o
    h = recorder.wait_connect(2).parsed
    assert h.ssl.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS, h.ssl
    assert (h.ssl.cn, h.ssl.verify) == ("thing001", 0), h.ssl


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumed_session_keeps_the_certificate_identity(certs, start_proxy, recorder, version):
    """A device resuming its TLS session (a ticket) sends no certificate: its identity is the
    one of the handshake it resumes, on both TLS libraries (AWS-LC keeps only the certificate's
    hash, so fastproxy seals the certificate into its own tickets). --require-clientid-cn
    accepts its ClientId and refuses another before the broker; the PROXY v2 CN TLV names it,
    with CERT_SESS but not CERT_CONN (the certificate came with the session, as HAProxy says)."""
    fp = start_proxy(recorder.upstream, "--client-ca", certs.ca_cert, "--require-clientid-cn",
                     "--proxy-protocol", "v2-ssl-cn")
    ctx = U.client_context(certs, min_version=version, max_version=version,
                           cert=certs.client_cert, key=certs.client_key)

    def session(cid: str, resume=None):
        raw = socket.create_connection((U.HOST, fp.port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname="localhost", session=resume)
        try:
            s.sendall(U.connect_packet(cid, keepalive=30))
            ptype, _, body = U.read_packet(s)     # the TLS 1.3 ticket has arrived before it
            return s.session, s.session_reused, body[1] if ptype == 2 else None
        finally:
            s.close()

    first, reused, rc = session("thing001")
    assert (reused, rc) == (False, 0)
    _, reused, rc = session("thing001", first)
    assert (reused, rc) == (True, 0)
    _, reused, rc = session("thing002", first)
    assert reused and rc == 0x02, rc          # 3.1.1: identifier rejected; nothing sent upstream
    h1, h2 = recorder.wait_connect(1).parsed, recorder.wait_connect(2).parsed
    full = pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
    assert (h1.ssl.client, h1.ssl.cn, h1.ssl.verify) == (full, "thing001", 0), h1.ssl
    assert (h2.ssl.client, h2.ssl.cn, h2.ssl.verify) == (full & ~pp.PP2_CLIENT_CERT_CONN, "thing001", 0), h2.ssl
    assert recorder.connection_count() == 2
    entries = fp.wait_access(n=3)
    assert [e.cn for e in entries] == ["thing001"] * 3, [e.raw for e in entries]
