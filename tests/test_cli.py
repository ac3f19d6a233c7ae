"""The command line: version, check, configuration errors, serving from a config file."""
from __future__ import annotations

import re
import socket

import pytest

import proxyutil as U

ERR_PREFIX = U.CONFIG_ERROR


def test_version():
    r = U.run_cli("version")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "compiled engine loaded" in out
    assert "NOT loaded" not in out
    assert re.search(r"^(OpenSSL OpenSSL \d+\.\d+|AWS-LC \d+\.\d+\.\d+ \(built in: .*libfastproxy-awslc\.so\))", out, re.M), out
    assert re.search(r"^fastproxy \d+\.\d+", out, re.M), out
    assert "Python 3." in out


def test_no_command_prints_help():
    r = U.run_cli()
    assert r.returncode == 2
    assert "serve" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- check


def test_check_good_file(certs, tmp_path):
    cfg = tmp_path / "good.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{U.free_port()}"\n'
        'upstream = "127.0.0.1:1883"\n'
        f'tls_cert = "{certs.server_cert}"\n'
        f'tls_key = "{certs.server_key}"\n'
        'tls_min_version = "TLSv1.2"\n'
        'idle_timeout = "90s"\n'
        'handshake_timeout = "500ms"\n'
        'upstream_connect_timeout = 5\n'
        'drain_timeout = "2m"\n'
        'workers = 2\n'
        'access_log = "off"\n'
    )
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "is ok" in r.stdout and str(cfg) in r.stdout
    assert "Traceback" not in r.stderr


def test_check_good_file_with_listener_tables(certs, tmp_path):
    """[[listener]] tables with top-level defaults; relative paths resolve against the file's directory."""
    (tmp_path / "tls").mkdir()
    import shutil

    shutil.copy(certs.server_cert, tmp_path / "tls" / "server.crt")
    shutil.copy(certs.server_key, tmp_path / "tls" / "server.key")
    cfg = tmp_path / "multi.toml"
    cfg.write_text(
        'upstream = "127.0.0.1:1883"\n'
        'idle_timeout = "30s"\n'
        "[[listener]]\n"
        f'listen = "127.0.0.1:{U.free_port()}"\n'
        'tls_cert = "tls/server.crt"\n'
        'tls_key = "tls/server.key"\n'
        "[[listener]]\n"
        'name = "plain"\n'
        f'listen = "127.0.0.1:{U.free_port()}"\n'
    )
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "2 listener" in r.stdout


def test_check_flags_only(certs):
    r = U.run_cli("check", "--listen", f"127.0.0.1:{U.free_port()}", "--upstream", "127.0.0.1:1883",
                  "--tls-cert", certs.server_cert, "--tls-key", certs.server_key, "--idle-timeout", "500ms")
    assert r.returncode == 0, r.stderr


# (file body, key path expected after the file name, regex for the problem)
BAD_FILES = {
    "unknown-key": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:1883"\nlistne = "x"\n',
        "listne", r"unknown key.*listen",
    ),
    "bad-port": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:99999"\n',
        "upstream", r"port 99999 is out of range 1-65535",
    ),
    "port-not-a-number": (
        'listen = "127.0.0.1:http"\nupstream = "127.0.0.1:1883"\n',
        "listen", r"not a number",
    ),
    "missing-cert-file": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:1883"\ntls_cert = "nope.crt"\ntls_key = "nope.key"\n',
        "tls_cert", r"file not found: .*nope\.crt",
    ),
    "bad-duration": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:1883"\nidle_timeout = "5 parsecs"\n',
        "idle_timeout", r"duration",
    ),
    "negative-duration": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:1883"\ndrain_timeout = -1\n',
        "drain_timeout", r"negative",
    ),
    "bad-workers": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:1883"\nworkers = 0\n',
        "workers", r"1-256",
    ),
    "bad-tls-version": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:1883"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        'tls_min_version = "TLSv1.1"\n',
        "tls_min_version", r"TLSv1\.2, TLSv1\.3",
    ),
    "cert-without-key": (
        'listen = "127.0.0.1:18830"\nupstream = "127.0.0.1:1883"\ntls_cert = "{cert}"\n',
        "tls_key", r"required",
    ),
    "missing-upstream": (
        'listen = "127.0.0.1:18830"\n',
        "upstream", r"required",
    ),
    "listener-bad-key": (
        'upstream = "127.0.0.1:1883"\n[[listener]]\nlisten = "127.0.0.1:18830"\nbogus_key = 1\n',
        "listener[0].bogus_key", r"unknown key",
    ),
    "listener-bad-port": (
        '[[listener]]\nlisten = "127.0.0.1:18830"\nupstream = "127.0.0.1:99999"\n',
        "listener[0].upstream", r"port 99999 is out of range 1-65535",
    ),
    "second-listener-bad-duration": (
        'upstream = "127.0.0.1:1883"\n[[listener]]\nlisten = "127.0.0.1:18830"\n'
        '[[listener]]\nlisten = "127.0.0.1:18831"\nhandshake_timeout = "soon"\n',
        "listener[1].handshake_timeout", r"duration",
    ),
    "global-key-in-listener": (
        'upstream = "127.0.0.1:1883"\n[[listener]]\nlisten = "127.0.0.1:18830"\nworkers = 2\n',
        "listener[0].workers", r"top-level",
    ),
}


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_config_file_errors(certs, tmp_path, command, case):
    """Every file error: exit 2, one line `fastproxy: configuration error: FILE: KEY: problem`."""
    body, key, problem = BAD_FILES[case]
    cfg = tmp_path / f"{case}.toml"
    cfg.write_text(body.replace("{cert}", certs.server_cert).replace("{key}", certs.server_key))
    r = U.run_cli(command, "-c", str(cfg), timeout=30)
    line = U.one_error_line(r)
    assert line.startswith(f"{ERR_PREFIX}{cfg}: {key}: "), line
    assert re.search(problem, line), line


def test_contract_example_message(tmp_path):
    """The exact line given in docs/CONTRACT.md."""
    cfg = tmp_path / "x.toml"
    cfg.write_text('[[listener]]\nlisten = "127.0.0.1:18830"\nupstream = "127.0.0.1:99999"\n')
    line = U.one_error_line(U.run_cli("check", "-c", str(cfg)))
    assert line == f"{ERR_PREFIX}{cfg}: listener[0].upstream: port 99999 is out of range 1-65535"


def test_config_file_missing(tmp_path):
    path = tmp_path / "does-not-exist.toml"
    line = U.one_error_line(U.run_cli("check", "-c", str(path)))
    assert line == f"{ERR_PREFIX}{path}: file not found"


def test_config_file_invalid_toml(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text('listen = "127.0.0.1:1\nupstream = \n')
    line = U.one_error_line(U.run_cli("serve", "-c", str(cfg)))
    assert line.startswith(f"{ERR_PREFIX}{cfg}: invalid TOML"), line


@pytest.mark.parametrize(
    "flags, flag, problem",
    [
        (["--upstream", "127.0.0.1:99999"], "--upstream", "port 99999 is out of range 1-65535"),
        (["--upstream", "127.0.0.1:1883", "--idle-timeout", "5x"], "--idle-timeout", "duration"),
        (["--upstream", "127.0.0.1:1883", "--workers", "many"], "--workers", "1-256"),
        (["--upstream", "127.0.0.1:1883", "--tls-cert", "/nonexistent/s.crt", "--tls-key", "/nonexistent/s.key"],
         "--tls-cert", "file not found"),
    ],
)
def test_command_line_errors(flags, flag, problem):
    r = U.run_cli("serve", "--listen", f"127.0.0.1:{U.free_port()}", *flags)
    line = U.one_error_line(r)
    assert line.startswith(f"{ERR_PREFIX}command line: {flag}: "), line
    assert problem in line, line


def test_listen_address_in_use(mosquitto):
    """Binding a port that is taken fails with a one-line error, no traceback, non-zero exit."""
    busy = socket.socket()
    busy.bind((U.HOST, 0))
    busy.listen(1)
    try:
        r = U.run_cli("serve", "--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--upstream", mosquitto.upstream,
                      timeout=30)
    finally:
        busy.close()
    assert r.returncode not in (0, None), r
    assert "Traceback" not in r.stderr, r.stderr
    assert re.search(r"in use", r.stderr, re.I), r.stderr


# ----------------------------------------------------------------------------- serving from a file


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_serve_from_config_file_two_listeners(certs, mosquitto, run_fastproxy, paho_client, tmp_path):
    """A file with a TLS and a plain [[listener]]; messages cross from one to the other."""
    tls_port, plain_port = U.free_port(), U.free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        f'upstream = "{mosquitto.upstream}"\n'
        'idle_timeout = "30s"\n'
        "[[listener]]\n"
        'name = "tls"\n'
        f'listen = "127.0.0.1:{tls_port}"\n'
        f'tls_cert = "{certs.server_cert}"\n'
        f'tls_key = "{certs.server_key}"\n'
        "[[listener]]\n"
        'name = "plain"\n'
        f'listen = "127.0.0.1:{plain_port}"\n'
    )
    fp = run_fastproxy("-c", str(cfg), port=tls_port)
    U.wait_until(lambda: U.port_is_listening(plain_port), 10, what="the second listener")
    sub = paho_client(tls_port, client_id="file-sub", tls=True)
    sub.subscribe("file/t", 1)
    pub = paho_client(plain_port, client_id="file-pub", tls=False)
    pub.publish("file/t", b"across listeners", qos=1)
    got = sub.collect(1, timeout=10)
    assert got and got[0].payload == b"across listeners"
    sub.close()
    pub.close()
    entries = fp.wait_access(n=2)
    assert sorted(e.protocol for e in entries) == ["TCP", "TLSv1.3"]


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_serve_two_listen_addresses_ipv4_and_ipv6(certs, mosquitto, run_fastproxy):
    """--listen repeated: 127.0.0.1 and [::1] both terminate TLS (the cert has SAN IP:::1)."""
    p4, p6 = U.free_port(), U.free_port("::1")
    fp = run_fastproxy("--listen", f"127.0.0.1:{p4}", "--listen", f"[::1]:{p6}", "--upstream", mosquitto.upstream,
                       "--tls-cert", certs.server_cert, "--tls-key", certs.server_key)
    U.wait_until(lambda: U.port_is_listening(p6), 10, what="the [::1] listener")
    for host, port in ((U.HOST, p4), ("::1", p6)):
        s = U.open_socket(port, host=host, tls_ctx=U.client_context(certs), server_hostname=host)
        assert U.mqtt_handshake(s, f"v{host}") == 0
        s.close()
    entries = fp.wait_access(n=2)
    assert sorted(e.remote for e in entries) == ["127.0.0.1", "::1"]


def test_listening_message_on_stderr(certs, mosquitto, start_proxy):
    """Startup logs `listening on ...` to the error log once listeners are bound."""
    fp = start_proxy(mosquitto)
    U.wait_until(lambda: "listening on" in fp.stderr(), 10, what="'listening on' in stderr")
    assert str(fp.port) in fp.stderr()


def test_access_log_off(mosquitto, run_fastproxy, tmp_path):
    port = U.free_port()
    fp = run_fastproxy("--listen", f"127.0.0.1:{port}", "--upstream", mosquitto.upstream, "--access-log", "off")
    s = U.open_socket(port)
    assert U.mqtt_handshake(s, "nolog") == 0
    s.close()
    assert fp.stop() == 0
    assert not any(U.ACCESS_RE.match(ln) for ln in (fp.stdout() + fp.stderr()).splitlines())


def test_access_log_stdout(mosquitto, run_fastproxy):
    """--access-log - writes lines to stdout."""
    port = U.free_port()
    fp = run_fastproxy("--listen", f"127.0.0.1:{port}", "--upstream", mosquitto.upstream, "--access-log", "-")
    s = U.open_socket(port)
    assert U.mqtt_handshake(s, "stdoutlog") == 0
    s.sendall(U.DISCONNECT)
    U.wait_closed(s, 10)
    s.close()
    (e,) = fp.wait_access(n=1)
    assert e.protocol == "TCP" and e.status == 200


def test_error_log_file_and_level(mosquitto, run_fastproxy, tmp_path):
    """--error-log FILE receives the startup line; --log-level error silences it."""
    err_log = tmp_path / "error.log"
    port = U.free_port()
    fp = run_fastproxy("--listen", f"127.0.0.1:{port}", "--upstream", mosquitto.upstream,
                       "--error-log", str(err_log))
    U.wait_until(lambda: err_log.exists() and "listening on" in err_log.read_text(), 10,
                 what="'listening on' in the error log file")
    assert "listening on" not in fp.stderr()
    assert fp.stop() == 0
    quiet_log = tmp_path / "quiet.log"
    port = U.free_port()
    fp = run_fastproxy("--listen", f"127.0.0.1:{port}", "--upstream", mosquitto.upstream,
                       "--error-log", str(quiet_log), "--log-level", "error")
    s = U.open_socket(port)
    assert U.mqtt_handshake(s, "quiet") == 0
    s.close()
    assert fp.stop() == 0
    assert "listening on" not in (quiet_log.read_text() if quiet_log.exists() else "")


def test_status_command(mosquitto, run_fastproxy, tmp_path):
    """`fastproxy status` finds the admin address on the command line or in the config file, and
    says clearly when nothing answers there."""
    import json

    admin = U.free_port()
    port = U.free_port()
    run_fastproxy("--listen", f"127.0.0.1:{port}", "--upstream", mosquitto.upstream, "--admin", f"127.0.0.1:{admin}")
    U.wait_until(lambda: U.can_connect(U.HOST, admin), 10, what="admin endpoint")
    cfg = tmp_path / "fp.toml"
    cfg.write_text(f'listen = "127.0.0.1:{port}"\nupstream = "{mosquitto.upstream}"\nadmin = "127.0.0.1:{admin}"\n')
    for args in (["--admin", f"127.0.0.1:{admin}"], ["-c", str(cfg)]):
        r = U.run_cli("status", *args)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert [s["server"] for s in st["servers"]] == [mosquitto.upstream] and st["servers"][0]["up"] is True
    dead = U.free_port()
    r = U.run_cli("status", "--admin", f"127.0.0.1:{dead}", "--timeout", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("fastproxy status: ") and f"127.0.0.1:{dead}" in r.stderr
    cfg.write_text(f'listen = "127.0.0.1:{port}"\nupstream = "{mosquitto.upstream}"\n')
    r = U.run_cli("status", "-c", str(cfg))
    assert r.returncode == 2 and "sets no admin address" in r.stderr
