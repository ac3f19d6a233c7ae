"""Client-certificate PKI options: --crl, --verify-depth with an intermediate CA, --client-ca DIR.

Certificates are minted here: root CA -> intermediate CA -> device, plus a device of the root
that a CRL revokes. Outcomes are read from the proxy's access log and the client's view.
"""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess

import pytest

import proxyutil as U


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject_key, cn, issuer_key, issuer_name, *, ca, serial=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer_name)
            .public_key(subject_key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def pem(c):
        return c.public_bytes(serialization.Encoding.PEM)

    def write_key(k, fname):
        p = d / fname
        p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return str(p)

    root_k = ec.generate_private_key(ec.SECP256R1())
    root = cert(root_k, "pki root", root_k, name("pki root"), ca=True)
    inter_k = ec.generate_private_key(ec.SECP256R1())
    inter = cert(inter_k, "pki intermediate", root_k, root.subject, ca=True)
    chained_k = ec.generate_private_key(ec.SECP256R1())
    chained = cert(chained_k, "chained001", inter_k, inter.subject, ca=False)
    good_k = ec.generate_private_key(ec.SECP256R1())
    good = cert(good_k, "good001", root_k, root.subject, ca=False)
    revoked_k = ec.generate_private_key(ec.SECP256R1())
    revoked = cert(revoked_k, "revoked001", root_k, root.subject, ca=False)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.subject)
        .last_update(now - dt.timedelta(hours=1))
        .next_update(now + dt.timedelta(days=7))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(revoked.serial_number).revocation_date(now).build()
        )
        .sign(root_k, hashes.SHA256())
    )
    (d / "root.crt").write_bytes(pem(root))
    (d / "chained-chain.crt").write_bytes(pem(chained) + pem(inter))  # device sends its intermediate
    (d / "good.crt").write_bytes(pem(good))
    (d / "revoked.crt").write_bytes(pem(revoked))
    (d / "root.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    cadir = d / "cadir"
    cadir.mkdir()
    shutil.copy(d / "root.crt", cadir / "root.pem")
    subprocess.run(["openssl", "rehash", str(cadir)], check=True, capture_output=True)
    return {
        "dir": d,
        "root": str(d / "root.crt"),
        "cadir": str(cadir),
        "crl": str(d / "root.crl"),
        "chained": (str(d / "chained-chain.crt"), write_key(chained_k, "chained.key")),
        "good": (str(d / "good.crt"), write_key(good_k, "good.key")),
        "revoked": (str(d / "revoked.crt"), write_key(revoked_k, "revoked.key")),
    }


def _attempt(fp, certs, pki, who: str, client_id: str):
    cert, key = pki[who]
    ctx = U.client_context(certs, cert=cert, key=key)
    return U.try_connect(fp.port, U.connect_packet(client_id), tls_ctx=ctx, timeout=5)


def _mtls(pki, *extra):
    return ("--client-ca", pki["root"], "--verify", "required", *extra)


def test_crl_refuses_revoked_certificate(mosquitto, start_proxy, certs, pki):
    fp = start_proxy(mosquitto, *_mtls(pki, "--crl", pki["crl"]))
    bad = _attempt(fp, certs, pki, "revoked", "revoked001")
    assert bad.code is None and bad.closed, bad
    ok = _attempt(fp, certs, pki, "good", "good001")
    assert ok.code == 0, ok
    entries = fp.wait_access(n=2, timeout=10)
    by_status = sorted((e.status, e.reason) for e in entries)
    assert by_status == [(200, "ok"), (400, "tls-handshake-failed")], [e.raw for e in entries]
    assert "revoked" in fp.stderr(), fp.stderr()   # the error log names the cause


def test_without_crl_the_revoked_certificate_passes(mosquitto, start_proxy, certs, pki):
    """The CRL test above means something: the same certificate is fine without --crl."""
    fp = start_proxy(mosquitto, *_mtls(pki))
    assert _attempt(fp, certs, pki, "revoked", "revoked001").code == 0


# OpenSSL's depth (as nginx's ssl_verify_depth): intermediates allowed below the trust anchor.
@pytest.mark.parametrize("depth,accepted", [(0, False), (1, True)])
def test_verify_depth_with_intermediate(mosquitto, start_proxy, certs, pki, depth, accepted):
    fp = start_proxy(mosquitto, *_mtls(pki, "--verify-depth", str(depth)))
    out = _attempt(fp, certs, pki, "chained", "chained001")
    if accepted:
        assert out.code == 0, out
        e = fp.wait_access(n=1, timeout=10)[0]
        assert (e.status, e.cn) == (200, "chained001"), e.raw
    else:
        assert out.code is None and out.closed, out
        e = fp.wait_access(n=1, timeout=10)[0]
        assert (e.status, e.reason) == (400, "tls-handshake-failed"), e.raw


def test_client_ca_directory(mosquitto, start_proxy, certs, pki):
    fp = start_proxy(mosquitto, "--client-ca", pki["cadir"], "--verify", "required")
    assert _attempt(fp, certs, pki, "good", "good001").code == 0
    # a certificate from a CA that is not in the directory is still refused
    bad = U.try_connect(fp.port, U.connect_packet("thing001"),
                        tls_ctx=U.client_context(certs, cert=certs.client_cert, key=certs.client_key), timeout=5)
    assert bad.code is None and bad.closed, bad
