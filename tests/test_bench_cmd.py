"""`fastproxy bench` (issue 16) and its compiled load generator (fastproxy._loadgen).

Real Mosquitto, real fastproxy, real TLS with certificates the bench makes; loopback only. The
figures themselves depend on the machine: the tests check that every one is there, finite, within
physical bounds and consistent with the others, never how fast anything is.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading

import pytest

import proxyutil as U
from conftest import MOSQUITTO21_MISSING, mosquitto21_binary

pytestmark = pytest.mark.skipif(not os.access("/usr/sbin/mosquitto", os.X_OK) and not __import__("shutil").which("mosquitto"),
                                reason="mosquitto not installed")

BENCH_TIMEOUT = 600  # a bound, not a figure: --quick takes ~20 s here

KEYS_POSITIVE = [
    "handshakes_per_s_per_core", "messages_per_s_per_core", "kib_per_idle_connection", "devices_per_gib",
    "cpu_us_per_handshake", "cpu_us_per_msg_64_qos0", "cpu_us_per_msg_64_qos1", "cpu_us_per_msg_1k_qos0",
    "cpu_us_per_msg_1k_qos1", "cpu_us_per_msg_paced", "cpu_s_per_gb", "pss_kib_per_idle_connection",
    "baseline_rss_kib", "reconnect_storm_s", "reconnect_storm_s_largest_fleet", "largest_fleet",
    "handshakes_per_s_measured",
]


def bench(tmp_path, *args: str) -> tuple[object, dict | None]:
    out = tmp_path / "bench.json"
    r = U.run_cli("bench", "--quick", "--no-progress", "--json", str(out), *args, timeout=BENCH_TIMEOUT)
    data = json.loads(out.read_text()) if out.exists() else None
    return r, data


def check_figures(d: dict) -> None:
    for k in KEYS_POSITIVE:
        v = d[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v)
    # broad physical bounds: a handshake costs between 10 µs and 10 s of CPU, a message between
    # 10 ns and 10 ms, an idle session between 0.1 KiB and 10 MiB
    assert 1e-2 < d["cpu_us_per_handshake"] / 1e3 < 1e4
    for k in KEYS_POSITIVE:
        if k.startswith("cpu_us_per_msg"):
            assert 0.01 < d[k] < 1e4, k
    assert 0.1 < d["kib_per_idle_connection"] < 10240
    assert 0.001 < d["cpu_s_per_gb"] < 1000
    # internally consistent
    assert d["handshakes_per_s_per_core"] == pytest.approx(1e6 / d["cpu_us_per_handshake"], rel=1e-6)
    assert d["messages_per_s_per_core"] == pytest.approx(1e6 / d["cpu_us_per_msg_paced"], rel=1e-6)
    assert d["devices_per_gib"] * d["kib_per_idle_connection"] == pytest.approx(2**20, rel=1e-6)
    limits = d["fleet_limits"]
    assert set(limits) >= {"memory", "cpu"}
    assert d["largest_fleet"] == min(limits.values())
    assert limits[d["limiting_factor"]] == d["largest_fleet"]
    mem = d["machine"]["mem_available_kib"] * 0.9 - d["baseline_rss_kib"]
    assert limits["memory"] == int(mem / d["kib_per_idle_connection"])
    assert d["machine"]["cores"] >= 1 and d["machine"]["arch"] and d["tls_library"]
    # every session of every step got through
    runs = d["runs"]
    assert runs["handshakes"]["connack_ok"] == d["counts"]["handshakes"]
    assert runs["handshakes"]["failed"] == 0 and runs["handshakes"]["refused"] == 0
    for key in ("msg_64_qos0", "msg_64_qos1", "msg_1k_qos0", "msg_1k_qos1", "msg_paced", "bulk"):
        assert runs[key]["published"] > 0, key
        assert runs[key]["refused"] == 0, key
    assert runs["msg_64_qos1"]["acked"] == runs["msg_64_qos1"]["published"]
    assert runs["idle"]["levels"][1]["sessions"] == d["counts"]["idle"]
    assert runs["storm"]["live_max"] == d["counts"]["storm"]
    assert runs["storm"]["closed_by_peer"] >= d["counts"]["storm"]  # all were dropped by the restart


def test_quick_bench_with_a_fleet_question(tmp_path):
    """The default run: every figure, the fleet answer = the least of its own limits, and a
    --devices/--rate verdict that agrees with the figures."""
    try:
        import matplotlib  # noqa: F401
        png: list[str] = ["--plot", str(tmp_path / "bench.png")]
    except ImportError:
        png = []
    r, d = bench(tmp_path, "--devices", "5000", "--rate", "0.5", *png)
    assert r.returncode == 0, r.stderr[-3000:]
    if png:
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in r.stderr
    assert d is not None
    check_figures(d)
    assert d["rate_per_device"] == 0.5
    v = d["verdict"]
    assert v["devices"] == 5000
    assert v["carries"] == (5000 <= d["largest_fleet"])
    assert v["failing_limits"] == [k for k, n in d["fleet_limits"].items() if n < 5000]
    assert "largest fleet at 0.5 msg/s" in r.stdout
    assert ("YES" if v["carries"] else "NO") in r.stdout
    assert "handshakes per second per core" in r.stdout and "devices per GiB" in r.stdout
    assert d["configuration"].startswith("built in")


@pytest.mark.slow
def test_verdict_no_names_the_limit(tmp_path):
    """A fleet beyond the largest one gets a NO that names the limits it breaks."""
    r, d = bench(tmp_path, "--devices", "100000000", "--rate", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    v = d["verdict"]
    assert v["carries"] is False
    assert v["failing_limits"] and d["limiting_factor"] in v["failing_limits"]
    assert "NO" in r.stdout


def _user_config(tmp_path, certs, **extra: str) -> str:
    lines = [
        'listen = "0.0.0.0:8883"',
        'upstream = "10.0.0.11:1883"',         # the user's broker: the bench uses its own instead
        f'tls_cert = "{certs.server_cert}"',
        f'tls_key = "{certs.server_key}"',
        f'client_ca = "{certs.ca_cert}"',
        'verify = "required"',
        'admin = "127.0.0.1:8404"',
        'access_log = "access.log"',            # relative to the file: the bench writes its own
    ] + [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "fastproxy.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


POLICY = """
import os
MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policy-called")

def check(connect, cert, client):
    # the bench's devices: ClientId = CN of a verified certificate from the bench CA
    if not os.path.exists(MARK):
        with open(MARK, "w") as f:
            f.write(f"{connect.client_id} {cert.cn if cert else None} {cert.verified if cert else None}")
    return None
"""


def test_user_configuration_with_identity_rule_and_policy(tmp_path, certs):
    """-c measures the user's configuration: the ClientId template and the policy hook (found
    beside the file) are on, and every session got through them."""
    (tmp_path / "benchpolicy.py").write_text(POLICY)
    conf = _user_config(tmp_path, certs, clientid_template="{cn}", policy="benchpolicy:check")
    r, d = bench(tmp_path, "-c", conf)
    assert r.returncode == 0, r.stderr[-3000:]
    check_figures(d)
    assert d["configuration"] == conf
    assert "clientid_template = '{cn}'" in d["settings"]["identity_rules"]
    assert conf in r.stdout and "clientid_template" in r.stdout
    assert any(n.startswith("admin:") for n in d["notes"]) and any(n.startswith("client_ca:") for n in d["notes"])
    assert d["settings"]["policy"] == "benchpolicy:check"
    cid, cn, verified = (tmp_path / "policy-called").read_text().split()
    assert cid == cn and verified == "True"


def test_user_configuration_that_refuses_the_devices(tmp_path, certs):
    """A rule the bench devices cannot meet is applied (so -c really measures that file): the
    bench stops with one sentence naming the CONNACK code, no traceback."""
    conf = _user_config(tmp_path, certs, clientid_template="site7-{cn}")
    r, d = bench(tmp_path, "-c", conf)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "no session got through the proxy" in r.stderr and "CONNACK return code 2" in r.stderr
    assert d is None


@pytest.mark.slow
@pytest.mark.skipif(mosquitto21_binary() is None, reason=MOSQUITTO21_MISSING)
def test_user_configuration_with_proxy_protocol(tmp_path, certs, monkeypatch):
    """proxy_protocol v2-ssl-cn: the bench runs a Mosquitto 2.1 that reads the header."""
    conf = _user_config(tmp_path, certs, proxy_protocol="v2-ssl-cn", clientid_template="{cn}")
    r, d = bench(tmp_path, "-c", conf)
    assert r.returncode == 0, r.stderr[-3000:]
    check_figures(d)
    assert d["settings"]["proxy_protocol"] == "v2-ssl-cn"
    assert d["settings"]["broker"].startswith("Mosquitto 2.1")


@pytest.mark.parametrize("args, needle", [
    (["--broker", "nonsense"], "--broker"),
    (["--devices", "0"], "--devices"),
    (["--rate", "-1"], "--rate"),
    (["-c", "/nonexistent/fastproxy.toml"], "file not found"),
])
def test_bad_arguments_are_one_line(args, needle):
    r = U.run_cli("bench", "--quick", *args, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert needle in r.stderr and r.stderr.startswith("fastproxy: configuration error:")


def test_error_in_the_users_configuration_names_it(tmp_path, certs):
    """A configuration error is the user's file and key in one line, and leaves no temp files."""
    import glob

    conf = _user_config(tmp_path, certs, tls_min_version="TLSv9")
    before = set(glob.glob("/tmp/fastproxy-bench-*"))
    r = U.run_cli("bench", "--quick", "-c", conf, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"fastproxy: configuration error: {conf}: tls_min_version")
    assert set(glob.glob("/tmp/fastproxy-bench-*")) <= before


def test_plot_without_matplotlib_says_how(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        r = U.run_cli("bench", "--quick", "--plot", str(tmp_path / "x.png"), timeout=60)
        assert r.returncode == 1 and "pip install 'fastproxy[plot]'" in r.stderr
        assert "Traceback" not in r.stderr
    else:
        pytest.skip("matplotlib is installed: the plot is drawn by the bench runs")


def test_flags_are_documented():
    r = U.run_cli("bench", "--help", timeout=30)
    assert r.returncode == 0
    for flag in ("--quick", "--json", "--plot", "--devices", "--rate", "--broker", "--config"):
        assert flag in r.stdout
    with open(os.path.join(U.REPO, "docs", "CONTRACT.md")) as f:
        contract = f.read()
    for flag in ("--quick", "--json", "--plot", "--devices", "--rate", "--broker"):
        assert flag in contract


# ----------------------------------------------------------------------------- the generator itself


def _loadgen():
    return pytest.importorskip("fastproxy._loadgen")


def test_loadgen_refuses_bad_parameters():
    from fastproxy.errors import BenchError

    L = _loadgen()
    with pytest.raises(BenchError):
        L.run("nonsense", host="127.0.0.1", port=1, conns=1)
    with pytest.raises(BenchError):
        L.run("handshake", host="127.0.0.1", port=1, conns=0)
    with pytest.raises(BenchError):
        L.run("handshake", host="not-an-ip", port=1, conns=1, tls=False)
    with pytest.raises(BenchError):
        L.run("handshake", host="127.0.0.1", port=1, conns=1, cert="/nonexistent.pem", key="/nonexistent.key")
    with pytest.raises(BenchError):
        L.run("handshake", host="127.0.0.1", port=1, conns=1, prefix="x" * 40)


def _one_shot_server(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """Accepts one plain TCP connection, reads the CONNECT, answers `reply`, then closes."""
    srv = socket.socket()
    srv.bind((U.HOST, 0))
    srv.listen(4)
    srv.settimeout(10)

    def serve() -> None:
        try:
            c, _ = srv.accept()
            c.settimeout(5)
            c.recv(1024)
            c.sendall(reply)
            c.close()
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@pytest.mark.parametrize("reply, counter", [
    (b"\x20\xff\xff\xff\xff\xff", "fail_mqtt"),      # a remaining length of 5 bytes: malformed
    (b"\x30\xff\xff\xff\x7f" + b"x" * 100, "fail_mqtt"),  # 256 MiB announced, 100 bytes, then EOF
    (b"\x20\x02\x00\x05", "refused"),                # CONNACK 5: not authorized
])
def test_loadgen_bounds_what_it_reads(reply, counter):
    """Hostile broker bytes end that connection with a reason; the generator does not crash."""
    L = _loadgen()
    srv, t = _one_shot_server(reply)
    try:
        r = L.run("handshake", host=U.HOST, port=srv.getsockname()[1], conns=1, tls=False, timeout=10,
                  conn_timeout=5)
    finally:
        t.join(10)
        srv.close()
    assert r[counter] == 1 and r["connack_ok"] == 0
    if counter == "refused":
        assert r["last_refusal"] == 5


def test_loadgen_plain_mqtt_against_mosquitto(mosquitto):
    """Every scenario straight against a real broker (no TLS): sessions, QoS 1 acks, deliveries."""
    L = _loadgen()
    r = L.run("handshake", host=U.HOST, port=mosquitto.port, conns=50, concurrency=8, tls=False, timeout=30)
    assert r["connack_ok"] == 50 and r["failed"] == 0
    r = L.run("idle", host=U.HOST, port=mosquitto.port, conns=40, tls=False, duration=0.3, timeout=30,
              sources=["127.0.0.2", "127.0.0.3"])
    assert r["connack_ok"] == 40 and r["live_end"] == 40 and r["stopped"] == "done"
    r = L.run("publish", host=U.HOST, port=mosquitto.port, conns=2, tls=False, qos=1, payload=100, messages=500,
              sub_host=U.HOST, sub_port=mosquitto.port, timeout=30)
    assert r["published"] == 1000 and r["acked"] == 1000 and r["delivered"] == 1000
