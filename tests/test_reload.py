"""Reload without dropping devices (issue 12): SIGHUP, `fastproxy reload --pid-file`, and
--watch-certs re-read the configuration and the certificates; new handshakes use the new
certificate, established sessions keep relaying, listeners follow the file, and a
configuration that does not load is refused with the running one kept.

Real TLS (a second server certificate issued by the tests' CA for the "renewal"), real
Mosquitto, paho clients. Loopback only; every wait is bounded.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import signal
import socket
import ssl

import pytest

import proxyutil as U


def issue_server_cert(certs, directory, name: str) -> tuple[str, str, int]:
    """A server certificate for localhost / 127.0.0.1 from the tests' CA: (cert, key, serial)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(open(certs.ca_cert, "rb").read())
    ca_key = serialization.load_pem_private_key(open(certs.ca_key, "rb").read(), password=None)
    k = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc)
    serial = x509.random_serial_number()
    c = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
         .issuer_name(ca_cert.subject).public_key(k.public_key()).serial_number(serial)
         .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=90))
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                        critical=False)
         .sign(ca_key, hashes.SHA256()))
    cert_p, key_p = directory / f"{name}.crt", directory / f"{name}.key"
    cert_p.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    key_p.chmod(0o600)
    return str(cert_p), str(key_p), serial


def served_serial(port: int, certs) -> int:
    """The serial number of the certificate a new handshake on port presents."""
    from cryptography import x509

    ctx = U.client_context(certs)
    with socket.create_connection((U.HOST, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=U.HOST) as s:
            der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def write_config(path, listens: list[str], upstream: str, cert: str, key: str, **extra) -> None:
    lines = [f"listen = {json.dumps(listens)}", f"upstream = {json.dumps(upstream)}",
             f"tls_cert = {json.dumps(cert)}", f"tls_key = {json.dumps(key)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def setup(certs, tmp_path):
    """Live certificate files (what the configuration names) and two issued versions."""
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    a = issue_server_cert(certs, tmp_path, "a")
    b = issue_server_cert(certs, tmp_path, "b")
    shutil.copy(a[0], live_cert)
    shutil.copy(a[1], live_key)

    def renew() -> None:
        # as certbot does: new files in place (here: copies over the live paths)
        shutil.copy(b[0], live_cert)
        shutil.copy(b[1], live_key)

    return {"cert": str(live_cert), "key": str(live_key), "a": a[2], "b": b[2], "renew": renew}


def session_pair(port: int, certs, paho_client, tag: str):
    sub = paho_client(port, client_id=f"{tag}-sub")
    sub.subscribe(f"reload/{tag}", 1)
    pub = paho_client(port, client_id=f"{tag}-pub")
    return sub, pub


def still_relays(sub, pub, tag: str, payload: bytes) -> None:
    pub.publish(f"reload/{tag}", payload, qos=1)
    assert [m.payload for m in sub.collect(1, 10)] == [payload]


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers2"])
def test_sighup_new_certificate_for_new_handshakes_sessions_kept(workers, certs, mosquitto, run_fastproxy,
                                                                 paho_client, setup, tmp_path):
    port = U.free_port()
    cfg = tmp_path / "fp.toml"
    write_config(cfg, [f"127.0.0.1:{port}"], mosquitto.upstream, setup["cert"], setup["key"], workers=workers)
    fp = run_fastproxy("-c", str(cfg), port=port)
    assert served_serial(port, certs) == setup["a"]
    sub, pub = session_pair(port, certs, paho_client, f"hup{workers}")
    still_relays(sub, pub, f"hup{workers}", b"before")
    setup["renew"]()
    fp.signal(signal.SIGHUP)
    U.wait_until(lambda: fp.stderr().count("reloaded: listening on") >= workers, 15, what="the reload line(s)")
    for _ in range(4 * workers):                      # every worker serves the new certificate
        assert served_serial(port, certs) == setup["b"]
    still_relays(sub, pub, f"hup{workers}", b"after the reload")     # the old sessions relay on
    sub.close()
    pub.close()
    assert "reload refused" not in fp.stderr()
    assert fp.stop() == 0


def test_invalid_configuration_is_refused_and_the_running_one_kept(certs, mosquitto, run_fastproxy, setup,
                                                                   tmp_path, paho_client):
    port = U.free_port()
    cfg = tmp_path / "fp.toml"
    write_config(cfg, [f"127.0.0.1:{port}"], mosquitto.upstream, setup["cert"], setup["key"])
    fp = run_fastproxy("-c", str(cfg), port=port)
    write_config(cfg, [f"127.0.0.1:{port}"], mosquitto.upstream, setup["cert"], str(tmp_path / "missing.key"))
    fp.signal(signal.SIGHUP)
    U.wait_until(lambda: "reload refused, the running configuration stays" in fp.stderr(), 15, what="the refusal")
    assert "missing.key" in fp.stderr()
    assert served_serial(port, certs) == setup["a"]
    c = paho_client(port, client_id="after-refusal")
    c.close()


def test_listeners_follow_the_file(certs, mosquitto, run_fastproxy, setup, tmp_path, paho_client):
    """A reload that moves the listener to another port: the new port accepts, the old one no
    longer does, and a session made on the old port keeps relaying."""
    p1, p2 = U.free_port(), U.free_port()
    cfg = tmp_path / "fp.toml"
    write_config(cfg, [f"127.0.0.1:{p1}"], mosquitto.upstream, setup["cert"], setup["key"])
    fp = run_fastproxy("-c", str(cfg), port=p1)
    sub, pub = session_pair(p1, certs, paho_client, "move")
    write_config(cfg, [f"127.0.0.1:{p2}"], mosquitto.upstream, setup["cert"], setup["key"])
    fp.signal(signal.SIGHUP)
    U.wait_until(lambda: "reloaded: listening on" in fp.stderr(), 15, what="the reload")
    U.wait_until(lambda: U.port_is_listening(p2) and not U.port_is_listening(p1), 10, what="the port moved")
    c = paho_client(p2, client_id="on-new-port")
    c.close()
    still_relays(sub, pub, "move", b"on the old port, after the move")
    sub.close()
    pub.close()


def test_reload_command_and_watch_certs(certs, mosquitto, run_fastproxy, setup, tmp_path):
    """`fastproxy reload --pid-file` signals the running proxy; with --watch-certs a renewal is
    picked up without any signal."""
    port = U.free_port()
    pid_file = tmp_path / "fp.pid"
    cfg = tmp_path / "fp.toml"
    write_config(cfg, [f"127.0.0.1:{port}"], mosquitto.upstream, setup["cert"], setup["key"],
                 pid_file=str(pid_file), watch_certs=True)
    fp = run_fastproxy("-c", str(cfg), port=port)
    assert pid_file.read_text().strip() == str(fp.pid)
    r = U.run_cli("reload", "--pid-file", str(pid_file))
    assert r.returncode == 0, r.stderr
    U.wait_until(lambda: "reloaded: listening on" in fp.stderr(), 15, what="the reload by command")
    setup["renew"]()
    U.wait_until(lambda: "certificate files changed: reloading" in fp.stderr(), 20, what="the watcher")
    U.wait_until(lambda: fp.stderr().count("reloaded: listening on") >= 2, 15, what="the second reload")
    assert served_serial(port, certs) == setup["b"]
    r = U.run_cli("reload", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    U.wait_until(lambda: fp.stderr().count("reloaded: listening on") >= 3, 15, what="the third reload")
    assert fp.stop() == 0
    assert not pid_file.exists()


def test_reload_through_the_admin_endpoint(certs, mosquitto, run_fastproxy, setup, tmp_path):
    port, admin = U.free_port(), U.free_port()
    cfg = tmp_path / "fp.toml"
    write_config(cfg, [f"127.0.0.1:{port}"], mosquitto.upstream, setup["cert"], setup["key"],
                 admin=f"127.0.0.1:{admin}", workers=2)
    fp = run_fastproxy("-c", str(cfg), port=port)
    setup["renew"]()
    r = U.run_cli("reload", "--admin", f"127.0.0.1:{admin}")
    assert r.returncode == 0, r.stderr
    U.wait_until(lambda: fp.stderr().count("reloaded: listening on") >= 2, 15, what="both workers reloaded")
    for _ in range(6):
        assert served_serial(port, certs) == setup["b"]
