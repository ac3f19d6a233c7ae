"""The access log (issue 12): named formats and $variable templates, per-listener access logs,
syslog targets, and SIGUSR1 reopening the files for logrotate. Real sessions through
`fastproxy serve` to a real Mosquitto; no socket is mocked.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from datetime import datetime

import pytest

import proxyutil as U

MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
TIME_LOCAL = r"\d{2}/(?:" + MONTHS + r")/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}"
# The nginx seed's `log_format mqtt_log` (the nginx-stream format), as a line:
NGINX_STREAM_RE = re.compile(r"^(\S+) \[(" + TIME_LOCAL + r")\] (\S+) (\d{3}) (\d+) (\d+) (\d+\.\d{3})$")
CLIENT_ID = 'dev 1"x'                       # a space and a quote: escaped, one field
CLIENT_ID_ESCAPED = "dev\\x201\\x22x"
ALL_VARIABLES = ("remote_addr", "remote_port", "time_local", "time_iso8601", "msec", "listener", "protocol",
                 "ssl_protocol", "ssl_cipher", "websocket", "status", "reason", "bytes_sent", "bytes_received",
                 "session_time", "clientid", "username", "cn", "upstream_addr", "pid")


def read_lines(path) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [ln.rstrip("\n") for ln in f if ln.strip()]
    except FileNotFoundError:
        return []


def wait_lines(path, n: int, timeout: float = 10.0) -> list[str]:
    U.wait_until(lambda: len(read_lines(path)) >= n, timeout, what=f"{n} line(s) in {path}: {read_lines(path)}")
    return read_lines(path)


def session(port: int, client_id: str, tls_ctx=None, username: str | None = None) -> dict:
    """One MQTT 3.1.1 session: CONNECT, CONNACK, DISCONNECT; what its access-log line must say."""
    from mqtt_reference import encode_connect

    pkt = encode_connect(4, client_id, username=username) if username is not None else U.connect_packet(client_id)
    s = U.open_socket(port, tls_ctx=tls_ctx)
    try:
        info = {"port": s.getsockname()[1], "received": len(pkt) + len(U.DISCONNECT),
                "sent": 4, "protocol": "TCP", "cipher": None}
        if tls_ctx is not None:
            info["protocol"], info["cipher"] = s.version(), s.cipher()[0]
        s.sendall(pkt)
        ptype, _, body = U.read_packet(s)
        assert (ptype, body[1]) == (2, 0)
        s.sendall(U.DISCONNECT)
        closed, _, _ = U.wait_closed(s, 10)
        assert closed
    finally:
        s.close()
    return info


def toml_str(value: str) -> str:
    return json.dumps(value)   # a JSON string is a TOML basic string


def write_config(path, top: dict, listeners: list[dict]) -> None:
    def body(d: dict) -> str:
        out = []
        for k, v in d.items():
            if isinstance(v, list):
                out.append(f"{k} = [{', '.join(toml_str(x) for x in v)}]")
            else:
                out.append(f"{k} = {toml_str(v) if isinstance(v, str) else str(v).lower()}")
        return "\n".join(out) + "\n"
    text = body(top)
    for lst in listeners:
        text += "\n[[listener]]\n" + body(lst)
    path.write_text(text)


def check_time(stamp: str, before: float, after: float) -> float:
    t = datetime.strptime(stamp, "%d/%b/%Y:%H:%M:%S %z").timestamp()
    assert int(before) - 1 <= t <= after + 1, (stamp, before, after)
    return t


# ----------------------------------------------------------------------------- formats


def test_named_formats_and_a_template_render_a_known_mtls_session(certs, mosquitto, run_fastproxy, tmp_path):
    """Four listeners, each with its own log_format and file (mutual TLS, same broker): the
    `default` line (byte-compatible with the contract's parser), the nginx seed's `nginx-stream`
    line, `json`, and a template of every variable, each right for a known session."""
    ports = {name: U.free_port() for name in ("default", "nginx", "json", "template", "ws")}
    template = "\t".join("$" + v for v in ALL_VARIABLES[:-1]) + "\t${pid}|"
    logs = {name: tmp_path / f"{name}.log" for name in ports}
    listeners = [
        {"name": "fmt-default", "listen": f"127.0.0.1:{ports['default']}", "access_log": str(logs["default"])},
        {"name": "fmt-nginx", "listen": f"127.0.0.1:{ports['nginx']}", "access_log": str(logs["nginx"]),
         "log_format": "nginx-stream"},
        {"name": "fmt-json", "listen": f"127.0.0.1:{ports['json']}", "access_log": str(logs["json"]),
         "log_format": "json"},
        {"name": "fmt template", "listen": f"127.0.0.1:{ports['template']}", "access_log": str(logs["template"]),
         "log_format": template},
        {"name": "fmt-ws", "listen": f"127.0.0.1:{ports['ws']}", "access_log": str(logs["ws"]),
         "websocket": ["/mqtt"], "log_format": "$listener $websocket $protocol $ssl_protocol $clientid $cn"},
    ]
    cfg = tmp_path / "formats.toml"
    write_config(cfg, {"upstream": mosquitto.upstream, "tls_cert": certs.server_cert, "tls_key": certs.server_key,
                       "client_ca": certs.ca_cert, "access_log": "off"}, listeners)
    fp = run_fastproxy("-c", str(cfg), port=ports["default"], access_log=False)
    for p in ports.values():
        U.wait_until(lambda: U.port_is_listening(p), 10, what=f"listener on {p}")
    ctx = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    before = time.time()
    done = {name: session(ports[name], CLIENT_ID, ctx, username="user one" if name in ("json", "template") else None)
            for name in ("default", "nginx", "json", "template")}
    after = time.time()

    # default: exactly the contract's line (tests/proxyutil.py parses it)
    (line,) = wait_lines(logs["default"], 1)
    e = U.parse_access_line(line)
    s = done["default"]
    assert (e.remote, e.protocol, e.status, e.sent, e.received, e.reason, e.clientid, e.cn) == (
        "127.0.0.1", s["protocol"], 200, s["sent"], s["received"], "ok", CLIENT_ID_ESCAPED, "thing001")
    check_time(e.time, before, after)
    assert line == (f"127.0.0.1 [{e.time}] {s['protocol']} 200 {s['sent']} {s['received']} "
                    f"{e.session_time:.3f} ok {CLIENT_ID_ESCAPED} thing001")

    # nginx-stream: the seed's line, nothing after $session_time
    (line,) = wait_lines(logs["nginx"], 1)
    m = NGINX_STREAM_RE.match(line)
    assert m, line
    s = done["nginx"]
    assert m.group(1, 3, 4, 5, 6) == ("127.0.0.1", s["protocol"], "200", str(s["sent"]), str(s["received"]))
    check_time(m.group(2), before, after)

    # json: one object per line, stable keys in a stable order, null for unknown
    (line,) = wait_lines(logs["json"], 1)
    assert line.isascii() and "\n" not in line
    obj = json.loads(line)
    keys = [v for v in ALL_VARIABLES if v != "time_local"]
    assert list(obj) == keys
    s = done["json"]
    assert {k: obj[k] for k in keys if k not in ("time_iso8601", "msec", "session_time")} == {
        "remote_addr": "127.0.0.1", "remote_port": s["port"], "listener": "fmt-json", "protocol": s["protocol"],
        "ssl_protocol": s["protocol"], "ssl_cipher": s["cipher"], "websocket": None, "status": 200, "reason": "ok",
        "bytes_sent": s["sent"], "bytes_received": s["received"], "clientid": CLIENT_ID, "username": "user one",
        "cn": "thing001", "upstream_addr": mosquitto.upstream, "pid": fp.pid,
    }
    assert isinstance(obj["session_time"], float) and 0 <= obj["session_time"] < 10
    t = datetime.fromisoformat(obj["time_iso8601"]).timestamp()
    assert int(before) - 1 <= t <= after + 1 and int(obj["msec"]) == int(t)

    # a template of every variable (tab-separated: no field may hold a tab)
    (line,) = wait_lines(logs["template"], 1)
    assert line.endswith("|")
    fields = dict(zip(ALL_VARIABLES, line[:-1].split("\t"), strict=True))
    s = done["template"]
    t_local = check_time(fields["time_local"], before, after)
    assert datetime.fromisoformat(fields["time_iso8601"]).timestamp() == t_local
    assert re.fullmatch(r"\d+\.\d{3}", fields["msec"]) and int(float(fields["msec"])) == int(t_local)
    assert re.fullmatch(r"\d+\.\d{3}", fields["session_time"])
    assert {k: v for k, v in fields.items() if k not in ("time_local", "time_iso8601", "msec", "session_time")} == {
        "remote_addr": "127.0.0.1", "remote_port": str(s["port"]), "listener": "fmt\\x20template",
        "protocol": s["protocol"], "ssl_protocol": s["protocol"], "ssl_cipher": s["cipher"], "websocket": "-",
        "status": "200", "reason": "ok", "bytes_sent": str(s["sent"]), "bytes_received": str(s["received"]),
        "clientid": CLIENT_ID_ESCAPED, "username": "user\\x20one", "cn": "thing001",
        "upstream_addr": mosquitto.upstream, "pid": str(fp.pid),
    }
    assert s["protocol"] == "TLSv1.3" and s["cipher"]

    # $websocket: wss for MQTT over WebSocket on TLS (paho over wss, with the client certificate)
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ws-dev", transport="websockets",
                    reconnect_on_failure=False)
    c.ws_set_options(path="/mqtt")
    c.tls_set(ca_certs=certs.ca_cert, certfile=certs.client_cert, keyfile=certs.client_key)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(U.HOST, ports["ws"], keepalive=30)
    c.loop_start()
    try:
        assert connected.wait(10)
        c.disconnect()
    finally:
        c.loop_stop()
    (line,) = wait_lines(logs["ws"], 1)
    assert line == "fmt-ws wss TLSv1.3 TLSv1.3 ws-dev thing001"


def test_top_level_log_format_flag_and_plain_tcp(mosquitto, start_proxy, tmp_path):
    """--log-format on the command line; without TLS $ssl_protocol and $ssl_cipher are '-'."""
    fp = start_proxy(mosquitto, "--log-format", "$protocol $ssl_protocol $ssl_cipher $cn $clientid $status",
                     tls=False)
    session(fp.port, "plain-1")
    (line,) = wait_lines(fp.access_log_path, 1)
    assert line == "TCP - - - plain-1 200"


def test_per_listener_access_log(mosquitto, run_fastproxy, tmp_path):
    """The top-level access_log is every listener's unless a listener has its own (or 'off')."""
    p_a, p_b, p_c = U.free_port(), U.free_port(), U.free_port()
    shared, own = tmp_path / "shared.log", tmp_path / "b.log"
    cfg = tmp_path / "split.toml"
    write_config(cfg, {"upstream": mosquitto.upstream, "access_log": str(shared), "log_format": "$listener $clientid"},
                 [{"name": "a", "listen": f"127.0.0.1:{p_a}"},
                  {"name": "b", "listen": f"127.0.0.1:{p_b}", "access_log": str(own), "log_format": "json"},
                  {"name": "c", "listen": f"127.0.0.1:{p_c}", "access_log": "off"}])
    fp = run_fastproxy("-c", str(cfg), port=p_a, access_log=False)
    for p in (p_b, p_c):
        U.wait_until(lambda: U.port_is_listening(p), 10, what=f"listener on {p}")
    for i in range(3):
        session(p_a, f"a-{i}")
        session(p_b, f"b-{i}")
        session(p_c, f"c-{i}")
    wait_lines(shared, 3)
    wait_lines(own, 3)
    session(p_a, "a-last")      # written after every earlier line of this single process
    lines = wait_lines(shared, 4)
    assert lines == ["a a-0", "a a-1", "a a-2", "a a-last"]
    assert [(o["listener"], o["clientid"]) for o in map(json.loads, read_lines(own))] == [
        ("b", "b-0"), ("b", "b-1"), ("b", "b-2")]
    assert "c-" not in fp.stdout() + fp.stderr()


# ----------------------------------------------------------------------------- syslog


SYSLOG_STAMP = r"(?:" + MONTHS + r") [ 1-3]\d \d{2}:\d{2}:\d{2}"


def test_syslog_over_udp(mosquitto, start_proxy):
    """syslog:udp:HOST:PORT: one RFC 3164 datagram per line, facility local7, severity info
    (<190>), the host name, tag fastproxy[pid]."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((U.HOST, 0))
    rx.settimeout(10)
    try:
        fp = start_proxy(mosquitto, "--access-log", f"syslog:udp:{U.HOST}:{rx.getsockname()[1]}", tls=False)
        s = session(fp.port, CLIENT_ID)
        msg = rx.recv(65536).decode()
    finally:
        rx.close()
    host = re.escape(socket.gethostname().split(".")[0])
    m = re.fullmatch(rf"<190>({SYSLOG_STAMP}) {host} fastproxy\[{fp.pid}\]: (.*)", msg)
    assert m, msg
    e = U.parse_access_line(m.group(2))
    assert (e.remote, e.protocol, e.status, e.sent, e.received, e.reason, e.clientid) == (
        "127.0.0.1", "TCP", 200, s["sent"], s["received"], "ok", CLIENT_ID_ESCAPED)
    assert fp.access_log() == [] and "127.0.0.1 [" not in fp.stdout()


def test_syslog_over_a_unix_socket_with_options(mosquitto, start_proxy, tmp_path):
    """syslog:unix:PATH with facility, severity and tag: <local0*8+notice>=<133>, no host name
    (as syslog(3) writes to /dev/log), the json format as the message."""
    path = tmp_path / "log.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(10)
    try:
        fp = start_proxy(mosquitto, "--access-log", f"syslog:unix:{path},facility=local0,severity=notice,tag=mqtt",
                         "--log-format", "json", tls=False)
        session(fp.port, "unix-1")
        msg = rx.recv(65536).decode()
    finally:
        rx.close()
    m = re.fullmatch(rf"<133>({SYSLOG_STAMP}) mqtt\[{fp.pid}\]: (\{{.*\}})", msg)
    assert m, msg
    obj = json.loads(m.group(2))
    assert (obj["clientid"], obj["status"], obj["protocol"]) == ("unix-1", 200, "TCP")


def test_syslog_without_a_daemon_does_not_stop_the_proxy(mosquitto, start_proxy, tmp_path):
    """No socket at the syslog path: lines are dropped (the error log says so, once a minute at
    most), sessions are served."""
    fp = start_proxy(mosquitto, "--access-log", f"syslog:unix:{tmp_path}/nobody.sock", tls=False)
    for i in range(3):
        session(fp.port, f"nolog-{i}")
    U.wait_until(lambda: "line(s) dropped" in fp.stderr(), 10, what="a warning about the dropped lines")
    assert fp.stderr().count("line(s) dropped") == 1       # at most one a minute
    assert fp.proc.poll() is None


# ----------------------------------------------------------------------------- SIGUSR1


class Traffic:
    """Sessions one after another on a thread until stopped; counts them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                session(self.port, f"rot-{self.count}")
                self.count += 1
            except BaseException as e:   # reported by stop()
                self.errors.append(e)
                return

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, self.errors


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers2"])
def test_sigusr1_reopens_the_logs_after_logrotate_moved_them(mosquitto, start_proxy, tmp_path, workers):
    """logrotate without copytruncate: mv the access and error logs, SIGUSR1 to the (master)
    process; new lines go to new files, and no line is lost while sessions keep coming."""
    log, err = tmp_path / "access.log", tmp_path / "error.log"
    extra = ["--access-log", str(log), "--error-log", str(err), "--log-format", "$pid $clientid $status"]
    if workers > 1:
        extra += ["--workers", str(workers), "--log-level", "debug"]    # workers log the reopen at debug
    fp = start_proxy(mosquitto, *extra, tls=False)
    if workers > 1:
        U.wait_until(lambda: len(U.listening_pids(fp.port)) >= workers, 10, what="the workers listening")
    worker_pids = U.descendants(fp.pid) if workers > 1 else {fp.pid}
    with Traffic(fp.port) as traffic:
        U.wait_until(lambda: traffic.count >= 10, 20, what="10 sessions")
        os.rename(log, tmp_path / "access.log.1")
        os.rename(err, tmp_path / "error.log.1")
        fp.signal(signal.SIGUSR1)
        # every process says so in the new error log (the master has no access log: 0 files)
        U.wait_until(lambda: err.exists() and err.read_text().count("SIGUSR1: reopened") >= len(worker_pids)
                     + (workers > 1), 10, what="each process reopening its logs")
        at_reopen = traffic.count
        U.wait_until(lambda: traffic.count >= at_reopen + 10 * workers, 30, what="more sessions")
    total = traffic.count
    wait_lines(log, 1)
    U.wait_until(lambda: len(read_lines(log)) + len(read_lines(tmp_path / "access.log.1")) >= total, 10,
                 what=f"{total} lines in all")
    old, new = read_lines(tmp_path / "access.log.1"), read_lines(log)
    ids = sorted(int(ln.split()[1].split("-")[1]) for ln in old + new)
    assert ids == list(range(total)), "a line was lost or written twice"
    assert len(old) >= 10 and len(new) >= 10 * workers
    assert {int(ln.split()[0]) for ln in old + new} <= worker_pids
    # after the reopen every process writes only to the new file
    for ln in old:
        assert int(ln.split()[1].split("-")[1]) <= at_reopen, ln
    if workers > 1:
        assert {int(ln.split()[0]) for ln in new} == worker_pids, "a worker did not reopen (or got no session)"
    assert "listening on" in (tmp_path / "error.log.1").read_text()
    assert fp.stop() == 0


# ----------------------------------------------------------------------------- configuration errors


def _check(*args: str) -> tuple[int, str]:
    r = U.run_cli("check", "--listen", "127.0.0.1:18830", "--upstream", "127.0.0.1:1883", *args)
    return r.returncode, r.stderr.strip()


@pytest.mark.parametrize("args, message", [
    (["--log-format", "$remote_addr $nope"], "command line: --log-format: unknown variable $nope"),
    (["--log-format", "nginx"], "command line: --log-format: 'nginx' is neither a format name"),
    (["--log-format", "${remote_addr"], "command line: --log-format: '${remote_addr' is neither a format name"),
    (["--access-log", "syslog:tcp:127.0.0.1:514"], "command line: --access-log: expected syslog:unix:/dev/log or"),
    (["--access-log", "syslog:udp:127.0.0.1:99999"], "command line: --access-log: expected syslog:udp:HOST:PORT"),
    (["--access-log", "syslog:unix:dev/log"], "command line: --access-log: syslog:unix: needs an absolute"),
    (["--access-log", "syslog:udp:127.0.0.1,facility=local9"], "--access-log: unknown syslog facility 'local9'"),
    (["--access-log", "syslog:udp:127.0.0.1,level=info"], "--access-log: unknown syslog option 'level=info'"),
    (["--access-log", "/nonexistent-dir/access.log"], "--access-log: directory does not exist"),
])
def test_bad_values_on_the_command_line(args, message):
    code, err = _check(*args)
    assert code == 2 and err.startswith("fastproxy: configuration error: ") and message in err, err


def test_bad_values_in_a_file_name_the_file_and_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    write_config(cfg, {"upstream": "127.0.0.1:1883"},
                 [{"listen": "127.0.0.1:18831"}, {"listen": "127.0.0.1:18832", "log_format": "$cn $bogus"}])
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 2, r.stderr
    assert f"configuration error: {cfg}: listener[1].log_format: unknown variable $bogus" in r.stderr
    write_config(cfg, {"upstream": "127.0.0.1:1883", "listen": "127.0.0.1:18831", "access_log": "syslog:udp:"}, [])
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 2 and f"{cfg}: access_log: expected syslog:udp:HOST:PORT" in r.stderr, r.stderr


def test_config_model():
    """Top-level keys set the defaults; a listener's own wins; 'off' in a listener is kept
    (None there means: the top-level one); names and relative paths are normalised."""
    import fastproxy

    cfg = fastproxy.build_config({
        "upstream": "127.0.0.1:1883", "access_log": "syslog:udp:localhost", "log_format": "json",
        "listener": [{"listen": "127.0.0.1:0"}, {"listen": "127.0.0.1:0", "access_log": "off", "log_format": "$cn"}],
    })
    assert cfg.access_log == "syslog:udp:127.0.0.1:514,facility=local7,severity=info,tag=fastproxy"
    assert cfg.log_format == "json"
    assert (cfg.listeners[0].access_log, cfg.listeners[0].log_format) == (None, None)
    assert (cfg.listeners[1].access_log, cfg.listeners[1].log_format) == ("off", "$cn")
    one = fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": "127.0.0.1:1883", "log_format": "nginx-stream"})
    assert one.log_format == "nginx-stream" and one.listeners[0].log_format is None
    assert fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": "127.0.0.1:1883"}).log_format == "default"
