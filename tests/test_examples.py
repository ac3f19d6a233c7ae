"""examples/<scenario>/: each configuration passes `fastproxy check` with only the warnings its
README documents, against the certificates scripts/dev-certs makes (the examples' relative
paths point at dev/certs/); the TLS-termination one carries a real publish to Mosquitto, the
PROXY-protocol one a real publish to Mosquitto 2.1 (when built); and contrib/systemd's unit
passes `systemd-analyze verify`.

Each test works on a copy: examples/<x>/ -> TMP/examples/<x>/ and TMP/dev/certs/ from
scripts/dev-certs, with every port in the copied files moved to a free one (the examples use
the well-known ports, which this host may have taken)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import proxyutil as U

EXAMPLES = U.REPO / "examples"

# example -> the warning lines its README documents (with the example's own ports)
EXPECTED_WARNINGS = {
    "tls-termination": [],
    "hide-broker-port": [
        "mqtt: listens on 0.0.0.0:18831 without TLS",
        "websocket: listens on 0.0.0.0:8020 without TLS",
    ],
    "proxy-protocol-mosquitto": ["lan: listens on 0.0.0.0:1883 without TLS"],
    "mtls-clientid-cn": [],
    "several-brokers": [],
}
WARN = "fastproxy: warning: "
_ADDR = re.compile(r'(?P<host>0\.0\.0\.0|127\.0\.0\.1|\[::\]):(?P<port>\d+)"')
_MOSQ_LISTENER = re.compile(r"^listener (?P<port>\d+) ", re.M)


def test_every_example_is_covered():
    found = {p.parent.name for p in EXAMPLES.glob("*/fastproxy.toml")}
    assert found == set(EXPECTED_WARNINGS), found
    for name in found:
        readme = (EXAMPLES / name / "README.md").read_text()
        for w in EXPECTED_WARNINGS[name]:
            assert WARN + w in readme, f"examples/{name}/README.md does not document {w!r}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """TMP with dev/certs/ (scripts/dev-certs, client thing001) and examples/<x>/ copies."""
    top = tmp_path_factory.mktemp("examples")
    r = subprocess.run([str(U.REPO / "scripts" / "dev-certs"), str(top / "dev" / "certs"), "thing001"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in EXPECTED_WARNINGS:
        shutil.copytree(EXAMPLES / name, top / "examples" / name)
    return top


def move_ports(path: Path, ports: dict[int, int]) -> dict[int, int]:
    """Rewrite every quoted HOST:PORT (and mosquitto.conf `listener PORT`) in path to a free port,
    the same old port always to the same new one (ports: the mapping so far, updated)."""
    text = path.read_text()

    def new(old: str) -> str:
        o = int(old)
        if o not in ports:
            # free on every address: the examples listen on 0.0.0.0, which conflicts with any
            # socket using the port (a 127.0.0.1 free port may be another one's local port)
            ports[o] = U.free_port("0.0.0.0")
        return str(ports[o])

    text = _ADDR.sub(lambda m: f'{m["host"]}:{new(m["port"])}"', text)
    text = _MOSQ_LISTENER.sub(lambda m: f"listener {new(m['port'])} ", text)
    path.write_text(text)
    return ports


def with_ports(lines: list[str], ports: dict[int, int]) -> list[str]:
    return [re.sub(r":(\d+) ", lambda m: f":{ports.get(int(m[1]), int(m[1]))} ", ln + " ").rstrip() for ln in lines]


@pytest.mark.parametrize("name", list(EXPECTED_WARNINGS))
def test_example_passes_check(name, tree, tmp_path):
    work = tmp_path / "examples" / name
    shutil.copytree(tree / "examples" / name, work)
    (tmp_path / "dev").symlink_to(tree / "dev")        # ../../dev/certs from the copied file
    cfg = work / "fastproxy.toml"
    ports = move_ports(cfg, {})
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"fastproxy: configuration {cfg} is ok"), r.stdout
    lines = r.stderr.splitlines()
    assert all(ln.startswith(WARN) for ln in lines), r.stderr
    assert [ln[len(WARN):] for ln in lines] == with_ports(EXPECTED_WARNINGS[name], ports), r.stderr


def _mosq(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_tls_termination_example_for_real(tree, tmp_path, mosquitto, run_fastproxy):
    """examples/tls-termination as written (ports moved): a subscriber and a publisher over TLS
    with the dev CA, through fastproxy, to a real Mosquitto on loopback."""
    work = tmp_path / "examples" / "tls-termination"
    shutil.copytree(tree / "examples" / "tls-termination", work)
    (tmp_path / "dev").symlink_to(tree / "dev")
    cfg = work / "fastproxy.toml"
    ports = move_ports(cfg, {1883: mosquitto.port})
    port = ports[8883]
    fp = run_fastproxy("-c", str(cfg), port=port)
    ca = str(tree / "dev" / "certs" / "ca.crt")
    common = ["-h", "localhost", "-p", str(port), "--cafile", ca]
    sub = subprocess.Popen(["mosquitto_sub", *common, "-i", "example-sub", "-t", "demo/#", "-v", "-C", "1", "-W", "15"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        U.wait_until(lambda: "example-sub" in mosquitto.log(), 10, what="the subscriber at the broker")
        r = _mosq("mosquitto_pub", *common, "-i", "example-pub", "-t", "demo/hello", "-m", "hello through TLS")
        assert r.returncode == 0, r.stderr
        out, err = sub.communicate(timeout=20)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)
    assert out == "demo/hello hello through TLS\n", (out, err)
    # the example's log_format "nginx-stream": the seed's mqtt_log line, field for field
    U.wait_until(lambda: len(fp.access_log()) >= 2, 10, what="two access-log lines")
    nginx_line = re.compile(r"127\.0\.0\.1 \[[^]]+\] TLSv1\.[23] 200 \d+ \d+ \d+\.\d{3}")
    assert all(nginx_line.fullmatch(ln) for ln in fp.access_log()), fp.access_log()


def test_proxy_protocol_example_with_mosquitto21(tree, tmp_path, run_fastproxy):
    """examples/proxy-protocol-mosquitto with its own mosquitto.conf on Mosquitto 2.1: a device
    with certificate thing001 publishes through the v2-ssl-cn listener; the broker logs the
    device's address and takes the CN as user name."""
    from conftest import MOSQUITTO21_MISSING, mosquitto21_binary

    binary = mosquitto21_binary()
    if binary is None:
        pytest.skip(MOSQUITTO21_MISSING)
    work = tmp_path / "examples" / "proxy-protocol-mosquitto"
    shutil.copytree(tree / "examples" / "proxy-protocol-mosquitto", work)
    (tmp_path / "dev").symlink_to(tree / "dev")
    ports = move_ports(work / "fastproxy.toml", {})
    move_ports(work / "mosquitto.conf", ports)
    log = tmp_path / "mosquitto.log"
    conf = work / "mosquitto.conf"
    extra = f"log_dest file {log}\nlog_type all\npersistence false\n" + ("user root\n" if os.geteuid() == 0 else "")
    conf.write_text(extra + conf.read_text())
    broker = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for p in (1884, 1885, 1886, 1887):
            U.wait_until(lambda p=p: U.port_is_listening(ports[p]), 10, what=f"mosquitto 2.1 on {ports[p]}")
        run_fastproxy("-c", str(work / "fastproxy.toml"), port=ports[8883])
        certs = tree / "dev" / "certs"
        r = _mosq("mosquitto_pub", "-h", "localhost", "-p", str(ports[8883]), "--cafile", str(certs / "ca.crt"),
                  "--cert", str(certs / "thing001.crt"), "--key", str(certs / "thing001.key"), "-i", "thing001",
                  "-t", "devices/thing001/hello", "-m", "hi")
        assert r.returncode == 0, r.stderr
        U.wait_until(lambda: "as thing001" in log.read_text(), 10, what="the device in the broker's log")
        line = next(ln for ln in log.read_text().splitlines() if "as thing001" in ln)
        # mosquitto_pub sent no user name: u'thing001' is the CN of the header's SSL TLV
        # (use_identity_as_username), which the broker accepted as verified (require_certificate)
        assert "u'thing001'" in line, line
    finally:
        U.stop_process(broker, timeout=5)


# ----------------------------------------------------------------------------- contrib


UNIT = U.REPO / "contrib" / "systemd" / "fastproxy.service"


def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` on the unit, with ExecStart's /opt/fastproxy/.venv/bin/fastproxy
    (where the unit expects an install) replaced by this interpreter's fastproxy script when
    that path does not exist here: verify checks that the binary is executable."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = UNIT.read_text()
    m = re.search(r"^ExecStart=(\S+)", text, re.M)
    assert m, "the unit has no ExecStart"
    unit = tmp_path / "fastproxy.service"
    exe = m[1]
    if not os.access(exe, os.X_OK):
        here = Path(sys.executable).with_name("fastproxy")
        assert os.access(here, os.X_OK), f"no fastproxy script next to {sys.executable}"
        text = text.replace(exe, str(here))
    unit.write_text(text)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and re.search(r"Failed to (connect|initialize)|System has not been booted", r.stderr):
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()[:300]}")
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
