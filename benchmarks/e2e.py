#!/usr/bin/env python3
"""End-to-end benchmark: fastproxy vs HAProxy vs nginx (stream + ssl) in front of one Mosquitto.

Same certificates, same broker, same clients; rounds interleave the proxies; figures are medians
over rounds; each figure is printed with its ratio to the best peer (the better of HAProxy and
nginx). The primary figures are the proxy's own CPU per unit of work (utime+stime of the proxy's
process group from /proc) and its memory, because on a small shared machine messages/s is bound
by the load generator, not by the proxy. See benchmarks/README.md.

Two fastproxy columns: `fastproxy` (the checkout's in-place build, usually on the system OpenSSL;
--fastproxy-cmd for another) and, on request, `fastproxy-awslc` (the same sources built with
FASTPROXY_TLS=awslc in a cache directory, rebuilt when ext/ or setup.py change;
--fastproxy-awslc-cmd for another). Both get the same arguments and scenarios and each is
compared with the best peer, never with the other.

    python3 benchmarks/e2e.py --quick                       # ~1 minute smoke run
    python3 benchmarks/e2e.py --json out.json               # full run (< 10 minutes on 2 cores)
    python3 benchmarks/e2e.py --only haproxy,nginx --scenarios msg64,idle
    python3 benchmarks/e2e.py --only fastproxy,fastproxy-awslc,haproxy,nginx --scenarios msg64,qos1,bulk,idle,connect
    python3 benchmarks/e2e.py --only fastproxy --scenarios pool --pool-size 3   # pool of 3 vs 1 broker
    python3 benchmarks/e2e.py --scenarios silent            # RSS per silent (pre-TLS) socket, ~1 min/round
    python3 benchmarks/e2e.py --scenarios msg64,wss         # MQTT over WebSocket (wss) vs mqtts, CPU per message
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    HERE,
    REPO,
    TLS13_SUITE,
    Certs,
    Procs,
    best_cpu_s,
    comma_choices,
    cpu_busy_fraction,
    cpu_delta_s,
    environment,
    file_tail,
    free_port,
    gen_certs,
    group_cpu,
    group_fd_count,
    group_pids,
    group_rss_kib,
    log,
    median,
    nofile_target,
    own_cpu_s,
    sigterm_as_interrupt,
    stop_and_clean,
    system_busy_s,
    wait_port,
)

PROXIES = ("fastproxy", "fastproxy-awslc", "haproxy", "nginx")
DEFAULT_PROXIES = ("fastproxy", "haproxy", "nginx")  # fastproxy-awslc on request (it needs an AWS-LC build)
PEERS = ("haproxy", "nginx")
# the fastproxy builds: the same arguments and scenarios; each is compared with the best peer, never with the other
FASTPROXIES = ("fastproxy", "fastproxy-awslc")
# fastproxy-awslc without --fastproxy-awslc-cmd: built under $FASTPROXY_CACHE/e2e-awslc/<key of the sources>
AWSLC_BUILDS_KEPT = 3
SCENARIOS = ("msg64", "msg1k", "qos1", "bulk", "idle", "silent", "latency", "connect", "connect-pp", "pool", "wss")
DEFAULT_SCENARIOS = ("msg64", "msg1k", "bulk", "idle", "latency")
# connect-pp: fastproxy alone, without and with a PROXY v2 header (+ SSL TLVs + CN) toward a fake broker
PP_VARIANTS = ("fastproxy", "fastproxy+v2-ssl-cn")
# pool: fastproxy alone, QoS 0 messages from --pool-clients publishers, with 1 upstream broker and with
# a pool of --pool-size brokers (the publishers' ClientIds spread over them by the clientid balance)
POOL_TARGET_PCT = 5.0
# silent: the proxies' TLS handshake timeouts in that scenario (fastproxy --handshake-timeout, nginx
# ssl_handshake_timeout; HAProxy's is its `timeout client`, 1 h), so that no silent socket is closed while measured
SILENT_HS_TIMEOUT_S = 120
# silent: after the sockets are closed, sample the proxy's RSS for up to this long (report the last value)
SILENT_TRIM_WAIT_S = 15.0
# wss: fastproxy's CPU per QoS 0 64 B message over WebSocket-over-TLS, at most this times the same over mqtts
WSS_TARGET_RATIO = 1.3
WSS_PATH = "/mqtt"
WSS_MIN_COMPLETE = 0.99  # a wss/mqtts run counts only when this share of its messages arrived
WSS_CLIENTS = ("mosquitto", "loadgen")


def pool_variants(n: int) -> tuple[str, str]:
    return ("pool=1", f"pool={n}")

LOADGEN = os.path.join(HERE, "loadgen.py")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
NGINX_LOAD_STREAM = f"load_module {NGINX_STREAM_MODULE};\n"
PY = sys.executable


@dataclass(frozen=True)
class Metric:
    scenario: str
    key: str
    label: str
    unit: str
    lower_is_better: bool
    target: tuple[str, float] | None = None  # ("peer", k): <= k x best peer; ("abs", v): <= v
    fmt: str = "{:.2f}"
    ratio_to: str | None = None  # a fixed reference instead of the best peer (e.g. "haproxy")
    no_ratio: bool = False  # the figure is itself a ratio: no "(x)" to a peer


METRICS = (
    Metric("msg64", "cpu_us_per_msg", "proxy CPU per message, 64 B", "µs/msg", True, ("peer", 1.0), "{:.3f}"),
    Metric("msg64", "msgs_per_s", "messages/s, 64 B", "msg/s", False, None, "{:,.0f}"),
    Metric("msg1k", "cpu_us_per_msg", "proxy CPU per message, 1 KiB", "µs/msg", True, ("peer", 1.0), "{:.3f}"),
    Metric("msg1k", "msgs_per_s", "messages/s, 1 KiB", "msg/s", False, None, "{:,.0f}"),
    Metric("qos1", "cpu_us_per_msg", "proxy CPU per message, 64 B QoS 1 (PUBACK back)", "µs/msg", True,
           ("peer", 1.0), "{:.3f}"),
    Metric("qos1", "msgs_per_s", "messages/s, 64 B QoS 1", "msg/s", False, None, "{:,.0f}"),
    Metric("bulk", "cpu_s_per_gb", "proxy CPU per GB, bulk TLS -> plain", "s/GB", True, ("peer", 1.0), "{:.3f}"),
    Metric("bulk", "mb_per_s", "bulk throughput", "MB/s", False, None, "{:,.0f}"),
    Metric("idle", "kib_per_conn", "proxy RSS per idle mTLS connection", "KiB/conn", True, ("abs", 14.0), "{:.1f}"),
    Metric("idle", "rss_before_kib", "proxy RSS with no connection (baseline)", "KiB", True, None, "{:,.0f}"),
    Metric("idle", "handshake_cpu_ms", "proxy CPU per mTLS connection setup", "ms/conn", True, None, "{:.3f}"),
    Metric("silent", "kib_per_silent_conn", "proxy RSS per silent socket", "KiB/conn", True,
           ("abs", 4.0), "{:.2f}"),
    Metric("silent", "rss_after_close_kib", "RSS above baseline after they closed", "KiB", True, None, "{:,.0f}"),
    Metric("latency", "added_p50_us", "added round-trip latency p50", "µs", True, ("peer", 1.0), "{:.0f}"),
    Metric("latency", "added_p99_us", "added round-trip latency p99", "µs", True, ("peer", 1.0), "{:.0f}"),
    # connect: ratios to HAProxy, the only peer doing the same job (nginx: plain mTLS, no ClientId check)
    Metric("connect", "cpu_ms_per_conn", "proxy CPU per mTLS CONNECT+check+CONNACK", "ms/conn", True, ("peer", 1.0),
           "{:.3f}", ratio_to="haproxy"),
    Metric("connect", "conns_per_s", "mTLS CONNECT/CONNACK connections/s", "conn/s", False, None, "{:,.0f}",
           ratio_to="haproxy"),
    # wss: the same client (Mosquitto 2.1 mosquitto_pub, or loadgen.py pub) with and without --ws, paired per round
    Metric("wss", "cpu_us_per_msg_wss", "proxy CPU per message, wss", "µs/msg", True, None, "{:.3f}"),
    Metric("wss", "cpu_us_per_msg_mqtts", "proxy CPU per message, mqtts (same client)", "µs/msg", True, None,
           "{:.3f}"),
    Metric("wss", "wss_over_mqtts", "CPU/msg wss / mqtts (same round)", "x", True, ("abs", WSS_TARGET_RATIO),
           "{:.2f}", no_ratio=True),
    Metric("wss", "msgs_per_s_wss", "messages/s, wss", "msg/s", False, None, "{:,.0f}"),
    Metric("wss", "msgs_per_s_mqtts", "messages/s, mqtts (same client)", "msg/s", False, None, "{:,.0f}"),
)


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------- line readers


class LineQueue(threading.Thread):
    """Reads a process's stdout line by line into a queue (daemon thread; ends at EOF)."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.q: queue.Queue[str] = queue.Queue()
        self.start()

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            self.q.put(line.decode(errors="replace").rstrip("\n"))

    def get_json(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no result within {timeout:.0f}s")
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                raise BenchError(f"no result within {timeout:.0f}s") from None
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue


class TopicCounter(threading.Thread):
    """Counts `mosquitto_sub -F %t` output lines per topic."""

    def __init__(self, stream, data_topic: bytes) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.data_topic = data_topic
        self.count = 0
        self.other = 0
        self.last_t = 0.0
        self.start()

    def run(self) -> None:
        fd = self.stream.fileno()
        rem = b""
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            lines = (rem + chunk).split(b"\n")
            rem = lines.pop()
            n = lines.count(self.data_topic)
            self.other += len(lines) - n
            if n:
                self.count += n
                self.last_t = time.monotonic()


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        # each relayed session holds 2 fds in the proxy: keep 2 x maxconn under the fd limit
        self.nofile = nofile_target()
        # (a silent socket holds 1 fd in the proxy, and 1 in the loadgen process holding it)
        want = max(a.idle_conns if "idle" in a.scenarios else 0, a.silent_conns if "silent" in a.scenarios else 0)
        self.maxconn = min(max(2000, want + 1000), (self.nofile - 100) // 2)
        if a.idle_conns + 10 > self.maxconn and "idle" in a.scenarios:
            raise BenchError(f"--idle-conns {a.idle_conns} needs about {2 * a.idle_conns + 200} file descriptors "
                             f"per proxy; RLIMIT_NOFILE hard limit is {self.nofile}")
        if a.silent_conns + 10 > self.maxconn and "silent" in a.scenarios:
            raise BenchError(f"--silent-conns {a.silent_conns} needs about {2 * a.silent_conns + 200} file "
                             f"descriptors per proxy (HAProxy maxconn / nginx worker_connections are sized "
                             f"at 2 per session); RLIMIT_NOFILE hard limit is {self.nofile}")
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="fastproxy-e2e-")
        self.certs: Certs = gen_certs(os.path.join(self.tmp, "certs"))
        self.broker_port = 0
        self.sink_port = 0
        self.sink_lines: LineQueue | None = None
        self.seq = 0
        self.notes: list[str] = []
        self.background: list[dict] = []
        self.round = 0
        # per fastproxy build: its command and the PYTHONPATH it runs with (None: the environment's)
        self.fp_cmd: dict[str, list[str]] = a.fp_cmd
        self.fp_path: dict[str, str | None] = a.fp_path
        # connect-pp and pool measure one fastproxy build: fastproxy, else fastproxy-awslc (set by run())
        self.fp_main = "fastproxy"
        self.pp_variants: tuple[str, str] = PP_VARIANTS

    # ---- infrastructure

    def _name(self, what: str) -> str:
        self.seq += 1
        return f"{what}-{self.seq}"

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def start_broker(self) -> None:
        p, port = self.start_mosquitto("mosquitto")
        self.broker = p
        self.broker_port = port

    def start_mosquitto(self, tag: str, binary: str = "mosquitto",
                        ws_port: int | None = None) -> tuple[subprocess.Popen, int]:
        """ws_port: also a `protocol websockets` listener there (Mosquitto 2.1's built-in one)."""
        port = free_port()
        conf = self.path(f"{tag}.conf")
        with open(conf, "w") as f:
            if ws_port is not None:
                f.write(f"listener {ws_port} 127.0.0.1\nprotocol websockets\nmax_connections -1\n")
            f.write(
                f"listener {port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "set_tcp_nodelay true\n"
                "max_connections -1\n"
                "max_queued_messages 0\n"   # 0 = no limit: a QoS 0 burst is not dropped by the broker
                "max_inflight_messages 0\n"
                "max_keepalive 65535\n"
                "log_dest stderr\n"
                "log_type error\nlog_type warning\n"
            )
            if os.geteuid() == 0:
                f.write("user root\n")  # keep access to the temp dir; loopback only
        p = self.procs.start("mosquitto", [binary, "-c", conf], log_path=self.path(f"{tag}.log"))
        wait_port("127.0.0.1", port, 10, p)
        if ws_port is not None:
            wait_port("127.0.0.1", ws_port, 10, p)
        log(f"{tag} on 127.0.0.1:{port}" + (f", websockets on 127.0.0.1:{ws_port}" if ws_port else "")
            + f" (pid {p.pid})")
        return p, port

    def start_ws_broker(self) -> None:
        """wss: Mosquitto 2.1 with a WebSocket listener, the upstream of HAProxy and nginx (they pass the
        WebSocket through); its plain TCP listener is where the counting subscriber connects."""
        self.ws_broker_ws_port = free_port()
        _, self.ws_broker_port = self.start_mosquitto("mosquitto21-ws", self.a.mosquitto21_bin,
                                                      ws_port=self.ws_broker_ws_port)

    def start_pool_brokers(self) -> None:
        """--pool-size Mosquittos for the pool scenario (the pool=1 variant uses the first)."""
        self.pool_ports = [self.start_mosquitto(f"mosquitto-pool{i}")[1] for i in range(self.a.pool_size)]

    def start_sink(self) -> None:
        p = self.procs.start("sink", [PY, LOADGEN, "sink", "--port", "0", "--max-seconds", str(self.a.time_budget + 600)],
                             stdout=subprocess.PIPE, log_path=self.path("sink.log"))
        self.sink_lines = LineQueue(p.stdout)
        first = self.sink_lines.get_json(15)
        self.sink_port = int(first["listening"])
        self.sink = p
        log(f"bulk sink on 127.0.0.1:{self.sink_port} (pid {p.pid})")

    # ---- proxies

    def start_proxy(self, name: str, upstream_port: int, check_clientid: bool = False,
                    proxy_protocol: str | None = None,
                    fastproxy_args: Sequence[str] = (),
                    handshake_timeout: int | None = None, wss: bool = False) -> tuple[subprocess.Popen, int]:
        """check_clientid: the `connect` job (ClientId must equal the client certificate's CN);
        nginx cannot do it without njs and ignores it (plain mTLS reference).
        fastproxy_args: more `fastproxy serve` options (e.g. further --upstream: a pool); fastproxy only.
        handshake_timeout: seconds a client may take from accept to the end of its TLS handshake
        (fastproxy --handshake-timeout, nginx ssl_handshake_timeout; HAProxy 2.6 bounds the handshake
        with `timeout client`, 1 h here, so it needs nothing); None: each proxy's default (fastproxy
        10 s, HAProxy 1 h, nginx 60 s).
        wss: the listener speaks MQTT over WebSocket over TLS (same TLS setup): fastproxy --websocket
        (upstream: plain MQTT), HAProxy `mode http` and nginx `http` + proxy_pass with the Upgrade headers
        (upstream: a broker's WebSocket listener; both pass the WebSocket through unchanged)."""
        if fastproxy_args and name not in FASTPROXIES:
            raise ValueError("fastproxy_args: fastproxy only")
        port = free_port()
        c = self.certs
        tag = self._name(name)
        logp = self.path(f"{tag}.log")
        haproxy_rules = ""
        if check_clientid:
            # HAProxy >= 2.4: wait for a whole valid MQTT CONNECT, then compare its ClientId with the
            # verified certificate's CN (two fetches cannot be compared directly: CN -> variable, strcmp)
            haproxy_rules = (
                "    tcp-request inspect-delay 5s\n"
                "    tcp-request content reject unless { req.payload(0,0),mqtt_is_valid }\n"
                "    tcp-request content set-var(sess.cn) ssl_c_s_dn(cn)\n"
                "    acl cn_ok req.payload(0,0),mqtt_field_value(connect,client_identifier),strcmp(sess.cn) eq 0\n"
                "    tcp-request content reject unless cn_ok\n"
                "    tcp-request content accept\n"
            )
        if name in FASTPROXIES:
            argv = self.fp_cmd[name] + [
                "serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream_port}",
                "--tls-cert", c.server_crt, "--tls-key", c.server_key,
                "--client-ca", c.ca, "--verify", "required",
                "--tls-min-version", "TLSv1.3", "--tls-ciphersuites", self.a.tls_suite,
                "--access-log", "off", "--idle-timeout", "3600", "--workers", "1", "--drain-timeout", "0",
            ]
            if check_clientid:
                argv.append("--require-clientid-cn")
            if proxy_protocol:
                argv += ["--proxy-protocol", proxy_protocol]
            if handshake_timeout is not None:
                argv += ["--handshake-timeout", f"{handshake_timeout}s"]
            if wss:
                argv += ["--websocket", WSS_PATH]
            argv += list(fastproxy_args)
            env = dict(os.environ)
            path = self.fp_path.get(name)
            if path:
                env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            p = self.procs.start(name, argv, log_path=logp, env=env, cwd=self.tmp)
            expect_procs = 1
        elif name == "haproxy":
            cfg = self.path(f"{tag}.cfg")
            with open(cfg, "w") as f:
                f.write(
                    "global\n"
                    "    nbthread 1\n"  # one thread: the same single core budget as the others
                    f"    maxconn {self.maxconn}\n"
                    "defaults\n"
                    + ("    mode http\n    timeout tunnel 1h\n    timeout http-request 10s\n" if wss else "    mode tcp\n")
                    + "    timeout connect 5s\n"
                    # also the TLS handshake timeout: 2.6 has no `timeout client-hs` (2.8+), and
                    # 2.8+ falls back to `timeout client` without one (handshake_timeout: 1 h >= it)
                    "    timeout client 1h\n"
                    "    timeout server 1h\n"
                    f"    maxconn {self.maxconn}\n"
                    "frontend fe\n"
                    f"    bind 127.0.0.1:{port} ssl crt {c.server_combined} verify required ca-file {c.ca}"
                    f" ssl-min-ver TLSv1.3 ciphersuites {self.a.tls_suite}\n"
                    f"{haproxy_rules}"
                    "    default_backend be\n"
                    "backend be\n"
                    f"    server broker 127.0.0.1:{upstream_port}\n"
                )
            p = self.procs.start(name, ["haproxy", "-db", "-f", cfg], log_path=logp)
            expect_procs = 1
        elif name == "nginx":
            # The same TLS server either way: WebSocket through `http` to Mosquitto's ws listener
            # (wss), or the bytes through `stream`.
            prefix = self.path(tag)
            os.makedirs(prefix, exist_ok=True)
            cfg = os.path.join(prefix, "nginx.conf")
            tls_server = (
                f"        listen 127.0.0.1:{port} ssl;\n"
                f"        ssl_certificate {c.server_crt};\n"
                f"        ssl_certificate_key {c.server_key};\n"
                "        ssl_protocols TLSv1.3;\n"
                f"        ssl_conf_command Ciphersuites {self.a.tls_suite};\n"
                "        ssl_verify_client on;\n"
                f"        ssl_client_certificate {c.ca};\n"
            )
            if wss:
                body = (
                    "http {\n"
                    "    access_log off;\n"
                    f"    client_body_temp_path {prefix}/body;\n"
                    f"    proxy_temp_path {prefix}/proxy;\n"
                    f"    fastcgi_temp_path {prefix}/fastcgi;\n"
                    f"    uwsgi_temp_path {prefix}/uwsgi;\n"
                    f"    scgi_temp_path {prefix}/scgi;\n"
                    "    server {\n"
                    + tls_server
                    + f"        location {WSS_PATH} {{\n"
                    f"            proxy_pass http://127.0.0.1:{upstream_port};\n"
                    "            proxy_http_version 1.1;\n"
                    "            proxy_set_header Upgrade $http_upgrade;\n"
                    "            proxy_set_header Connection \"upgrade\";\n"
                    "            proxy_set_header Host $host;\n"
                    "            proxy_connect_timeout 5s;\n"
                    "            proxy_read_timeout 1h;\n"
                    "            proxy_send_timeout 1h;\n"
                    "        }\n"
                    "    }\n"
                    "}\n"
                )
            else:
                body = (
                    "stream {\n"
                    "    server {\n"
                    + tls_server
                    + (f"        ssl_handshake_timeout {handshake_timeout}s;\n" if handshake_timeout is not None else "")
                    + "        proxy_connect_timeout 5s;\n"
                    "        proxy_timeout 1h;\n"
                    f"        proxy_pass 127.0.0.1:{upstream_port};\n"
                    "    }\n"
                    "}\n"
                )
            with open(cfg, "w") as f:
                f.write(
                    ("" if wss else NGINX_LOAD_STREAM)
                    + "daemon off;\n"
                    "worker_processes 1;\n"
                    f"worker_rlimit_nofile {self.nofile};\n"
                    f"pid {prefix}/nginx.pid;\n"
                    f"error_log {prefix}/error.log warn;\n"
                    f"events {{ worker_connections {2 * self.maxconn}; }}\n"
                    + body
                )
            p = self.procs.start(name, ["nginx", "-p", prefix, "-c", cfg, "-e", f"{prefix}/error.log"],
                                 log_path=logp)
            expect_procs = 2  # master + one worker
        else:
            raise ValueError(name)
        try:
            wait_port("127.0.0.1", port, 20, p)
            deadline = time.monotonic() + 5
            while len(group_pids(p.pid)) < expect_procs and time.monotonic() < deadline:
                time.sleep(0.05)
        except (RuntimeError, TimeoutError) as e:
            self.procs.stop(p)
            raise BenchError(f"{name} did not start: {e}; log {logp}: {file_tail(logp)}") from None
        time.sleep(0.2)
        return p, port

    def stop_proxy(self, name: str, p: subprocess.Popen) -> None:
        alive = p.poll() is None
        rc = self.procs.stop(p)
        if not alive:
            raise BenchError(f"{name} exited during the run with status {rc}")

    def perf_start(self, what: str, proxy: str, pgid: int) -> subprocess.Popen | None:
        """With --perf DIR: `perf record -g` the proxy's processes during the measurement."""
        if not self.a.perf or not shutil.which("perf"):
            return None
        os.makedirs(self.a.perf, exist_ok=True)
        out = os.path.join(self.a.perf, f"r{self.round}-{what}-{proxy}.perf.data")
        pids = ",".join(str(x) for x in group_pids(pgid))
        p = self.procs.start("perf", ["perf", "record", "-g", "-F", str(self.a.perf_freq), "-o", out, "-p", pids],
                             log_path=self.path("perf.log"))
        time.sleep(0.5)  # attach
        return p

    def perf_stop(self, p: subprocess.Popen | None) -> None:
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGINT)
            p.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.procs.stop(p)

    def tls_args(self) -> list[str]:
        c = self.certs
        return ["--cafile", c.ca, "--cert", c.client_crt, "--key", c.client_key, "--tls-version", "tlsv1.3"]

    def loadgen_tls(self) -> list[str]:
        c = self.certs
        return ["--ca", c.ca, "--cert", c.client_crt, "--key", c.client_key]

    # ---- scenarios

    def data_file(self, size: int, n: int) -> str:
        path = self.path(f"lines-{size}-{n}.txt")
        if not os.path.exists(path):
            line = b"x" * size + b"\n"
            block = line * max(1, (1 << 20) // len(line))
            per_block = len(block) // len(line)
            with open(path, "wb") as f:
                left = n
                while left >= per_block:
                    f.write(block)
                    left -= per_block
                f.write(line * left)
        return path

    def run_msg(self, proxy: str, size: int, transport: str | None = None) -> dict:
        """mosquitto_pub -l (QoS 0) through the proxy; a mosquitto_sub on the broker counts arrivals.

        transport (the wss scenario): "mqtts" or "wss", with the --wss-client publisher (Mosquitto 2.1's
        mosquitto_pub, with --ws for wss, or loadgen.py pub). For wss, HAProxy and nginx pass the
        WebSocket through to Mosquitto 2.1's WebSocket listener and the messages are counted there;
        fastproxy (and every mqtts run) relays to the broker of the other scenarios."""
        n = self.a.messages
        data = self.data_file(size, n)
        bp = self.broker_port
        upstream = bp
        if transport == "wss" and proxy in PEERS:
            bp, upstream = self.ws_broker_port, self.ws_broker_ws_port
        topic = f"bench/{self._name('d')}"
        sub = self.procs.start("mosquitto_sub", ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(bp), "-q", "0",
                                                 "-t", f"{topic}/#", "-F", "%t", "-i", self._name("count")],
                               stdout=subprocess.PIPE, log_path=self.path("mosquitto_sub.log"))
        counter = TopicCounter(sub.stdout, f"{topic}/data".encode())
        px = None
        try:
            # the subscription is live once a marker published directly to the broker arrives
            for _ in range(50):
                subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(bp), "-t", f"{topic}/ready", "-m", "r"],
                               timeout=10, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                t_end = time.monotonic() + 0.2
                while not counter.other and time.monotonic() < t_end:
                    time.sleep(0.01)
                if counter.other:
                    break
            else:
                raise BenchError("counting subscriber never received its marker")
            if proxy == "direct":
                target, pgid = ["-p", str(bp)], None
            else:
                px, port = self.start_proxy(proxy, upstream, wss=transport == "wss")
                target, pgid = ["-p", str(port)] + self.tls_args(), px.pid
            argv = ["mosquitto_pub", "-h", "127.0.0.1", *target, "-t", f"{topic}/data", "-q", "0", "-l",
                    "-i", self._name("pub")]
            if transport is not None and self.a.wss_client == "mosquitto":
                argv[0] = self.a.mosquitto21_pub
                if transport == "wss":
                    argv.append("--ws")
            elif transport is not None:
                argv = [PY, LOADGEN, "pub", "--port", str(port), *self.loadgen_tls(), "--topic", f"{topic}/data",
                        "--messages", str(n), "--size", str(size), "--client-id", self._name("pub"),
                        "--batch", str(self.a.wss_batch), "--max-seconds", str(self.a.step_timeout)]
                if transport == "wss":
                    argv += ["--ws", "--path", WSS_PATH]
            perf = self.perf_start(f"{transport or 'msg'}{size}", proxy, pgid) if pgid else None
            c0 = group_cpu(pgid) if pgid else None
            t0 = time.monotonic()
            with open(data, "rb") as stdin:
                pub = self.procs.start("mosquitto_pub", argv, stdin=stdin, log_path=self.path("mosquitto_pub.log"))
            try:
                pub.wait(self.a.step_timeout)
            except subprocess.TimeoutExpired:
                pass
            pub_alive = pub.poll() is None
            pub_rc = self.procs.stop(pub)
            # wait for the stragglers: until all arrived, or no progress for 3 s
            last_count, last_change = -1, time.monotonic()
            deadline = time.monotonic() + self.a.step_timeout
            while counter.count < n and time.monotonic() < deadline:
                if counter.count != last_count:
                    last_count, last_change = counter.count, time.monotonic()
                elif time.monotonic() - last_change > 3:
                    break
                time.sleep(0.02)
            time.sleep(0.05)
            c1 = group_cpu(pgid) if pgid else None
            self.perf_stop(perf)
            count = counter.count
            elapsed = (counter.last_t - t0) if count else None
            res: dict = {"expected": n, "count": count, "pub_rc": pub_rc, "pub_timed_out": pub_alive,
                         "elapsed_s": elapsed, "msgs_per_s": count / elapsed if elapsed else None}
            if c1 is not None and count:
                cpu = best_cpu_s(c0, c1)
                ticks_s, sched_s = cpu_delta_s(c0, c1)
                res.update(cpu_s=cpu, cpu_ticks_s=ticks_s, cpu_sched_s=sched_s, cpu_us_per_msg=cpu / count * 1e6)
            if count < n:
                res["warning"] = f"only {count} of {n} messages arrived (pub exit {pub_rc})"
            if px is not None:
                self.stop_proxy(proxy, px)
                px = None
            return res
        finally:
            if px is not None:
                self.procs.stop(px)
            self.procs.stop(sub)

    def run_qos1(self, proxy: str) -> dict:
        """--messages QoS 1 64 B PUBLISHes over one mTLS connection from the compiled generator of
        `fastproxy bench` (fastproxy._loadgen in a process of its own; up to 64 in flight), each
        PUBACK back through the proxy: the pattern of devices that want delivery confirmed.
        (mosquitto_pub -l -q 1 drops what it still queues when its input ends.) A PUBACK counts the
        message: the broker has it."""
        px, port = self.start_proxy(proxy, self.broker_port)
        c = self.certs
        params = {"scenario": "publish", "host": "127.0.0.1", "port": port, "conns": 1, "concurrency": 1,
                  "ca": c.ca, "cert": c.client_crt, "key": c.client_key, "prefix": self._name("q1"),
                  "qos": 1, "payload": 64, "messages": self.a.messages, "timeout": float(self.a.step_timeout)}
        try:
            perf = self.perf_start("qos1", proxy, px.pid)
            c0 = group_cpu(px.pid)
            gen = subprocess.run([PY, "-m", "fastproxy.bench", "_gen", json.dumps(params)], capture_output=True,
                                 text=True, timeout=self.a.step_timeout + 30, cwd=REPO)
            c1 = group_cpu(px.pid)
            self.perf_stop(perf)
            lines = [x for x in gen.stdout.splitlines() if x.startswith("result ")]
            if not lines:
                raise BenchError(f"qos1 generator failed: {(gen.stdout + gen.stderr)[-400:]}")
            r = json.loads(lines[-1].split(" ", 1)[1])
            acked = int(r.get("acked") or 0)
            t0, t1 = r.get("t_send_start"), r.get("t_send_end")
            res: dict = {"expected": self.a.messages, "count": acked, "published": r.get("published"),
                         "elapsed_s": (t1 - t0) if t0 and t1 else None}
            res["msgs_per_s"] = acked / res["elapsed_s"] if res["elapsed_s"] else None
            if acked:
                cpu = best_cpu_s(c0, c1)
                res.update(cpu_s=cpu, cpu_us_per_msg=cpu / acked * 1e6)
            if acked < self.a.messages:
                res["warning"] = f"only {acked} of {self.a.messages} PUBACKs ({r.get('first_error')})"
            return res
        finally:
            self.stop_proxy(proxy, px)

    def run_wss(self, proxy: str) -> dict:
        """The same --messages QoS 0 64 B messages through the proxy twice, with the same publisher:
        over mqtts (MQTT in TLS) and over wss (MQTT in WebSocket binary frames in TLS); the order
        alternates by round. wss_over_mqtts = CPU per message wss / mqtts of this round."""
        order = ("mqtts", "wss") if self.round % 2 else ("wss", "mqtts")
        sub: dict[str, dict] = {}
        for t in order:
            sub[t] = self.run_msg(proxy, self.a.wss_size, transport=t)
        res: dict = {"order": list(order), "client": self.a.wss_client, "size": self.a.wss_size}
        for t in ("mqtts", "wss"):
            r = sub[t]
            res[t] = r
            # a run that lost messages (a connection cut mid-stream: Mosquitto 2.1.2's WebSocket listener
            # does that under bursts) has no per-message figure: its CPU also paid for what was lost
            complete = r.get("count", 0) >= WSS_MIN_COMPLETE * r.get("expected", 1)
            res[f"cpu_us_per_msg_{t}"] = r.get("cpu_us_per_msg") if complete else None
            res[f"msgs_per_s_{t}"] = r.get("msgs_per_s") if complete else None
        a, b = res["cpu_us_per_msg_wss"], res["cpu_us_per_msg_mqtts"]
        res["wss_over_mqtts"] = a / b if a and b else None
        warn = [f"{t}: {sub[t]['warning']}" for t in order if sub[t].get("warning")]
        if warn:
            res["warning"] = "; ".join(warn)
        return res

    # ---- pool: fastproxy with one broker vs a pool of --pool-size brokers

    def pool_client_ids(self, n_servers: int) -> tuple[list[str], list[int] | None]:
        """--pool-clients ClientIds that the clientid balance spreads as evenly as possible over the
        first n_servers pool brokers, and the broker position each one goes to. Picked with the
        engine's own choice (fastproxy._engine.pick_many) over the keys the proxy uses
        ("127.0.0.1:<port>"); when the engine is not importable here (--fastproxy-cmd elsewhere) the
        ClientIds are just numbered and the positions are None (the run then reports what arrived)."""
        k = self.a.pool_clients
        prefix = self._name("poolpub")
        try:
            if REPO not in sys.path:
                sys.path.insert(0, REPO)
            from fastproxy import _sim as _engine  # noqa: PLC0415
            pick_many = _engine.pick_many
        except (ImportError, AttributeError):
            return [f"{prefix}-{i}" for i in range(k)], None
        keys = [f"127.0.0.1:{p}".encode() for p in self.pool_ports[:n_servers]]
        cap = -(-k // n_servers)  # at most ceil(k / n) clients per broker
        have = [0] * n_servers
        ids: list[str] = []
        where: list[int] = []
        for i in range(100_000):
            cid = f"{prefix}-{i}"
            pos = pick_many([cid.encode()], keys, balance=0)[0]  # 0: clientid
            if 0 <= pos < n_servers and have[pos] < cap:
                have[pos] += 1
                ids.append(cid)
                where.append(pos)
                if len(ids) == k:
                    return ids, where
        raise BenchError("could not find ClientIds spreading over the pool")

    def _await_subscriber(self, port: int, topic: str, counter: TopicCounter) -> None:
        """The counting subscription on the broker at `port` is live once a marker published
        directly to that broker arrives."""
        before = counter.other
        for _ in range(50):
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", f"{topic}/ready", "-m", "r"],
                           timeout=10, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t_end = time.monotonic() + 0.2
            while counter.other == before and time.monotonic() < t_end:
                time.sleep(0.01)
            if counter.other != before:
                return
        raise BenchError(f"counting subscriber on port {port} never received its marker")

    def run_pool(self, variant: str) -> dict:
        """--messages QoS 0 messages of --pool-msg-size bytes from --pool-clients `mosquitto_pub -l`
        (mTLS) through fastproxy, whose upstream is one broker (pool=1) or a pool of --pool-size
        brokers (pool=N; the default balance, clientid, sends each publisher to one of them). A
        `mosquitto_sub` connected directly to each broker counts arrivals; the proxy's CPU is read
        before the publishers start and after the last message arrived."""
        n_srv = int(variant.split("=", 1)[1])
        ports = self.pool_ports[:n_srv]
        k = self.a.pool_clients
        total = self.a.messages
        per = [total // k + (1 if i < total % k else 0) for i in range(k)]
        topic = f"bench/{self._name('pool')}"
        subs: list[subprocess.Popen] = []
        counters: list[TopicCounter] = []
        pubs: list[subprocess.Popen] = []
        px = None
        try:
            for port in ports:
                sub = self.procs.start("mosquitto_sub", ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "0",
                                                         "-t", f"{topic}/#", "-F", "%t", "-i", self._name("count")],
                                       stdout=subprocess.PIPE, log_path=self.path("mosquitto_sub.log"))
                subs.append(sub)
                counters.append(TopicCounter(sub.stdout, f"{topic}/data".encode()))
            for port, counter in zip(ports, counters):
                self._await_subscriber(port, topic, counter)
            ids, where = self.pool_client_ids(n_srv)
            args: list[str] = []
            for port in ports[1:]:
                args += ["--upstream", f"127.0.0.1:{port}"]
            if self.a.pool_health_interval is not None:
                args += ["--health-interval", self.a.pool_health_interval]
            px, pport = self.start_proxy(self.fp_main, ports[0], fastproxy_args=args)
            files = [self.data_file(self.a.pool_msg_size, m) for m in per]
            perf = self.perf_start(f"pool{n_srv}", self.fp_main, px.pid)
            c0 = group_cpu(px.pid)
            t0 = time.monotonic()
            for cid, data in zip(ids, files):
                argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(pport), *self.tls_args(),
                        "-t", f"{topic}/data", "-q", "0", "-l", "-i", cid]
                with open(data, "rb") as stdin:
                    pubs.append(self.procs.start("mosquitto_pub", argv, stdin=stdin,
                                                 log_path=self.path("mosquitto_pub.log")))
            deadline = t0 + self.a.step_timeout
            for pub in pubs:
                try:
                    pub.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            pubs_timed_out = sum(1 for pub in pubs if pub.poll() is None)
            pub_rcs = [self.procs.stop(pub) for pub in pubs]
            pubs = []

            def arrived() -> int:
                return sum(c.count for c in counters)

            # the stragglers: until all arrived, or no progress for 3 s
            last_count, last_change = -1, time.monotonic()
            deadline = time.monotonic() + self.a.step_timeout
            while arrived() < total and time.monotonic() < deadline:
                if arrived() != last_count:
                    last_count, last_change = arrived(), time.monotonic()
                elif time.monotonic() - last_change > 3:
                    break
                time.sleep(0.02)
            time.sleep(0.05)
            c1 = group_cpu(px.pid)
            self.perf_stop(perf)
            count = arrived()
            per_broker = [c.count for c in counters]
            last_t = max(c.last_t for c in counters)
            self.stop_proxy(self.fp_main, px)
            px = None
        finally:
            for pub in pubs:
                self.procs.stop(pub)
            if px is not None:
                self.procs.stop(px)
            for sub in subs:
                self.procs.stop(sub)
        elapsed = (last_t - t0) if count else None
        cpu = best_cpu_s(c0, c1)
        ticks_s, sched_s = cpu_delta_s(c0, c1)
        res: dict = {"servers": n_srv, "clients": k, "expected": total, "count": count, "per_broker": per_broker,
                     "pub_rcs": pub_rcs, "pubs_timed_out": pubs_timed_out, "elapsed_s": elapsed,
                     "msgs_per_s": count / elapsed if elapsed else None,
                     "cpu_s": cpu, "cpu_ticks_s": ticks_s, "cpu_sched_s": sched_s,
                     "cpu_us_per_msg": cpu / count * 1e6 if count else None}
        warn = []
        if where is not None:
            want = [0] * n_srv
            for pos, m in zip(where, per):
                want[pos] += m
            res["expected_per_broker"] = want
            res["clients_per_broker"] = [where.count(i) for i in range(n_srv)]
            if count == total and per_broker != want:
                warn.append(f"messages per broker {per_broker}, the engine's choice predicts {want}")
        if count < total:
            warn.append(f"only {count} of {total} messages arrived (publisher exits {pub_rcs})")
        if warn:
            res["warning"] = "; ".join(warn)
        return res

    def run_bulk(self, proxy: str) -> dict:
        """A python TLS client pushes --bulk-mb MiB (MQTT CONNECT + QoS 0 PUBLISHes) through the proxy
        to a plain TCP sink that counts bytes."""
        assert self.sink_lines is not None
        while not self.sink_lines.q.empty():  # stale lines from an earlier failed run
            self.sink_lines.q.get_nowait()
        px, port = self.start_proxy(proxy, self.sink_port)
        perf = None
        try:
            perf = self.perf_start("bulk", proxy, px.pid)
            c0 = group_cpu(px.pid)
            r = subprocess.run([PY, LOADGEN, "bulk", "--port", str(port), "--mb", str(self.a.bulk_mb),
                                "--max-seconds", str(self.a.step_timeout), *self.loadgen_tls()],
                               capture_output=True, timeout=self.a.step_timeout + 30, start_new_session=True)
            if r.returncode != 0:
                raise BenchError(f"bulk client failed ({r.returncode}): {r.stderr.decode()[-500:]}")
            client = json.loads(r.stdout.decode().strip().splitlines()[-1])
            sink = self.sink_lines.get_json(30)
            time.sleep(0.05)
            c1 = group_cpu(px.pid)
            self.perf_stop(perf)
            perf = None
            self.stop_proxy(proxy, px)
            px = None
        finally:
            self.perf_stop(perf)
            if px is not None:
                self.procs.stop(px)
        n = sink["bytes"]
        cpu = best_cpu_s(c0, c1)
        ticks_s, sched_s = cpu_delta_s(c0, c1)
        secs = (sink["t_last_ns"] - client["t_start_ns"]) / 1e9 if n else None
        res = {"bytes_sent": client["bytes"], "bytes_received": n, "cipher": client.get("cipher"),
               "tls_version": client.get("version"), "elapsed_s": secs,
               "mb_per_s": n / 1e6 / secs if secs else None,
               "cpu_s": cpu, "cpu_ticks_s": ticks_s, "cpu_sched_s": sched_s,
               "cpu_s_per_gb": cpu / (n / 1e9) if n else None}
        if n != client["bytes"]:
            res["warning"] = f"sink received {n} of {client['bytes']} bytes ({sink.get('error')})"
        return res

    def run_idle(self, proxy: str) -> dict:
        """Hold --idle-conns mTLS sessions (TLS + MQTT CONNECT/CONNACK via the proxy) and measure RSS."""
        px, port = self.start_proxy(proxy, self.broker_port)
        holders: list[tuple[subprocess.Popen, LineQueue]] = []
        try:
            # one warm-up session so that lazily initialised state is in the baseline
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *self.tls_args(),
                            "-t", "bench/warmup", "-m", "w", "-i", self._name("warm")],
                           timeout=15, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            rss0 = group_rss_kib(px.pid)
            c0 = group_cpu(px.pid)
            k = max(1, self.a.idle_procs)
            per = [self.a.idle_conns // k + (1 if i < self.a.idle_conns % k else 0) for i in range(k)]
            t0 = time.monotonic()
            for i, n in enumerate(per):
                h = self.procs.start("idle", [PY, LOADGEN, "idle", "--port", str(port), "--conns", str(n),
                                              "--concurrency", str(self.a.idle_concurrency),
                                              "--open-seconds", str(self.a.step_timeout),
                                              "--max-seconds", str(self.a.step_timeout), *self.loadgen_tls()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, log_path=self.path("idle.log"))
                holders.append((h, LineQueue(h.stdout)))
            ready = [lq.get_json(self.a.step_timeout + 30) for _, lq in holders]
            t_open = time.monotonic() - t0
            ok = sum(r["ok"] for r in ready)
            failed = sum(r["failed"] for r in ready)
            c1 = group_cpu(px.pid)
            time.sleep(1.0)  # settle
            samples = []
            for _ in range(3):
                samples.append(group_rss_kib(px.pid))
                time.sleep(0.3)
            rss1 = max(samples)
            for h, _ in holders:
                try:
                    h.stdin.close()
                except OSError:
                    pass
            ends = []
            for h, lq in holders:
                try:
                    ends.append(lq.get_json(60))
                except BenchError as e:
                    ends.append({"error": str(e)})
            closed_while_idle = sum(e.get("closed_while_idle", 0) for e in ends)
            for h, _ in holders:
                self.procs.stop(h, timeout=10)
            holders = []
            time.sleep(0.5)
            rss_after_close = group_rss_kib(px.pid)
            self.stop_proxy(proxy, px)
            px = None
        finally:
            for h, _ in holders:
                self.procs.stop(h)
            if px is not None:
                self.procs.stop(px)
        reasons: dict[str, int] = {}
        for r in ready:
            for why, cnt in r.get("reasons", {}).items():
                reasons[why] = reasons.get(why, 0) + cnt
        res = {"conns_ok": ok, "conns_failed": failed, "open_s": t_open, "rss_before_kib": rss0,
               "rss_idle_kib": rss1, "rss_after_close_kib": rss_after_close,
               "kib_per_conn": (rss1 - rss0) / ok if ok else None,
               "handshake_cpu_ms": best_cpu_s(c0, c1) / ok * 1e3 if ok else None,
               "closed_while_idle": closed_while_idle}
        if failed or closed_while_idle:
            res["warning"] = f"{failed} connections failed ({reasons}), {closed_while_idle} closed while idle"
        return res

    def run_silent(self, proxy: str) -> dict:
        """The pre-authentication memory cost: --silent-conns plain TCP sockets to the TLS port that
        never send a byte. RSS per silent socket while they are held, RSS above the baseline after they
        are closed (sampled for up to SILENT_TRIM_WAIT_S, last value), and whether a real device
        (mosquitto_pub -q 1, mTLS) is served while they are held."""
        px, port = self.start_proxy(proxy, self.broker_port, handshake_timeout=SILENT_HS_TIMEOUT_S)
        holder: tuple[subprocess.Popen, LineQueue] | None = None
        n = self.a.silent_conns
        try:
            # one warm-up mTLS session so that lazily initialised state is in the baseline (as in idle)
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *self.tls_args(),
                            "-t", "bench/warmup", "-m", "w", "-i", self._name("warm")],
                           timeout=15, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            fd0 = group_fd_count(px.pid)
            rss0 = group_rss_kib(px.pid)
            t0 = time.monotonic()
            h = self.procs.start("silent", [PY, LOADGEN, "silent", "--port", str(port), "--conns", str(n),
                                            "--open-seconds", str(self.a.step_timeout),
                                            "--max-seconds", str(self.a.step_timeout + SILENT_HS_TIMEOUT_S)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, log_path=self.path("silent.log"))
            holder = (h, LineQueue(h.stdout))
            ready = holder[1].get_json(self.a.step_timeout + 30)
            t_open = time.monotonic() - t0
            ok = ready["ok"]
            # accepted by the proxy: its descriptors (all processes of the group) grew by one per socket;
            # wait until they all are, or no progress for 3 s
            last, last_change = -1, time.monotonic()
            deadline = time.monotonic() + self.a.step_timeout
            while True:
                accepted = group_fd_count(px.pid) - fd0
                if accepted >= ok or time.monotonic() > deadline:
                    break
                if accepted != last:
                    last, last_change = accepted, time.monotonic()
                elif time.monotonic() - last_change > 3:
                    break
                time.sleep(0.1)
            t_accepted = time.monotonic() - t0
            time.sleep(1.0)  # settle
            samples = []
            for _ in range(3):
                samples.append(group_rss_kib(px.pid))
                time.sleep(0.3)
            rss1 = max(samples)
            accepted = group_fd_count(px.pid) - fd0
            # a real device while they are held: mTLS, CONNECT, PUBLISH QoS 1 (PUBACK from the broker)
            td = time.monotonic()
            try:
                r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *self.tls_args(),
                                    "-t", "bench/silent", "-m", "d", "-q", "1", "-i", self._name("device")],
                                   timeout=15, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                device_ok = r.returncode == 0
                device_err = r.stderr.decode(errors="replace").strip()[-200:] if not device_ok else ""
            except subprocess.TimeoutExpired:
                device_ok, device_err = False, "mosquitto_pub timed out (15 s)"
            device_s = time.monotonic() - td
            time.sleep(0.2)
            rss_device = group_rss_kib(px.pid)  # the device's session has come and gone
            # close them all (the holder closes its sockets when its stdin closes)
            try:
                h.stdin.close()
            except OSError:
                pass
            try:
                end = holder[1].get_json(60)
            except BenchError as e:
                end = {"error": str(e)}
            self.procs.stop(h, timeout=10)
            holder = None
            t_close = time.monotonic()
            # memory given back: sample for up to SILENT_TRIM_WAIT_S; stop early once >= 95 % of the
            # growth is back (or RSS is at / below the baseline); the figure is the last sample
            grown = max(0, rss1 - rss0)
            series: list[tuple[float, int]] = []
            while True:
                time.sleep(0.5)
                v = group_rss_kib(px.pid)
                dt = time.monotonic() - t_close
                series.append((round(dt, 2), v - rss0))
                if v - rss0 <= 0.05 * grown or dt >= SILENT_TRIM_WAIT_S:
                    break
            fds_after = group_fd_count(px.pid) - fd0
            self.stop_proxy(proxy, px)
            px = None
        finally:
            if holder is not None:
                self.procs.stop(holder[0])
            if px is not None:
                self.procs.stop(px)
        after = series[-1][1]
        res: dict = {"conns": n, "conns_ok": ok, "conns_failed": ready["failed"], "accepted": accepted,
                     "open_s": round(t_open, 3), "accepted_s": round(t_accepted, 3),
                     "rss_before_kib": rss0, "rss_held_kib": rss1,
                     "kib_per_silent_conn": (rss1 - rss0) / ok if ok else None,
                     "rss_after_close_kib": after, "rss_after_close_abs_kib": rss0 + after,
                     "rss_after_close_s": series[-1][0], "rss_after_close_series": series,
                     "fds_after_close": fds_after,
                     "closed_while_held": end.get("closed_while_held"),
                     "first_close_after_s": end.get("first_close_after_s"),
                     "device_ok": device_ok, "device_s": round(device_s, 3),
                     "rss_after_device_kib": rss_device,
                     "handshake_timeout_s": SILENT_HS_TIMEOUT_S}
        if device_err:
            res["device_error"] = device_err
        warn = []
        if ready["failed"]:
            warn.append(f"{ready['failed']} sockets failed to connect ({ready['reasons']})")
        if accepted < ok:
            warn.append(f"the proxy holds {accepted} descriptors more than before for {ok} sockets")
        if end.get("closed_while_held"):
            warn.append(f"{end['closed_while_held']} sockets closed by the proxy while held "
                        f"(first after {end.get('first_close_after_s')} s)")
        if "error" in end:
            warn.append(f"silent holder: {end['error']}")
        if warn:
            res["warning"] = "; ".join(warn)
        return res

    def run_latency(self, proxy: str) -> dict:
        """1000 msg/s QoS 0, publisher and subscriber both through the proxy (or both direct)."""
        px = None
        try:
            if proxy == "direct":
                target = ["--port", str(self.broker_port)]
            else:
                px, port = self.start_proxy(proxy, self.broker_port)
                target = ["--port", str(port), *self.loadgen_tls()]
            r = subprocess.run([PY, LOADGEN, "latency", *target, "--rate", str(self.a.latency_rate),
                                "--seconds", str(self.a.latency_seconds)],
                               capture_output=True, timeout=self.a.latency_seconds + 60, start_new_session=True)
            lines = r.stdout.decode().strip().splitlines()
            res = json.loads(lines[-1]) if lines else {"error": f"no output: {r.stderr.decode()[-500:]}"}
            if "error" in res:
                raise BenchError(f"latency client: {res['error']}")
            if res.get("lost"):
                res["warning"] = f"{res['lost']} of {res['n']} messages lost"
            if px is not None:
                self.stop_proxy(proxy, px)
                px = None
            return res
        finally:
            if px is not None:
                self.procs.stop(px)

    # ---- connect / connect-pp

    def start_fake_broker(self) -> None:
        p = self.procs.start("fakebroker", [PY, LOADGEN, "broker", "--port", "0",
                                            "--max-seconds", str(self.a.time_budget + 600)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, log_path=self.path("fakebroker.log"))
        self.fake_lines = LineQueue(p.stdout)
        self.fake_port = int(self.fake_lines.get_json(15)["listening"])
        self.fake = p
        log(f"fake broker (PROXY header aware) on 127.0.0.1:{self.fake_port} (pid {p.pid})")

    def fake_stats(self) -> dict:
        while not self.fake_lines.q.empty():
            self.fake_lines.q.get_nowait()
        self.fake.stdin.write(b"s\n")
        self.fake.stdin.flush()
        return self.fake_lines.get_json(10)

    def connect_clients(self, port: int, conns: int, procs: int, client_id: str = "bench") -> dict:
        """`procs` loadgen.py connect processes sharing `conns` connections; bounded; summed results."""
        k = max(1, min(procs, conns))
        per = [conns // k + (1 if i < conns % k else 0) for i in range(k)]
        started: list[tuple[subprocess.Popen, LineQueue]] = []
        try:
            for n in per:
                h = self.procs.start("connect", [PY, LOADGEN, "connect", "--port", str(port), "--conns", str(n),
                                                 "--client-id", client_id, "--max-seconds", str(self.a.step_timeout),
                                                 *self.loadgen_tls()],
                                     stdout=subprocess.PIPE, log_path=self.path("connect.log"))
                started.append((h, LineQueue(h.stdout)))
            outs = [lq.get_json(self.a.step_timeout + 30) for _, lq in started]
            for h, _ in started:  # they exit by themselves after their result line
                try:
                    h.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for h, _ in started:
                self.procs.stop(h, timeout=10)
        tot: dict = {"attempted": 0, "ok": 0, "refused": 0, "errors": 0, "reasons": {}}
        for o in outs:
            for key in ("attempted", "ok", "refused", "errors"):
                tot[key] += o[key]
            for why, cnt in o["reasons"].items():
                tot["reasons"][why] = tot["reasons"].get(why, 0) + cnt
        tot["t_start_ns"] = min(o["t_start_ns"] for o in outs)
        tot["t_end_ns"] = max(o["t_end_ns"] for o in outs)
        return tot

    def run_connect(self, proxy: str, pp_variant: str | None = None) -> dict:
        """--connect-conns x (fresh TCP + full TLS 1.3 mTLS handshake + CONNECT ClientId=bench (= CN) +
        CONNACK + DISCONNECT + close) from --connect-procs client processes; proxy CPU per connection.

        `connect`: fastproxy --require-clientid-cn / HAProxy mqtt_field_value vs ssl_c_s_dn(cn) / nginx
        plain mTLS, upstream Mosquitto. `connect-pp` (pp_variant set): fastproxy without / with
        --proxy-protocol v2-ssl-cn, upstream the fake broker (which skips the header); the variant's name
        starts with the fastproxy build it runs ("fastproxy+v2-ssl-cn", "fastproxy-awslc")."""
        pp = pp_variant is not None and pp_variant.endswith("v2-ssl-cn")
        name = pp_variant.split("+", 1)[0] if pp_variant is not None else proxy
        upstream = self.fake_port if pp_variant is not None else self.broker_port
        px, port = self.start_proxy(name, upstream, check_clientid=True,
                                    proxy_protocol="v2-ssl-cn" if pp else None)
        try:
            # functional checks (also the warm-up): the right ClientId passes, a wrong one is refused
            good = self.connect_clients(port, 1, 1, "bench")
            bad = self.connect_clients(port, 1, 1, "not-bench")
            f0 = self.fake_stats() if pp_variant is not None else None
            time.sleep(0.1)
            live = lambda: [q.pid for _, q in self.procs._procs if q.poll() is None]  # noqa: E731
            bg0 = system_busy_s() - own_cpu_s(live())
            c0 = group_cpu(px.pid)
            r = self.connect_clients(port, self.a.connect_conns, self.a.connect_procs)
            time.sleep(0.2)  # let the proxy finish the last closes
            c1 = group_cpu(px.pid)
            bg1 = system_busy_s() - own_cpu_s(live())
            f1 = self.fake_stats() if pp_variant is not None else None
            self.stop_proxy(name, px)
            px = None
        finally:
            if px is not None:
                self.procs.stop(px)
        cpu = best_cpu_s(c0, c1)
        ticks_s, sched_s = cpu_delta_s(c0, c1)
        secs = (r["t_end_ns"] - r["t_start_ns"]) / 1e9
        accepted = r["ok"] + r["refused"]  # connections that completed the TCP accept + got an answer
        res = {"attempted": r["attempted"], "ok": r["ok"], "refused": r["refused"], "errors": r["errors"],
               "reasons": r["reasons"], "elapsed_s": secs, "conns_per_s": r["ok"] / secs if secs > 0 else None,
               "cpu_s": cpu, "cpu_ticks_s": ticks_s, "cpu_sched_s": sched_s,
               "cpu_ms_per_conn": cpu / accepted * 1e3 if accepted else None,
               "other_cpu_s": bg1 - bg0,  # CPU used outside our processes during the batch (see own_cpu_s)
               "other_cpu_frac": (bg1 - bg0) / (secs + 0.2) / (os.cpu_count() or 1) if secs > 0 else None,
               "good_clientid_ok": good["ok"] == 1, "bad_clientid_refused": bad["ok"] == 0,
               "bad_clientid_result": bad["reasons"] or "CONNACK 0x00 (let through)"}
        warn = []
        if r["ok"] != self.a.connect_conns:
            warn.append(f"{r['ok']} of {self.a.connect_conns} connections got CONNACK 0x00 ({r['reasons']})")
        if not res["good_clientid_ok"]:
            warn.append(f"the right ClientId was not let through ({good['reasons']})")
        checks = name != "nginx"
        if checks and not res["bad_clientid_refused"]:
            warn.append("a wrong ClientId was let through")
        if f0 is not None and f1 is not None:
            d = {k: f1[k] - f0[k] for k in ("accepted", "pp_v2", "pp_v1", "connacks", "disconnects")}
            res["fake_broker"] = d
            res["pp_v2_header_bytes"] = ((f1["pp_v2_bytes"] - f0["pp_v2_bytes"]) / d["pp_v2"]) if d["pp_v2"] else 0
            want = r["ok"] if pp else 0
            if d["pp_v2"] != want:
                warn.append(f"fake broker saw {d['pp_v2']} PROXY v2 headers, expected {want}")
        if res["other_cpu_frac"] is not None and res["other_cpu_frac"] > self.a.max_background:
            warn.append(f"{res['other_cpu_frac']:.0%} of the CPUs were busy outside the benchmark during the batch")
        if warn:
            res["warning"] = "; ".join(warn)
        return res


# --------------------------------------------------------------------------- orchestration


def available(name: str, a: argparse.Namespace) -> str | None:
    """None when the proxy can run here, else the reason."""
    if name == "haproxy":
        return None if shutil.which("haproxy") else "haproxy not installed"
    if name == "nginx":
        if not shutil.which("nginx"):
            return "nginx not installed"
        global NGINX_LOAD_STREAM
        if os.path.exists(NGINX_STREAM_MODULE):
            NGINX_LOAD_STREAM = f"load_module {NGINX_STREAM_MODULE};\n"
            return None
        r = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=20)
        if "--with-stream " in (r.stdout + r.stderr + " ") and "--with-stream_ssl_module" in r.stdout + r.stderr:
            NGINX_LOAD_STREAM = ""  # built in statically
            return None
        return f"{NGINX_STREAM_MODULE} missing (apt install libnginx-mod-stream)"
    if name in FASTPROXIES:
        if name in a.fp_error:
            return a.fp_error[name]
        if a.fp_custom[name]:
            return None
        path = a.fp_path[name]
        env = dict(os.environ, PYTHONPATH=path)
        r = subprocess.run([PY, "-c", "import fastproxy._engine"], env=env, cwd=path,
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"engine not importable ({err})"
        return None
    return f"unknown proxy {name}"


def _modules_mtime(path: str | None) -> dict:
    pkg = os.path.join(path, "fastproxy") if path else ""
    mods = {}
    if pkg and os.path.isdir(pkg):
        for f in sorted(os.listdir(pkg)):
            if f.endswith(".so"):
                mods[f.split(".")[0]] = time.strftime("%Y-%m-%dT%H:%M:%S",
                                                      time.localtime(os.path.getmtime(os.path.join(pkg, f))))
    return mods


def _fastproxy_build(name: str, a: argparse.Namespace) -> dict:
    """`fastproxy version` (its 4th line names the TLS library: `tls`) and the compiled modules' mtimes
    (the in-place build may change under a run)."""
    cmd, path = a.fp_cmd[name], a.fp_path[name]
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # the working directory of the proxies themselves (start_proxy: the temp dir), not the checkout, where
    # `python -m fastproxy` of another command would find the checkout's package first (sys.path[0] = cwd)
    cwd = path if path and not a.fp_custom[name] else a.fp_scratch
    try:
        r = subprocess.run(cmd + ["version"], capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
        version = r.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as e:
        version = [f"unavailable ({e})"]
    info = {"command": shlex.join(cmd), "pythonpath": path, "version": version,
            "tls": version[3] if len(version) > 3 else None,
            "modules_mtime": _modules_mtime(path) if not a.fp_custom[name] else {}}
    info.update(a.fp_info.get(name, {}))
    return info


# ---- fastproxy-awslc: the current sources built against AWS-LC, in a cache directory


def _cache_root() -> str:
    return os.environ.get("FASTPROXY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastproxy")


def _tree_files() -> list[str]:
    """The checkout's files as scripts/test-build copies them: tracked and untracked-not-ignored, no .so."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                       timeout=60)
    if r.returncode != 0:
        raise BenchError(f"git ls-files failed in {REPO}: {r.stderr.decode(errors='replace').strip()[-300:]}")
    return sorted(f for f in r.stdout.decode().split("\0")
                  if f and not f.endswith(".so") and os.path.isfile(os.path.join(REPO, f)))


def _build_key(files: Sequence[str], prefix: str) -> str:
    """What the compiled modules depend on: the contents of ext/, setup.py, pyproject.toml and
    scripts/build-awslc as they are in the working tree (edits not yet committed included), the
    AWS-LC prefix and the interpreter."""
    h = hashlib.sha256(f"{sys.version}\0{PY}\0{prefix}\0".encode())
    for f in files:
        if f.startswith("ext/") or f in ("setup.py", "pyproject.toml", "scripts/build-awslc"):
            with open(os.path.join(REPO, f), "rb") as fh:
                h.update(f.encode() + b"\0" + hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]


def awslc_build() -> tuple[str, dict]:
    """The directory of an AWS-LC build (FASTPROXY_TLS=awslc, build_ext --inplace) of the current sources,
    under $FASTPROXY_CACHE/e2e-awslc/<key>; built now (a copy of the tree, as scripts/test-build makes)
    when there is none for these sources. Never touches the checkout's own build."""
    try:
        r = subprocess.run([os.path.join(REPO, "scripts", "build-awslc")], capture_output=True, text=True,
                           timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"scripts/build-awslc failed: {e}") from None
    if r.returncode != 0 or not r.stdout.strip():
        raise BenchError(f"scripts/build-awslc failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    prefix = r.stdout.strip().splitlines()[-1]
    files = _tree_files()
    key = _build_key(files, prefix)
    root = os.path.join(_cache_root(), "e2e-awslc")
    final = os.path.join(root, key)
    info: dict = {"awslc_prefix": prefix, "build_dir": final, "sources_key": key}
    if os.path.isdir(final):
        log(f"fastproxy-awslc: cached build of these sources: {final}")
        os.utime(final)  # most recently used (see the pruning below)
        info["built_now"] = False
        return final, info
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".build-{key}-", dir=root)
    os.chmod(work, 0o755)
    blog = os.path.join(work, "build.log")
    log(f"fastproxy-awslc: building the current sources against AWS-LC ({prefix}) in {work} ...")
    t0 = time.monotonic()
    try:
        for f in files:
            dst = os.path.join(work, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), dst)
        env = dict(os.environ, FASTPROXY_TLS="awslc", FASTPROXY_AWSLC=prefix)
        env.pop("PYTHONPATH", None)
        with open(blog, "w") as lf:
            rb = subprocess.run([PY, "setup.py", "-q", "build_ext", "--inplace", "-j2"], cwd=work, env=env,
                               stdout=lf, stderr=subprocess.STDOUT, timeout=3600)
        if rb.returncode != 0:
            failed = os.path.join(root, "last-failed-build.log")
            shutil.copy2(blog, failed)
            raise BenchError(f"the AWS-LC build failed ({rb.returncode}; {failed}): {file_tail(blog, 400)}")
        v = subprocess.run([PY, "-m", "fastproxy", "version"], cwd=work, env=dict(env, PYTHONPATH=work),
                           capture_output=True, text=True, timeout=60).stdout.splitlines()
        if len(v) < 4 or "AWS-LC" not in v[3]:
            raise BenchError(f"the AWS-LC build does not run on AWS-LC: `fastproxy version` says {v}")
        shutil.rmtree(os.path.join(work, "build"), ignore_errors=True)  # the object files
        try:
            os.rename(work, final)
        except OSError:  # another run built the same sources meanwhile: use that one
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"fastproxy-awslc: built in {time.monotonic() - t0:.0f}s: {final}")
    info["built_now"] = True
    info["build_s"] = round(time.monotonic() - t0, 1)
    # keep the most recently used builds only
    olds = sorted((d for d in os.listdir(root) if len(d) == 16 and os.path.isdir(os.path.join(root, d))),
                  key=lambda d: os.path.getmtime(os.path.join(root, d)), reverse=True)
    for d in olds[AWSLC_BUILDS_KEPT:]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final, info


def awslc_run_tree(build: str, dest: str) -> str:
    """A fastproxy package to run: the checkout's current Python files with the compiled modules of the
    AWS-LC build (libfastproxy-awslc.so beside them; the modules find it through an rpath of $ORIGIN).
    The Python side is the same as the in-place column's; only the compiled side differs."""
    for f in _tree_files():
        if f.startswith("fastproxy/"):
            dst = os.path.join(dest, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), dst)
    pkg = os.path.join(build, "fastproxy")
    sos = [f for f in os.listdir(pkg) if f.endswith(".so")]
    if not any(f.startswith("_engine.") for f in sos):
        raise BenchError(f"no compiled engine in {pkg}")
    for f in sos:
        shutil.copy2(os.path.join(pkg, f), os.path.join(dest, "fastproxy", f))
    return dest


def prepare_fastproxies(a: argparse.Namespace, scratch: str) -> None:
    """a.fp_cmd / fp_path / fp_custom / fp_error / fp_info for each fastproxy build in --only."""
    a.fp_cmd, a.fp_path, a.fp_custom, a.fp_error, a.fp_info = {}, {}, {}, {}, {}
    a.fp_scratch = scratch
    if "fastproxy" in a.only:
        a.fp_custom["fastproxy"] = bool(a.fastproxy_cmd)
        a.fp_cmd["fastproxy"] = shlex.split(a.fastproxy_cmd) if a.fastproxy_cmd else [PY, "-m", "fastproxy"]
        a.fp_path["fastproxy"] = REPO  # (also with --fastproxy-cmd, as always)
    if "fastproxy-awslc" in a.only:
        name = "fastproxy-awslc"
        a.fp_custom[name] = bool(a.fastproxy_awslc_cmd)
        a.fp_cmd[name] = shlex.split(a.fastproxy_awslc_cmd) if a.fastproxy_awslc_cmd else [PY, "-m", "fastproxy"]
        a.fp_path[name] = None
        if not a.fastproxy_awslc_cmd:
            try:
                build, info = awslc_build()
                a.fp_path[name] = awslc_run_tree(build, os.path.join(scratch, "fastproxy-awslc"))
                a.fp_info[name] = info
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                a.fp_error[name] = f"no AWS-LC build: {e}"


def run(a: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    proxies = []
    skipped = {}
    for name in a.only:
        why = available(name, a)
        if why:
            skipped[name] = why
            log(f"skipping {name}: {why}")
        else:
            proxies.append(name)
    if not proxies:
        raise BenchError("no proxy to benchmark")
    b = Bench(a)
    fp_main = next((p for p in FASTPROXIES if p in proxies), None)
    if fp_main is not None:
        b.fp_main = fp_main
        b.pp_variants = (fp_main, f"{fp_main}+v2-ssl-cn")
    results: list[dict] = []
    try:
        if set(a.scenarios) & {"msg64", "msg1k", "qos1", "idle", "silent", "latency", "connect", "wss"}:
            b.start_broker()
        if "wss" in a.scenarios and set(proxies) & set(PEERS):
            b.start_ws_broker()
        if "bulk" in a.scenarios:
            b.start_sink()
        if "connect-pp" in a.scenarios:
            if fp_main is not None:
                b.start_fake_broker()
            else:
                b.notes.append("connect-pp skipped: it measures fastproxy only")
        if "pool" in a.scenarios:
            if fp_main is not None:
                b.start_pool_brokers()
            else:
                b.notes.append("pool skipped: it measures fastproxy only")
        runners: dict[str, Callable[[str], dict]] = {
            "msg64": lambda p: b.run_msg(p, 64),
            "msg1k": lambda p: b.run_msg(p, 1024),
            "qos1": b.run_qos1,
            "bulk": b.run_bulk,
            "idle": b.run_idle,
            "silent": b.run_silent,
            "latency": b.run_latency,
            "connect": b.run_connect,
            "connect-pp": lambda v: b.run_connect(b.fp_main, pp_variant=v),
            "pool": b.run_pool,
            "wss": b.run_wss,
        }
        for rnd in range(1, a.rounds + 1):
            if time.monotonic() - t_start > a.time_budget:
                b.notes.append(f"time budget of {a.time_budget}s reached: stopped before round {rnd}")
                log(b.notes[-1])
                break
            busy = cpu_busy_fraction(1.0)
            b.background.append({"round": rnd, "busy": round(busy, 3)})
            if busy > a.max_background:
                b.notes.append(f"machine not idle before round {rnd}: {busy:.0%} of the CPUs busy with other work;"
                               " figures of this round are less reliable")
                log(b.notes[-1])
            k = (rnd - 1) % len(proxies)
            order = proxies[k:] + proxies[:k]  # rotate so that no proxy always runs first
            b.round = rnd
            log(f"round {rnd}/{a.rounds}: order {', '.join(order)}")
            for sc in a.scenarios:
                extra = ["direct"] if sc in ("latency",) or (sc.startswith("msg") and a.direct) else []
                sc_order = order
                if sc == "connect-pp":
                    if fp_main is None:
                        continue
                    ppv = b.pp_variants
                    j = (rnd - 1) % len(ppv)
                    sc_order = list(ppv[j:] + ppv[:j])
                if sc == "pool":
                    if fp_main is None:
                        continue
                    pv = pool_variants(a.pool_size)
                    j = (rnd - 1) % len(pv)
                    sc_order = list(pv[j:] + pv[:j])
                for p in extra + sc_order:
                    t0 = time.monotonic()
                    try:
                        res = runners[sc](p)
                    except Exception as e:  # one failed measurement must not end the run  # noqa: BLE001
                        res = {"error": f"{type(e).__name__}: {e}"}
                    res["wall_s"] = round(time.monotonic() - t0, 3)
                    results.append({"round": rnd, "scenario": sc, "proxy": p, **res})
                    log(f"  {sc:8} {p:15} {_brief(sc, res)}")
    finally:
        stop_and_clean(b.procs, b.tmp, a.keep_tmp)
    return {"proxies": proxies, "skipped": skipped, "results": results, "notes": b.notes,
            "background_busy": b.background,
            "pool_variants": list(pool_variants(a.pool_size)) if "pool" in a.scenarios else [],
            "pool_build": fp_main if "pool" in a.scenarios else None,
            "pp_variants": list(b.pp_variants) if "connect-pp" in a.scenarios else [],
            "silent_conns": a.silent_conns if "silent" in a.scenarios else None,
            "wss_client": a.wss_client if "wss" in a.scenarios else None,
            "wss_size": a.wss_size if "wss" in a.scenarios else None,
            "wall_s": round(time.monotonic() - t_start, 1)}


def _brief(sc: str, r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    if sc.startswith("msg") or sc == "qos1":
        s = f"{r.get('count')}/{r.get('expected')} msgs, {r.get('msgs_per_s') or 0:,.0f} msg/s"
        if "cpu_us_per_msg" in r:
            s += f", {r['cpu_us_per_msg']:.3f} µs/msg (cpu {r['cpu_s']:.3f}s)"
    elif sc == "bulk":
        s = f"{r['bytes_received'] / 1e6:.0f} MB, {r.get('mb_per_s') or 0:,.0f} MB/s, {r['cpu_s_per_gb']:.3f} s/GB"
    elif sc == "idle":
        s = (f"{r['conns_ok']} conns in {r['open_s']:.1f}s, rss {r['rss_before_kib']} -> {r['rss_idle_kib']} KiB, "
             f"{(r['kib_per_conn'] or 0):.1f} KiB/conn, {(r['handshake_cpu_ms'] or 0):.3f} ms/handshake")
    elif sc == "silent":
        s = (f"{r['conns_ok']} silent sockets ({r['accepted']} accepted) in {r['accepted_s']:.1f}s, "
             f"rss {r['rss_before_kib']} -> {r['rss_held_kib']} KiB, {(r['kib_per_silent_conn'] or 0):.2f} KiB/conn; "
             f"after close {r['rss_after_close_kib']:+} KiB at {r['rss_after_close_s']:.1f}s; "
             f"device {'ok' if r['device_ok'] else 'FAILED'}")
    elif sc == "wss":
        parts = []
        for t in r.get("order", ()):
            x = r.get(t, {})
            parts.append(f"{t} {x.get('count')}/{x.get('expected')} msgs {x.get('msgs_per_s') or 0:,.0f} msg/s "
                         f"{(x.get('cpu_us_per_msg') or 0):.3f} µs/msg")
        s = "; ".join(parts) + (f"; wss/mqtts {r['wss_over_mqtts']:.2f}" if r.get("wss_over_mqtts") else "")
    elif sc == "pool":
        s = (f"{r.get('count')}/{r.get('expected')} msgs from {r['clients']} clients, per broker {r['per_broker']}, "
             f"{r.get('msgs_per_s') or 0:,.0f} msg/s, {(r['cpu_us_per_msg'] or 0):.3f} µs/msg (cpu {r['cpu_s']:.3f}s)")
    elif sc.startswith("connect"):
        s = (f"{r['ok']}/{r['attempted']} CONNACK ok, {r['conns_per_s'] or 0:,.0f} conn/s, "
             f"{(r['cpu_ms_per_conn'] or 0):.3f} ms CPU/conn (cpu {r['cpu_s']:.2f}s); wrong ClientId: "
             f"{'refused' if r['bad_clientid_refused'] else 'let through'}; other CPU {r['other_cpu_frac'] or 0:.0%}")
        if "fake_broker" in r:
            s += f"; PROXY v2 headers {r['fake_broker']['pp_v2']} ({r['pp_v2_header_bytes']:.0f} B)"
    else:
        s = f"p50 {r.get('p50_us', 0):.0f} µs, p99 {r.get('p99_us', 0):.0f} µs, lost {r.get('lost')}"
    if r.get("warning"):
        s += f"  WARNING: {r['warning']}"
    return s + f"  [{r['wall_s']:.1f}s]"


def summarize(out: dict) -> dict:
    """Medians per (scenario, metric, proxy); added latency is per round (proxy - direct), then median."""
    res = out["results"]
    by: dict[tuple[str, str], list[dict]] = {}
    for r in res:
        if "error" not in r:
            by.setdefault((r["scenario"], r["proxy"]), []).append(r)
    # added latency: per round (proxy - direct of that round) in the raw results; the summary
    # uses median(proxy) - median(direct), which is less sensitive to one noisy direct run
    direct_rows = by.get(("latency", "direct"), [])
    direct_lat = {r["round"]: r for r in direct_rows}
    direct_med = {k: median(r[k] for r in direct_rows if k in r) for k in ("p50_us", "p99_us")}
    for (sc, p), rows in by.items():
        if sc == "latency" and p != "direct":
            for r in rows:
                d = direct_lat.get(r["round"])
                if d and "p50_us" in r and "p50_us" in d:
                    r["added_p50_us_vs_same_round"] = r["p50_us"] - d["p50_us"]
                    r["added_p99_us_vs_same_round"] = r["p99_us"] - d["p99_us"]
    summary: dict = {}
    for m in METRICS:
        vals = {}
        spread = {}
        for p in out["proxies"] + ["direct"]:
            if m.key.startswith("added_"):
                base_key = m.key[len("added_"):]
                xs = [r[base_key] for r in by.get((m.scenario, p), []) if r.get(base_key) is not None]
                if p == "direct" or not xs or direct_med.get(base_key) is None:
                    continue
                vals[p] = median(xs) - direct_med[base_key]
                spread[p] = {"n": len(xs), "min": min(xs) - direct_med[base_key],
                             "max": max(xs) - direct_med[base_key]}
                continue
            xs = [r[m.key] for r in by.get((m.scenario, p), []) if r.get(m.key) is not None]
            if xs:
                med = median(xs)
                vals[p] = med
                spread[p] = {"n": len(xs), "min": min(xs), "max": max(xs)}
        peers = {p: v for p, v in vals.items() if p in PEERS}
        best_name = None
        if m.ratio_to:
            best_name = m.ratio_to if m.ratio_to in peers else None
        elif peers:
            best_name = (min if m.lower_is_better else max)(peers, key=peers.get)
        ratios = {}
        # a ratio only means something when both are positive (added latency can be <= 0 in noise)
        if best_name is not None and peers[best_name] > 0 and not m.no_ratio:
            for p, v in vals.items():
                if p != "direct" and v > 0:
                    ratios[p] = v / peers[best_name]
        # the target, for each fastproxy build (against the peers only, never against the other build)
        verdicts: dict[str, bool] = {}
        if m.target:
            kind, k = m.target
            for fp in FASTPROXIES:
                if fp not in vals:
                    continue
                if kind == "abs":
                    verdicts[fp] = vals[fp] <= k
                elif best_name is not None:
                    verdicts[fp] = vals[fp] <= k * peers[best_name]
        summary[f"{m.scenario}.{m.key}"] = {
            "label": m.label, "unit": m.unit, "lower_is_better": m.lower_is_better, "median": vals,
            "spread": spread, "best_peer": best_name, "ratio_to_best_peer": ratios,
            "target": _target_text(m),
            "meets_target": verdicts.get("fastproxy"),  # the `fastproxy` column (as before the second build)
            "meets_target_by_proxy": verdicts,  # every fastproxy column
        }
    # raw latency medians too (not ratioed)
    for key in ("p50_us", "p99_us"):
        vals = {}
        for p in out["proxies"] + ["direct"]:
            xs = [r[key] for r in by.get(("latency", p), []) if r.get(key) is not None]
            if xs:
                vals[p] = median(xs)
        if vals:
            summary[f"latency.{key}"] = {"label": f"round trip {key[:3]} (absolute)", "unit": "µs", "median": vals}
    # wss against the msg64 (msg1k) row of the same run (mosquitto_pub 2.0 as the mqtts client: another client)
    w = summary.get("wss.cpu_us_per_msg_wss", {}).get("median", {})
    m64 = summary.get({64: "msg64", 1024: "msg1k"}.get(out.get("wss_size") or 0, "-") + ".cpu_us_per_msg",
                      {}).get("median", {})
    if w and m64:
        summary["wss.vs_msg64"] = {p: w[p] / m64[p] for p in w if m64.get(p)}
    # silent: was a real device served while the silent sockets were held (a note, not a gate)
    dev = {}
    for p in out["proxies"]:
        rows = [r for r in res if r["scenario"] == "silent" and r["proxy"] == p and "device_ok" in r]
        if rows:
            dev[p] = {"ok": sum(1 for r in rows if r["device_ok"]), "runs": len(rows)}
    if dev:
        summary["silent.device"] = {"label": "device served (mosquitto_pub -q 1, mTLS) while the silent sockets "
                                             "were held", "per_proxy": dev}
    # connect-pp: fastproxy without / with --proxy-protocol v2-ssl-cn, same workload, same fake broker
    ppvs = tuple(out.get("pp_variants") or PP_VARIANTS)
    base, pp = ppvs
    rows = {v: by.get(("connect-pp", v), []) for v in ppvs}
    if rows[base] and rows[pp]:
        pp_sum: dict = {"variants": {}}
        for v in ppvs:
            xs = [r["cpu_ms_per_conn"] for r in rows[v] if r.get("cpu_ms_per_conn") is not None]
            rs = [r["conns_per_s"] for r in rows[v] if r.get("conns_per_s") is not None]
            pp_sum["variants"][v] = {"cpu_ms_per_conn": median(xs), "cpu_min": min(xs), "cpu_max": max(xs),
                                     "conns_per_s": median(rs), "n": len(xs)}
        m0 = pp_sum["variants"][base]["cpu_ms_per_conn"]
        m1 = pp_sum["variants"][pp]["cpu_ms_per_conn"]
        pp_sum["cpu_diff_pct"] = (m1 / m0 - 1) * 100 if m0 else None  # ratio of the medians
        paired = []
        for r1 in rows[pp]:
            r0 = next((r for r in rows[base] if r["round"] == r1["round"]), None)
            if r0 and r0.get("cpu_ms_per_conn") and r1.get("cpu_ms_per_conn") is not None:
                paired.append((r1["cpu_ms_per_conn"] / r0["cpu_ms_per_conn"] - 1) * 100)
        pp_sum["cpu_diff_pct_per_round"] = paired
        pp_sum["cpu_diff_pct_paired_median"] = median(paired)
        hdr_bytes = [r.get("pp_v2_header_bytes") for r in rows[pp] if r.get("pp_v2_header_bytes")]
        pp_sum["pp_v2_header_bytes"] = median(hdr_bytes)
        pp_sum["target"] = "< 2 %"
        pp_sum["meets_target"] = pp_sum["cpu_diff_pct"] is not None and pp_sum["cpu_diff_pct"] < 2.0
        pp_sum["base"], pp_sum["with_pp"] = base, pp
        summary["connect-pp"] = pp_sum
    # pool: fastproxy with 1 upstream broker vs a pool of N, same clients and messages
    pv = out.get("pool_variants") or []
    rows = {v: by.get(("pool", v), []) for v in pv}
    if pv and all(rows[v] for v in pv):
        one, many = pv
        pool_sum: dict = {"variants": {}}
        for v in pv:
            xs = [r["cpu_us_per_msg"] for r in rows[v] if r.get("cpu_us_per_msg") is not None]
            rs = [r["msgs_per_s"] for r in rows[v] if r.get("msgs_per_s") is not None]
            pool_sum["variants"][v] = {"cpu_us_per_msg": median(xs), "cpu_min": min(xs), "cpu_max": max(xs),
                                       "msgs_per_s": median(rs), "n": len(xs),
                                       "per_broker": [r.get("per_broker") for r in rows[v]]}
        m1 = pool_sum["variants"][one]["cpu_us_per_msg"]
        mn = pool_sum["variants"][many]["cpu_us_per_msg"]
        pool_sum["ratio"] = mn / m1 if m1 else None  # ratio of the medians, pool=N / pool=1
        pool_sum["cpu_diff_pct"] = (mn / m1 - 1) * 100 if m1 else None
        paired = []
        for rn in rows[many]:
            r1 = next((r for r in rows[one] if r["round"] == rn["round"]), None)
            if r1 and r1.get("cpu_us_per_msg") and rn.get("cpu_us_per_msg") is not None:
                paired.append((rn["cpu_us_per_msg"] / r1["cpu_us_per_msg"] - 1) * 100)
        pool_sum["cpu_diff_pct_per_round"] = paired
        pool_sum["cpu_diff_pct_paired_median"] = median(paired)
        pool_sum["target"] = f"within ±{POOL_TARGET_PCT:g} %"
        pool_sum["meets_target"] = (pool_sum["cpu_diff_pct"] is not None
                                    and abs(pool_sum["cpu_diff_pct"]) <= POOL_TARGET_PCT)
        summary["pool"] = pool_sum
    return summary


def _target_text(m: Metric) -> str | None:
    if not m.target:
        return None
    kind, k = m.target
    ref = m.ratio_to or "best peer"
    return f"<= {k:g} {m.unit}" if kind == "abs" else (f"<= {ref}" if k == 1.0 else f"<= {k:g}x {ref}")


def print_table(out: dict, summary: dict) -> None:
    cols = out["proxies"] + ["direct"]
    has_direct = any("direct" in s.get("median", {}) for s in summary.values())
    if not has_direct:
        cols.remove("direct")
    w = 18
    w0 = max([50] + [len(f"{m.label} [{m.unit}]") + 1 for m in METRICS
                     if summary.get(f"{m.scenario}.{m.key}", {}).get("median")])
    fps = [p for p in FASTPROXIES if p in cols]
    hdr = (f"{'figure':<{w0}}" + "".join(f"{c:>{w}}" for c in cols)
           + f"  target, verdict ({' / '.join(fps) or 'fastproxy'})")
    print()
    print(hdr)
    print("-" * len(hdr))
    for m in METRICS:
        s = summary.get(f"{m.scenario}.{m.key}")
        if not s or not s["median"]:
            continue
        cells = []
        for c in cols:
            v = s["median"].get(c)
            if v is None:
                cells.append(f"{'-':>{w}}")
                continue
            txt = m.fmt.format(v)
            r = s["ratio_to_best_peer"].get(c)
            if r is not None:
                txt += f" ({r:.2f}x)"
            cells.append(f"{txt:>{w}}")
        verdict = ""
        if s["target"]:
            verdict = s["target"]
            by_fp = s.get("meets_target_by_proxy") or {}
            if by_fp:
                verdict += "  " + " / ".join(("PASS" if by_fp[p] else "FAIL") if p in by_fp else "-" for p in fps)
        print(f"{m.label + ' [' + m.unit + ']':<{w0}}" + "".join(cells) + f"  {verdict}")
    for key in ("latency.p50_us", "latency.p99_us"):
        s = summary.get(key)
        if s:
            med = s["median"]
            cells = [f"{(format(med[c], '.0f') if c in med else '-'):>{w}}" for c in cols]
            print(f"{s['label'] + ' [µs]':<{w0}}" + "".join(cells))
    print()
    print("(x) = ratio to the best peer (the better of HAProxy / nginx) for that figure; medians over rounds.")
    if len(fps) > 1:
        print(f"{' and '.join(fps)}: each compared with the peers (ratios, verdicts), not with each other.")
    for p, tls in (out.get("fastproxy_tls") or {}).items():
        if p in cols:
            print(f"{p}: {tls}")
    if summary.get("connect.cpu_ms_per_conn", {}).get("median"):
        print("connect rows: (x) = ratio to HAProxy (the only peer doing the same job: verify required + ClientId == CN);"
              "\n  nginx there is a plain mTLS reference (no MQTT parsing, no ClientId check), not the same job.")
    if summary.get("wss.cpu_us_per_msg_wss", {}).get("median"):
        cl = ("Mosquitto 2.1 mosquitto_pub -l (--ws for wss)" if out.get("wss_client") == "mosquitto"
              else "loadgen.py pub (Python, masked frames)")
        print(f"wss rows: QoS 0 messages of {out.get('wss_size')} B; the same publisher for both transports ({cl}), mTLS; "
              "fastproxy --websocket -> plain MQTT "
              "to the broker;\n  HAProxy (mode http) and nginx (http, proxy_pass + Upgrade) pass the WebSocket "
              "through to Mosquitto 2.1's websockets listener.")
        vs = summary.get("wss.vs_msg64")
        if vs:
            print(f"wss CPU per message / msg{'64' if out.get('wss_size') == 64 else '1k'} row of this run "
                  "(mosquitto_pub 2.0, another client): "
                  + ", ".join(f"{p} {v:.2f}x" for p, v in vs.items()))
    dev = summary.get("silent.device")
    if dev:
        cells = ", ".join(f"{p} {d['ok']}/{d['runs']} ok" for p, d in dev["per_proxy"].items())
        print(f"silent: a device (mosquitto_pub -q 1, mTLS) through the proxy while {out.get('silent_conns')} silent "
              f"sockets were held: {cells}")
    pp = summary.get("connect-pp")
    if pp:
        base, ppv = pp["base"], pp["with_pp"]
        v0, v1 = pp["variants"][base], pp["variants"][ppv]
        print(f"\nconnect-pp ({base} alone, upstream = fake broker that skips PROXY headers; medians over rounds)")
        print(f"{'variant':<34}{'CPU [ms/conn]':>16}{'min..max':>18}{'conn/s':>10}")
        for name, v in ((base + " (no PROXY)", v0), (ppv, v1)):
            rng = f"{v['cpu_min']:.3f}..{v['cpu_max']:.3f}"
            print(f"{name:<34}{v['cpu_ms_per_conn']:>16.3f}{rng:>18}{v['conns_per_s']:>10,.0f}")
        per_round = ", ".join(f"{x:+.1f}" for x in pp["cpu_diff_pct_per_round"])
        verdict = "PASS" if pp["meets_target"] else "FAIL"
        print(f"v2-ssl-cn CPU difference per connection: {pp['cpu_diff_pct']:+.2f} % (ratio of medians; "
              f"per round: {per_round} %)  target {pp['target']}  {verdict}")
        if pp.get("pp_v2_header_bytes"):
            print(f"PROXY v2 header size seen by the fake broker: {pp['pp_v2_header_bytes']:.0f} bytes")
    ps = summary.get("pool")
    if ps:
        one, many = out["pool_variants"]
        print(f"\npool ({out.get('pool_build') or 'fastproxy'} alone, the same clients and messages; upstream 1 broker "
              f"vs {many.split('=')[1]} "
              "brokers, clientid balance; medians over rounds)")
        print(f"{'variant':<16}{'CPU [µs/msg]':>14}{'min..max':>18}{'msg/s':>10}  messages per broker (per round)")
        for v in (one, many):
            x = ps["variants"][v]
            rng = f"{x['cpu_min']:.3f}..{x['cpu_max']:.3f}"
            pb = "; ".join(str(p) for p in x["per_broker"])
            print(f"{v:<16}{x['cpu_us_per_msg']:>14.3f}{rng:>18}{x['msgs_per_s'] or 0:>10,.0f}  {pb}")
        per_round = ", ".join(f"{x:+.1f}" for x in ps["cpu_diff_pct_per_round"])
        verdict = "PASS" if ps["meets_target"] else "FAIL"
        print(f"CPU per message {many} / {one}: {ps['ratio']:.3f} ({ps['cpu_diff_pct']:+.2f} %, ratio of medians; "
              f"per round: {per_round} %)  target {ps['target']}  {verdict}")
    warnings = [r for r in out["results"] if r.get("warning") or r.get("error")]
    if warnings:
        print("\nwarnings / errors:")
        for r in warnings:
            print(f"  round {r['round']} {r['scenario']} {r['proxy']}: {r.get('error') or r.get('warning')}")
    for name, why in out["skipped"].items():
        print(f"skipped {name}: {why}")
    for n in out["notes"]:
        print(f"note: {n}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--messages", type=int, help="messages per msg64/msg1k run (default 200000; --quick 20000)")
    p.add_argument("--bulk-mb", type=int, help="MiB pushed per bulk run (default 1024; --quick 128)")
    p.add_argument("--idle-conns", type=int, help="idle mTLS connections (default 5000; --quick 500)")
    p.add_argument("--silent-conns", type=int,
                   help="silent scenario: plain TCP sockets to the TLS port that send nothing (default 5000; "
                        "--quick 500)")
    p.add_argument("--latency-seconds", type=float, help="seconds per latency run (default 5; --quick 2)")
    p.add_argument("--latency-rate", type=float, default=1000, help="messages/s in the latency run (default 1000)")
    p.add_argument("--only", default=",".join(DEFAULT_PROXIES),
                   help="comma list of: " + ",".join(PROXIES) + " (default: " + ",".join(DEFAULT_PROXIES) + ")")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help="comma list of: " + ",".join(SCENARIOS) + " (default: " + ",".join(DEFAULT_SCENARIOS) + ")")
    p.add_argument("--connect-conns", type=int,
                   help="connections per proxy per round in connect/connect-pp (default 3000; --quick 300)")
    p.add_argument("--connect-procs", type=int, default=4, help="client processes in connect/connect-pp (default 4)")
    p.add_argument("--pool-size", type=int, default=3,
                   help="pool scenario: brokers in the pool compared with one broker (default 3)")
    p.add_argument("--pool-clients", type=int, default=6,
                   help="pool scenario: publishers sharing --messages, in both variants (default 6)")
    p.add_argument("--pool-msg-size", type=int, default=64, help="pool scenario: message payload bytes (default 64)")
    p.add_argument("--pool-health-interval", metavar="DUR",
                   help="pool scenario: --health-interval for both variants (default: fastproxy's default, "
                        "i.e. 2s for the pool, off for one broker)")
    p.add_argument("--mosquitto21", metavar="DIR",
                   help="wss scenario: Mosquitto 2.1 install prefix (sbin/mosquitto: the peers' WebSocket broker; "
                        "bin/mosquitto_pub: the publisher). Default: $FASTPROXY_MOSQUITTO21 (the binary), else what "
                        "scripts/build-mosquitto prints (it builds 2.1.2 when missing)")
    p.add_argument("--wss-client", choices=WSS_CLIENTS, default="loadgen",
                   help="wss scenario: publisher for both transports: loadgen.py pub [--ws] (Python; default) or "
                        "Mosquitto 2.1's mosquitto_pub -l [--ws] (loses QoS 0 messages under bursts, see README)")
    p.add_argument("--wss-size", type=int, default=64, help="wss scenario: message payload bytes (default 64)")
    p.add_argument("--wss-batch", type=int, default=1,
                   help="wss scenario with --wss-client loadgen: MQTT packets per write (default 1)")
    p.add_argument("--json", metavar="FILE", help="write all raw results and the summary as JSON")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="skip the no-proxy msgs/s reference run in msg64/msg1k")
    p.add_argument("--idle-procs", type=int, default=1, help="client processes holding the idle connections")
    p.add_argument("--idle-concurrency", type=int, default=64, help="connections being opened at once per process")
    p.add_argument("--tls-suite", default=TLS13_SUITE,
                   help=f"the one TLS 1.3 cipher suite every proxy is configured with (default {TLS13_SUITE}; "
                        "TLS_CHACHA20_POLY1305_SHA256 on CPUs without AES instructions, e.g. Raspberry Pi 4)")
    p.add_argument("--fastproxy-cmd", help="command that runs fastproxy (default: python3 -m fastproxy from the repo)")
    p.add_argument("--fastproxy-awslc-cmd",
                   help="command that runs the fastproxy-awslc column (default: python3 -m fastproxy from an AWS-LC "
                        "build of the checkout's current sources, made in $FASTPROXY_CACHE/e2e-awslc (default "
                        "~/.cache/fastproxy) when these sources have none; scripts/build-awslc provides AWS-LC)")
    p.add_argument("--step-timeout", type=float, default=180, help="bound for any single measurement step (s)")
    p.add_argument("--time-budget", type=float, default=900,
                   help="no new round starts after this many seconds (default 900)")
    p.add_argument("--max-background", type=float, default=0.10,
                   help="warn when more than this fraction of the CPUs is busy before a round (default 0.10)")
    p.add_argument("--perf", metavar="DIR",
                   help="perf record -g each proxy during msg64/msg1k/bulk into DIR (perturbs the CPU figures)")
    p.add_argument("--perf-freq", type=int, default=999, help="perf sampling frequency (default 999 Hz)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, certs, logs)")
    a = p.parse_args(argv)
    q = a.quick
    for name, full, quick in (("rounds", 3, 1), ("messages", 200_000, 20_000), ("bulk_mb", 1024, 128),
                              ("idle_conns", 5000, 500), ("silent_conns", 5000, 500), ("latency_seconds", 5.0, 2.0),
                              ("connect_conns", 3000, 300)):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    a.only = comma_choices(p, "--only", a.only, PROXIES, "proxy")
    a.scenarios = comma_choices(p, "--scenarios", a.scenarios, SCENARIOS, "scenario")
    if (a.rounds < 1 or a.messages < 1 or a.bulk_mb < 1 or a.idle_conns < 1 or a.connect_conns < 1
            or a.silent_conns < 1):
        p.error("--rounds, --messages, --bulk-mb, --idle-conns, --silent-conns and --connect-conns must be positive")
    if a.wss_size < 1 or a.wss_batch < 1:
        p.error("--wss-size and --wss-batch must be positive")
    if not 2 <= a.pool_size <= 64 or a.pool_clients < 1 or a.pool_msg_size < 1:
        p.error("--pool-size must be 2..64, --pool-clients and --pool-msg-size positive")
    if "pool" in a.scenarios and a.messages < a.pool_clients:
        p.error("--messages must be at least --pool-clients")
    a.mosquitto21_bin = a.mosquitto21_pub = None
    # Mosquitto 2.1: the peers' WebSocket broker, and the publisher with --wss-client mosquitto
    if "wss" in a.scenarios and (a.wss_client == "mosquitto" or set(a.only) & set(PEERS)):
        try:
            a.mosquitto21_bin, a.mosquitto21_pub = find_mosquitto21(a.mosquitto21)
        except BenchError as e:
            p.error(str(e))
    return a


def find_mosquitto21(prefix: str | None) -> tuple[str, str]:
    """(sbin/mosquitto, bin/mosquitto_pub) of a Mosquitto 2.1 with websockets."""
    if prefix:
        sbin = os.path.join(prefix, "sbin", "mosquitto")
    elif os.environ.get("FASTPROXY_MOSQUITTO21"):
        sbin = os.environ["FASTPROXY_MOSQUITTO21"]
    else:
        try:
            r = subprocess.run([os.path.join(REPO, "scripts", "build-mosquitto")], capture_output=True, text=True,
                               timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"scripts/build-mosquitto failed: {e}") from None
        if r.returncode != 0:
            raise BenchError(f"scripts/build-mosquitto failed: {r.stderr.strip()[-500:]}")
        sbin = r.stdout.strip().splitlines()[-1]
    pub = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(sbin))), "bin", "mosquitto_pub")
    for f in (sbin, pub):
        if not os.access(f, os.X_OK):
            raise BenchError(f"wss scenario: {f} not found (Mosquitto 2.1: --mosquitto21 PREFIX)")
    return sbin, pub


def _sources_newer_than_build() -> list[str]:
    """ext/ sources and setup.py modified after the oldest compiled module of the in-place build
    (then the `fastproxy` column may run older code than an AWS-LC build made from the sources now)."""
    mods = [os.path.join(REPO, "fastproxy", f) for f in os.listdir(os.path.join(REPO, "fastproxy")) if f.endswith(".so")]
    if not mods:
        return []
    oldest = min(os.path.getmtime(f) for f in mods)
    try:
        files = _tree_files()
    except BenchError:
        return []
    return [f for f in files if (f.startswith("ext/") or f == "setup.py")
            and os.path.getmtime(os.path.join(REPO, f)) > oldest]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    sigterm_as_interrupt()
    scratch = tempfile.mkdtemp(prefix="fastproxy-e2e-builds-")
    try:
        return _main(a, scratch)
    finally:
        if a.keep_tmp:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _main(a: argparse.Namespace, scratch: str) -> int:
    try:
        prepare_fastproxies(a, scratch)  # may build fastproxy-awslc first (minutes)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    env = environment()
    fp_notes = []
    for name in FASTPROXIES:
        if name in a.only and name not in a.fp_error:
            env[name] = _fastproxy_build(name, a)
            log(f"{name}: {env[name]['tls'] or env[name]['version']} ({env[name]['command']}"
                + (f", PYTHONPATH={a.fp_path[name]})" if a.fp_path[name] else ")"))
    if "fastproxy-awslc" in env and "AWS-LC" not in (env["fastproxy-awslc"]["tls"] or ""):
        fp_notes.append(f"fastproxy-awslc does not run on AWS-LC: {env['fastproxy-awslc']['tls']}")
    if "fastproxy" in env and "fastproxy-awslc" in env and not a.fastproxy_cmd and not a.fastproxy_awslc_cmd:
        newer = _sources_newer_than_build()
        if newer:
            env["fastproxy"]["sources_newer_than_build"] = newer
            fp_notes.append(f"{len(newer)} file(s) under ext/ (or setup.py) are newer than the in-place build "
                            f"({', '.join(newer[:4])}{', ...' if len(newer) > 4 else ''}): fastproxy may run older "
                            "code than fastproxy-awslc, which was built from the sources as they are now")
    for n in fp_notes:
        log(f"note: {n}")
    log(f"{env['cpus']} CPU(s) {env['cpu']}, kernel {env['kernel']}; {env['haproxy']}; {env['nginx']}")
    try:
        out = run(a)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BenchError as e:
        log(f"error: {e}")
        return 1
    out["notes"][:0] = fp_notes
    out["fastproxy_tls"] = {p: env[p]["tls"] for p in FASTPROXIES if p in env and env[p].get("tls")}
    for name in FASTPROXIES:
        if name not in env or a.fp_custom[name]:
            continue
        # the in-place build can change under a long run (another job rebuilding the engine): then
        # fastproxy processes started before and after the rebuild measured different code
        after = _modules_mtime(a.fp_path[name])
        before = env[name]["modules_mtime"]
        if after != before:
            changed = {k: f"{before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v}
            out["notes"].append(f"{name}'s compiled modules changed during the run ({changed}): "
                                "rounds before and after measured different builds")
            env[name]["modules_mtime_at_end"] = after
    summary = summarize(out)
    print_table(out, summary)
    if a.json:
        cfg = {k: v for k, v in vars(a).items()}
        with open(a.json, "w") as f:
            json.dump({"env": env, "args": cfg, "summary": summary, **out}, f, indent=2, default=str)
        log(f"wrote {a.json}")
    log(f"total {out['wall_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
