"""`fastproxy check` reports deployment problems (fastproxy/checks.py): a listen port already in
use, a server certificate expired / expiring within 30 days / not valid yet, a certificate
file without its intermediate, an expiring client CA; a key that does not match is a
configuration error. Each through the real CLI, asserting the exact warning lines."""
from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path

import pytest

import proxyutil as U

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
WARN = "fastproxy: warning: "


# ----------------------------------------------------------------------------- a small PKI


class Pki:
    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def name(self, cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastproxy check tests"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(self, cn: str, issuer=None, *, ca: bool = False, not_before: dt.datetime | None = None,
             not_after: dt.datetime | None = None):
        """(key, certificate); self-signed without issuer=(key, certificate)."""
        k = ec.generate_private_key(ec.SECP256R1())
        ik, ic = issuer if issuer else (k, None)
        b = (x509.CertificateBuilder()
             .subject_name(self.name(cn))
             .issuer_name(ic.subject if ic is not None else self.name(cn))
             .public_key(k.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(not_before or NOW - dt.timedelta(days=1))
             .not_valid_after(not_after or NOW + dt.timedelta(days=400))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return k, b.sign(ik, hashes.SHA256())

    def write(self, fname: str, *items) -> str:
        """Write certificates and/or keys (PEM, in order) to fname; returns the path."""
        out = b""
        for it in items:
            if isinstance(it, x509.Certificate):
                out += it.public_bytes(serialization.Encoding.PEM)
            else:
                out += it.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        p = self.dir / fname
        p.write_bytes(out)
        p.chmod(0o600)
        return str(p)


def when(c: x509.Certificate, attr: str = "not_valid_after_utc") -> str:
    return getattr(c, attr).strftime("%Y-%m-%d %H:%M UTC")


def subject(c: x509.Certificate) -> str:
    return c.subject.rfc4514_string()


def check(tmp_path: Path, body: str) -> tuple[int, list[str], str]:
    """Run `fastproxy check -c FILE` on body; (status, warning lines, stderr)."""
    cfg = tmp_path / "fastproxy.toml"
    cfg.write_text(body)
    r = U.run_cli("check", "-c", str(cfg))
    warnings = [ln[len(WARN):] for ln in r.stderr.splitlines() if ln.startswith(WARN)]
    return r.returncode, warnings, r.stderr


def tls_listener(cert: str, key: str, *, port: int | None = None, extra: str = "") -> str:
    return (f'listen = "127.0.0.1:{port or U.free_port()}"\nupstream = "127.0.0.1:1883"\n'
            f'tls_cert = "{cert}"\ntls_key = "{key}"\n{extra}')


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def root(pki):
    k, c = pki.cert("check root CA", ca=True, not_after=NOW + dt.timedelta(days=3650))
    pki.write("ca.crt", c)      # next to the server certificates: a root the clients are given
    return k, c


# ----------------------------------------------------------------------------- healthy


def test_healthy_configuration_prints_no_warning(tmp_path, pki, root):
    """Certificate signed by the root kept next to it, matching key, client CA valid for years,
    a free port: status 0, the ok line, and nothing on stderr."""
    k, c = pki.cert("localhost", root)
    body = tls_listener(pki.write("server.crt", c), pki.write("server.key", k),
                        extra=f'client_ca = "{pki.dir / "ca.crt"}"\nverify = "required"\n')
    cfg = tmp_path / "fastproxy.toml"
    cfg.write_text(body)
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert r.stdout == f"fastproxy: configuration {cfg} is ok (1 listener(s))\n"


def test_healthy_full_chain_and_self_signed(tmp_path, pki, root):
    """A leaf + intermediate file (the root elsewhere) and a self-signed certificate: no warning."""
    ik, ic = pki.cert("check intermediate CA", root, ca=True)
    k, c = pki.cert("localhost", (ik, ic))
    other = Pki(tmp_path / "other")
    full = other.write("fullchain.pem", c, ic)
    sk, sc = other.cert("localhost")
    body = ("[[listener]]\nname = \"chain\"\n" + tls_listener(full, other.write("privkey.pem", k))
            + "[[listener]]\nname = \"selfsigned\"\n"
            + tls_listener(other.write("self.crt", sc), other.write("self.key", sk)))
    status, warnings, err = check(tmp_path, body)
    assert status == 0 and warnings == [] and err == "", err


# ----------------------------------------------------------------------------- expiry


def test_expired_and_expiring_server_certificates(tmp_path, pki, root):
    ek, ec_ = pki.cert("expired.example", root, not_before=NOW - dt.timedelta(days=90),
                       not_after=NOW - dt.timedelta(days=3))
    sk, sc = pki.cert("soon.example", root, not_after=NOW + dt.timedelta(days=10, hours=12))
    fk, fc = pki.cert("future.example", root, not_before=NOW + dt.timedelta(days=2))
    ok_k, ok_c = pki.cert("fine.example", root, not_after=NOW + dt.timedelta(days=31))
    exp, soon, fut, fine = (pki.write("expired.crt", ec_), pki.write("soon.crt", sc),
                            pki.write("future.crt", fc), pki.write("fine.crt", ok_c))
    body = ("[[listener]]\nname = \"old\"\n" + tls_listener(exp, pki.write("expired.key", ek))
            + "[[listener]]\nname = \"soon\"\n" + tls_listener(soon, pki.write("soon.key", sk))
            + "[[listener]]\nname = \"early\"\n" + tls_listener(fut, pki.write("future.key", fk))
            + "[[listener]]\nname = \"fine\"\n" + tls_listener(fine, pki.write("fine.key", ok_k)))
    status, warnings, err = check(tmp_path, body)
    assert status == 0, err
    assert warnings == [
        f"old: server certificate {exp} ({subject(ec_)}) expired on {when(ec_)}: clients refuse it; renew it",
        f"soon: server certificate {soon} ({subject(sc)}) expires on {when(sc)} (in 10 days): renew it",
        f"early: server certificate {fut} ({subject(fc)}) is not valid before "
        f"{when(fc, 'not_valid_before_utc')}: clients refuse it; renew it",
    ], err


def test_expiring_intermediate_in_the_chain(tmp_path, pki, root):
    ik, ic = pki.cert("short intermediate", root, ca=True, not_after=NOW + dt.timedelta(days=5, hours=1))
    k, c = pki.cert("localhost", (ik, ic), not_after=NOW + dt.timedelta(days=4))
    full = pki.write("fullchain.pem", c, ic)
    status, warnings, err = check(tmp_path, tls_listener(full, pki.write("privkey.pem", k)))
    assert warnings == [
        f"listener0: server certificate {full} ({subject(c)}) expires on {when(c)} (in 3 days): renew it",
        f"listener0: certificate #2 in {full} ({subject(ic)}), part of the chain sent to clients, expires on "
        f"{when(ic)} (in 5 days): replace it with the issuer's current certificate",
    ], err


def test_client_ca_expiring_or_expired(tmp_path, pki, root):
    k, c = pki.cert("localhost", root)
    _, soon_ca = pki.cert("devices CA 2024", ca=True, not_after=NOW + dt.timedelta(days=20, hours=2))
    _, old_ca = pki.cert("devices CA 2019", ca=True, not_before=NOW - dt.timedelta(days=2000),
                         not_after=NOW - dt.timedelta(days=1))
    _, good_ca = pki.cert("devices CA 2025", ca=True, not_after=NOW + dt.timedelta(days=3000))
    bundle = Pki(tmp_path / "ca").write("devices-ca.crt", good_ca, soon_ca, old_ca)
    body = tls_listener(pki.write("server.crt", c), pki.write("server.key", k),
                        extra=f'client_ca = "{bundle}"\nverify = "required"\n')
    status, warnings, err = check(tmp_path, body)
    assert status == 0, err
    assert warnings == [
        f"listener0: client CA certificate in {bundle} ({subject(soon_ca)}) expires on {when(soon_ca)} "
        "(in 20 days): client certificates it issued are refused from then on",
        f"listener0: client CA certificate in {bundle} ({subject(old_ca)}) expired on {when(old_ca)}: "
        "client certificates it issued are refused",
    ], err


# ----------------------------------------------------------------------------- key, chain


def test_key_that_does_not_match_is_a_configuration_error(tmp_path, pki, root):
    """Not a warning: the TLS context refuses it, exit 2 with one line naming tls_key."""
    _, c = pki.cert("localhost", root)
    other_k, _ = pki.cert("someone else", root)
    cert, key = pki.write("server.crt", c), pki.write("other.key", other_k)
    status, warnings, err = check(tmp_path, tls_listener(cert, key))
    assert status == 2, err
    (line,) = err.splitlines()
    # OpenSSL 3 refuses the key already in SSL_CTX_use_PrivateKey_file ("key values mismatch"),
    # before the context's own "does not match certificate" check: either wording names the key.
    assert line in (
        f"fastproxy: configuration error: {tmp_path / 'fastproxy.toml'}: tls_key: cannot load private key "
        f"from {key}: error:05800074:x509 certificate routines::key values mismatch",
    ) or line.startswith(f"fastproxy: configuration error: {tmp_path / 'fastproxy.toml'}: tls_key: "
                         f"private key {key} does not match certificate {cert}"), line


def test_leaf_without_its_intermediate(tmp_path, pki, root):
    """Signed by an intermediate that is not in the file: warned, naming the issuer; when the
    intermediate sits in a file next to it (Let's Encrypt's cert.pem + chain.pem), that file is
    named. With the intermediate appended: no warning."""
    ik, ic = pki.cert("check intermediate CA", root, ca=True)
    k, c = pki.cert("localhost", (ik, ic))
    lone = Pki(tmp_path / "lone")
    lone_cert, lone_key = lone.write("cert.pem", c), lone.write("privkey.pem", k)
    le = Pki(tmp_path / "le")
    le_cert, le_key = le.write("cert.pem", c), le.write("privkey.pem", k)
    chain = le.write("chain.pem", ic)
    le_full = le.write("fullchain.pem", c, ic)
    split = Pki(tmp_path / "split")
    split_cert, split_key = split.write("server.crt", c), split.write("server.key", k)
    split_chain = split.write("intermediate.crt", ic)
    issuer = subject(ic)
    body = ("[[listener]]\nname = \"lone\"\n" + tls_listener(lone_cert, lone_key)
            + "[[listener]]\nname = \"le\"\n" + tls_listener(le_cert, le_key)
            + "[[listener]]\nname = \"split\"\n" + tls_listener(split_cert, split_key)
            + "[[listener]]\nname = \"full\"\n" + tls_listener(le_full, le_key))
    status, warnings, err = check(tmp_path, body)
    assert status == 0, err
    assert chain and warnings == [
        f"lone: certificate file {lone_cert} holds no intermediate: its issuer '{issuer}' is not in the file "
        "nor a trusted root, so clients that lack it fail the handshake; append the intermediate "
        "(like fullchain.pem), or keep your own root CA next to the file if clients trust it directly",
        f"le: certificate file {le_cert} holds no intermediate: its issuer '{issuer}' is not in the file, so "
        f"clients that lack it fail the handshake; {le_full} next to it holds the certificate with its chain: "
        "use that",
        f"split: certificate file {split_cert} holds no intermediate: its issuer '{issuer}' is in {split_chain} "
        "but not in the file, so clients that lack it fail the handshake; use a file with the certificate "
        "followed by intermediate.crt (like fullchain.pem)",
    ], err


def test_leaf_signed_by_the_client_ca_root_is_complete(tmp_path, pki, root):
    """A private root that signs the server certificate directly and is also the client CA
    (kept elsewhere): the chain is complete, no warning."""
    k, c = pki.cert("localhost", root)
    srv = Pki(tmp_path / "srv")
    _, rc = root
    ca = Pki(tmp_path / "trust").write("devices-ca.crt", rc)
    body = tls_listener(srv.write("server.crt", c), srv.write("server.key", k),
                        extra=f'client_ca = "{ca}"\nverify = "required"\n')
    status, warnings, err = check(tmp_path, body)
    assert status == 0 and warnings == [], err


# ----------------------------------------------------------------------------- ports


def test_listen_port_in_use(tmp_path, pki, root):
    """A port a test socket holds (listening, and bound only) is reported; a free one is not."""
    k, c = pki.cert("localhost", root)
    cert, key = pki.write("server.crt", c), pki.write("server.key", k)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    p1, p2, free = held.getsockname()[1], bound.getsockname()[1], U.free_port()
    try:
        body = (f'name = "devices"\nlisten = ["127.0.0.1:{free}", "127.0.0.1:{p1}", "127.0.0.1:{p2}"]\n'
                f'upstream = "127.0.0.1:1883"\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
        status, warnings, err = check(tmp_path, body)
    finally:
        held.close()
        bound.close()
    assert status == 0, err
    assert warnings == [
        f"devices: listen address 127.0.0.1:{p} is already in use: another socket holds it "
        "(another process, or this configuration already being served)" for p in (p1, p2)
    ], err


def test_port_this_process_holds_is_not_reported(pki, root):
    """A reload checks the configuration while its own sockets hold the ports: no warning."""
    from fastproxy import build_config
    from fastproxy.checks import deployment_warnings

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        port = held.getsockname()[1]
        cfg = build_config({"listen": f"127.0.0.1:{port}", "upstream": "127.0.0.1:1883"})
        assert deployment_warnings(cfg) == []
    finally:
        held.close()


def test_expiry_threshold_is_thirty_days(pki, root):
    """deployment_warnings(now=...) moves the clock: 31 days before expiry nothing, 29 days before a warning."""
    from fastproxy import build_config
    from fastproxy.checks import deployment_warnings

    k, c = pki.cert("localhost", root, not_after=NOW + dt.timedelta(days=400))
    cfg = build_config({"listen": "127.0.0.1:0", "upstream": "127.0.0.1:1883",
                        "tls_cert": pki.write("server.crt", c), "tls_key": pki.write("server.key", k)})
    end = c.not_valid_after_utc.timestamp()
    assert deployment_warnings(cfg, now=end - 31 * 86400) == []
    (w,) = deployment_warnings(cfg, now=end - 29 * 86400 - 60)
    assert w.endswith(f"expires on {when(c)} (in 29 days): renew it"), w
    (w,) = deployment_warnings(cfg, now=end + 1)
    assert f"expired on {when(c)}" in w, w
    assert time.time() < end
