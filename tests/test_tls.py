"""TLS termination: versions, ALPN, bad handshakes, startup refusal of unusable keys, mTLS."""
from __future__ import annotations

import random
import re
import socket
import ssl
import time
import warnings

import pytest

import proxyutil as U


def attempt(port: int, ctx: ssl.SSLContext, client_id: str, timeout: float = 10.0) -> tuple[str, str]:
    """TLS handshake + MQTT CONNECT/CONNACK. Returns ("ok"|"refused"|"timeout", detail)."""
    try:
        s = U.open_socket(port, tls_ctx=ctx, timeout=timeout)
    except (TimeoutError, socket.timeout) as e:
        return "timeout", f"handshake timed out: {e}"
    except (ssl.SSLError, OSError) as e:
        return "refused", f"handshake: {e!r}"
    try:
        rc = U.mqtt_handshake(s, client_id)
        return ("ok" if rc == 0 else "refused"), f"connack rc={rc} version={s.version()}"
    except (TimeoutError, socket.timeout) as e:
        return "timeout", f"no CONNACK and no close within {timeout}s: {e}"
    except (ssl.SSLError, OSError) as e:
        return "refused", f"after handshake: {e!r}"
    finally:
        s.close()


def relay_works(port: int, paho_client, tag: str) -> None:
    sub = paho_client(port, client_id=f"{tag}-sub")
    sub.subscribe(f"{tag}/t", 1)
    pub = paho_client(port, client_id=f"{tag}-pub")
    pub.publish(f"{tag}/t", b"still serving", qos=1)
    got = sub.collect(1, timeout=10)
    assert got and got[0].payload == b"still serving"


def _assert_clean_close(fp, sock: socket.socket, send: bytes) -> None:
    t0 = time.monotonic()
    sock.sendall(send)
    closed, data, waited = U.wait_closed(sock, 10)
    sock.close()
    assert closed, f"the proxy kept the connection open for {waited:.1f}s after a bad handshake"
    assert not data.startswith(b"\x20"), "got an MQTT CONNACK on the TLS port"
    (e,) = fp.wait_access(lambda e: e.status == 400, n=1, timeout=10)
    assert e.reason == "tls-handshake-failed", e.raw
    assert e.protocol == "TLS", e.raw
    assert e.sent == 0 and e.received == 0, e.raw  # application bytes: none
    assert fp.proc.poll() is None, "the proxy died"
    assert time.monotonic() - t0 < 15


def test_plain_mqtt_on_tls_port(mosquitto, start_proxy, paho_client):
    """Plain MQTT CONNECT sent to the TLS port: the connection is closed and logged 400; serving goes on."""
    fp = start_proxy(mosquitto)
    s = U.open_socket(fp.port)
    _assert_clean_close(fp, s, U.connect_packet("plain-on-tls"))
    assert "plain-on-tls" not in mosquitto.log(), "plain bytes reached the broker"
    relay_works(fp.port, paho_client, "after-plain")


GARBAGE = {
    # a TLS handshake record that holds an unknown handshake message
    "bad-handshake-type": b"\x16\x03\x01\x00\x10" + b"\xff" * 16,
    # a ClientHello header whose body is nonsense
    "bogus-client-hello": b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c" + bytes(random.Random(7).randrange(256) for _ in range(44)),
    # an HTTP request on the TLS port
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    # random bytes that do not start like a TLS record
    "random": b"\x00" + bytes(random.Random(1234).randrange(256) for _ in range(511)),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_client_hello(mosquitto, start_proxy, paho_client, kind):
    """A garbage ClientHello is answered with a close (400 tls-handshake-failed); the proxy keeps serving."""
    fp = start_proxy(mosquitto)
    s = U.open_socket(fp.port)
    _assert_clean_close(fp, s, GARBAGE[kind])
    relay_works(fp.port, paho_client, f"after-{kind}")


def test_handshake_timeout(mosquitto, start_proxy, paho_client, raw_sockets):
    """A client that connects and sends nothing is cut after --handshake-timeout (400 tls-handshake-timeout)."""
    fp = start_proxy(mosquitto, "--handshake-timeout", "1")
    s = raw_sockets(U.open_socket(fp.port))
    closed, data, waited = U.wait_closed(s, 8)
    assert closed, f"connection still open {waited:.1f}s after connect with --handshake-timeout 1"
    assert waited >= 0.5, f"closed after {waited:.2f}s, before the handshake timeout"
    (e,) = fp.wait_access(lambda e: e.status == 400, n=1)
    assert e.reason == "tls-handshake-timeout", e.raw
    # a half-sent ClientHello is cut as well
    s2 = raw_sockets(U.open_socket(fp.port))
    s2.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    closed, _, waited = U.wait_closed(s2, 8)
    assert closed, "a stalled partial ClientHello was not cut"
    fp.wait_access(lambda e: e.reason == "tls-handshake-timeout", n=2)
    relay_works(fp.port, paho_client, "after-timeout")


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_tls_versions(certs, mosquitto, start_proxy, version):
    """Both TLS 1.2 and TLS 1.3 clients complete a handshake and an MQTT round trip (default min TLSv1.2)."""
    fp = start_proxy(mosquitto)
    v = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else ssl.TLSVersion.TLSv1_3
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs, min_version=v, max_version=v))
    assert s.version() == version
    assert U.mqtt_handshake(s, f"client-{version}") == 0
    s.sendall(U.DISCONNECT)
    U.wait_closed(s, 10)
    s.close()
    (e,) = fp.wait_access(n=1)
    assert e.protocol == version


def test_tls11_refused(certs, mosquitto, start_proxy):
    """TLS 1.1 is never accepted (the default minimum is TLSv1.2)."""
    fp = start_proxy(mosquitto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = U.client_context(certs, max_version=ssl.TLSVersion.TLSv1_1)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    outcome, detail = attempt(fp.port, ctx, "tls11")
    assert outcome == "refused", detail


def test_min_version_tls13(certs, mosquitto, start_proxy):
    """--tls-min-version TLSv1.3 refuses a TLS 1.2-only client and accepts a TLS 1.3 one."""
    fp = start_proxy(mosquitto, "--tls-min-version", "TLSv1.3")
    ctx12 = U.client_context(certs, max_version=ssl.TLSVersion.TLSv1_2)
    outcome, detail = attempt(fp.port, ctx12, "only12")
    assert outcome == "refused", detail
    (e,) = fp.wait_access(lambda e: e.status == 400, n=1)
    assert e.reason == "tls-handshake-failed", e.raw
    outcome, detail = attempt(fp.port, U.client_context(certs), "v13")
    assert outcome == "ok", detail
    assert "TLSv1.3" in detail


def test_alpn_mqtt(certs, mosquitto, start_proxy):
    """ALPN: `mqtt` is selected when the client offers it; a client without ALPN still works."""
    fp = start_proxy(mosquitto)
    for offer in (["mqtt"], ["x-unknown", "mqtt"]):
        s = U.open_socket(fp.port, tls_ctx=U.client_context(certs, alpn=offer))
        try:
            assert s.selected_alpn_protocol() == "mqtt", offer
            assert U.mqtt_handshake(s, "alpn-" + offer[0]) == 0
        finally:
            s.close()
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs))
    try:
        assert s.selected_alpn_protocol() is None
        assert U.mqtt_handshake(s, "no-alpn") == 0
    finally:
        s.close()


def test_ciphers_flags(certs, mosquitto, start_proxy):
    """--tls-ciphers / --tls-ciphersuites restrict what is negotiated."""
    fp = start_proxy(mosquitto, "--tls-ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256",
                     "--tls-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256")
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs, max_version=ssl.TLSVersion.TLSv1_2))
    assert s.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    s.close()
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs, min_version=ssl.TLSVersion.TLSv1_3))
    assert s.cipher()[0] == "TLS_CHACHA20_POLY1305_SHA256"
    assert U.mqtt_handshake(s, "cipher13") == 0
    s.close()
    ctx = U.client_context(certs, max_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
    outcome, detail = attempt(fp.port, ctx, "wrong-cipher")
    assert outcome == "refused", detail


# ----------------------------------------------------------------------------- unusable keys


def _serve_args(certs, cert: str, key: str) -> list[str]:
    return ["--listen", f"127.0.0.1:{U.free_port()}", "--upstream", "127.0.0.1:1883",
            "--tls-cert", cert, "--tls-key", key]


def _assert_config_error(r, flag: str) -> str:
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("fastproxy: configuration error: ")]
    assert errs, r.stderr
    assert flag in errs[0], errs[0]
    return errs[0]


@pytest.mark.parametrize("command", ["serve", "check"])
def test_encrypted_key_refused(certs, command):
    """An encrypted private key is refused at startup: exit 2, one clear line, no prompt, no traceback."""
    t0 = time.monotonic()
    r = U.run_cli(command, *_serve_args(certs, certs.server_cert, certs.server_key_encrypted), timeout=30)
    line = _assert_config_error(r, "--tls-key")
    assert re.search(r"encrypt|passphrase|password", line, re.I), line
    assert "Enter PEM pass phrase" not in r.stdout + r.stderr
    assert time.monotonic() - t0 < 30


def test_encrypted_key_in_config_file(certs, tmp_path):
    cfg = tmp_path / "enc.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{U.free_port()}"\nupstream = "127.0.0.1:1883"\n'
        f'tls_cert = "{certs.server_cert}"\ntls_key = "{certs.server_key_encrypted}"\n'
    )
    r = U.run_cli("check", "-c", str(cfg))
    line = _assert_config_error(r, "tls_key")
    assert str(cfg) in line


@pytest.mark.parametrize("case", ["key-mismatch", "garbage-cert", "cert-as-key"])
def test_unusable_cert_or_key_refused(certs, case):
    """A key that does not match the certificate, or a file that is not PEM, is a config error (exit 2)."""
    cert, key, flag = {
        "key-mismatch": (certs.server_cert, certs.other_key, "--tls-"),
        "garbage-cert": (certs.garbage_pem, certs.server_key, "--tls-cert"),
        "cert-as-key": (certs.server_cert, certs.server_cert, "--tls-key"),
    }[case]
    r = U.run_cli("serve", *_serve_args(certs, cert, key), timeout=30)
    _assert_config_error(r, flag)


# ----------------------------------------------------------------------------- mTLS


@pytest.fixture
def mtls_proxy(certs, mosquitto, start_proxy):
    return start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--verify", "required")


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_mtls_required_without_cert_refused(certs, mtls_proxy, version):
    v = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else ssl.TLSVersion.TLSv1_3
    outcome, detail = attempt(mtls_proxy.port, U.client_context(certs, min_version=v, max_version=v), "nocert")
    assert outcome == "refused", detail
    (e,) = mtls_proxy.wait_access(n=1)
    assert (e.status, e.reason) == (400, "tls-handshake-failed"), e.raw


@pytest.mark.parametrize("which", ["untrusted-ca", "expired"])
def test_mtls_bad_client_cert_refused(certs, mtls_proxy, which):
    cert, key = {
        "untrusted-ca": (certs.rogue_client_cert, certs.rogue_client_key),
        "expired": (certs.expired_client_cert, certs.expired_client_key),
    }[which]
    outcome, detail = attempt(mtls_proxy.port, U.client_context(certs, cert=cert, key=key), "badcert")
    assert outcome == "refused", detail
    (e,) = mtls_proxy.wait_access(n=1)
    assert (e.status, e.reason) == (400, "tls-handshake-failed"), e.raw


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_mtls_valid_client_cert_accepted(certs, mtls_proxy, version):
    v = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else ssl.TLSVersion.TLSv1_3
    ctx = U.client_context(certs, cert=certs.client_cert, key=certs.client_key, min_version=v, max_version=v)
    s = U.open_socket(mtls_proxy.port, tls_ctx=ctx)
    assert U.mqtt_handshake(s, "thing001") == 0
    s.sendall(U.DISCONNECT)
    U.wait_closed(s, 10)
    s.close()
    (e,) = mtls_proxy.wait_access(n=1)
    assert (e.status, e.protocol) == (200, version), e.raw


def test_mtls_cn_in_access_log(certs, mtls_proxy):
    """The verified client certificate's CN is the access log's $cn field."""
    ctx = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    outcome, detail = attempt(mtls_proxy.port, ctx, "cn-check")
    assert outcome == "ok", detail
    (e,) = mtls_proxy.wait_access(n=1)
    assert e.cn == "thing001", e.raw


def test_mtls_paho_with_client_cert(certs, mtls_proxy, paho_client):
    sub = paho_client(mtls_proxy.port, client_id="thing001-sub", certfile=certs.client_cert, keyfile=certs.client_key)
    sub.subscribe("things/thing001", 1)
    pub = paho_client(mtls_proxy.port, client_id="thing001", certfile=certs.client_cert, keyfile=certs.client_key)
    pub.publish("things/thing001", b"telemetry", qos=1)
    got = sub.collect(1, timeout=10)
    assert got and got[0].payload == b"telemetry"


def test_mtls_optional(certs, mosquitto, start_proxy):
    """--verify optional: no certificate is accepted (cn -), a valid one is accepted (cn thing001)."""
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--verify", "optional")
    outcome, detail = attempt(fp.port, U.client_context(certs), "anon")
    assert outcome == "ok", detail
    ctx = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    outcome, detail = attempt(fp.port, ctx, "thing001")
    assert outcome == "ok", detail
    entries = fp.wait_access(n=2)
    assert all(e.status == 200 for e in entries), [e.raw for e in entries]


@pytest.mark.parametrize("which", ["untrusted-ca", "expired"])
def test_mtls_optional_unverified_cert_is_not_an_identity(certs, mosquitto, start_proxy, which):
    """--verify optional with a certificate that fails verification: either the connection is refused
    (nginx `optional`), or it is let through as anonymous. It must never be logged with the
    certificate's CN, which would make a forged `thing001` look like the verified one."""
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--verify", "optional")
    cert, key = {
        "untrusted-ca": (certs.rogue_client_cert, certs.rogue_client_key),
        "expired": (certs.expired_client_cert, certs.expired_client_key),
    }[which]
    outcome, detail = attempt(fp.port, U.client_context(certs, cert=cert, key=key), "forged")
    assert outcome in ("ok", "refused"), detail
    (e,) = fp.wait_access(n=1)
    if outcome == "refused":
        assert (e.status, e.reason) == (400, "tls-handshake-failed"), e.raw
    assert e.cn != "thing001", f"an unverified certificate's CN was logged as the client identity: {e.raw}"
