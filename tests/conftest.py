"""Fixtures for the functional tests: certificates, a real Mosquitto, the proxy as a subprocess.

Only loopback addresses are used. Every wait is bounded. Nothing mocks a socket.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proxyutil as U  # noqa: E402

REPO = U.REPO
free_port = U.free_port  # the helper, also reachable as proxyutil.free_port
proxy_env = U.proxy_env
run_cli = U.run_cli
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# ----------------------------------------------------------------------------- certificates


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> U.Certs:
    """CA, server cert (CN=localhost, SAN localhost/127.0.0.1/::1), client certs (good, rogue CA, expired)."""
    return U.make_certs(tmp_path_factory.mktemp("certs"))


# ----------------------------------------------------------------------------- mosquitto


@dataclass
class Broker:
    host: str
    port: int
    path: str | None
    log_path: str
    conf_path: str
    proc: subprocess.Popen

    @property
    def upstream(self) -> str:
        """The value for --upstream."""
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        U.stop_process(self.proc, timeout=5)


def _start_mosquitto(workdir: str, *, unix: bool = False, extra: list[str] | None = None) -> Broker:
    log_path = os.path.join(workdir, "mosquitto.log")
    conf_path = os.path.join(workdir, "mosquitto.conf")
    if unix:
        sock_path = os.path.join(workdir, "mosq.sock")
        port, listener = 0, f"listener 0 {sock_path}"
    else:
        sock_path = None
        port = U.free_port()
        listener = f"listener {port} {U.HOST}"
    lines = [
        listener,
        "allow_anonymous true",
        f"log_dest file {log_path}",
        "log_type all",
        "set_tcp_nodelay true",
        "max_queued_messages 100000",
        "max_connections -1",
        "persistence false",
    ]
    if os.geteuid() == 0:
        # Mosquitto drops privileges to user 'mosquitto' when started as root; that user could
        # not create the unix socket or the log file in our root-owned temp directory.
        lines.append("user root")
    lines += extra or []
    Path(conf_path).write_text("\n".join(lines) + "\n")
    stderr = open(os.path.join(workdir, "mosquitto.stderr"), "wb")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", conf_path],
        stdin=subprocess.DEVNULL,
        stdout=stderr,
        stderr=stderr,
        preexec_fn=U._preexec_raise_nofile,
    )
    stderr.close()
    broker = Broker(U.HOST, port, sock_path, log_path, conf_path, proc)

    def diag() -> str:
        err = Path(workdir, "mosquitto.stderr").read_text(errors="replace")
        return f"mosquitto stderr:\n{err}\nmosquitto log:\n{broker.log()}"

    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            text = diag()
            if unix and ("unix" in text.lower() or "Error" in text):
                pytest.skip(f"this mosquitto does not support unix-socket listeners: {text.strip()[-300:]}")
            raise AssertionError(f"mosquitto exited with {proc.returncode}\n{text}")
        if unix:
            if os.path.exists(sock_path):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(sock_path)
                    break
                except OSError:
                    pass
                finally:
                    s.close()
        elif U.can_connect(U.HOST, port):
            break
        if time.monotonic() > deadline:
            U.stop_process(proc, timeout=3)
            raise AssertionError(f"mosquitto did not become ready in 10s\n{diag()}")
        time.sleep(0.05)
    return broker


@pytest.fixture
def mosquitto_factory():
    """Start extra brokers: mosquitto_factory(unix=False, extra=["some_option value"])."""
    started: list[tuple[Broker, str]] = []

    def start(*, unix: bool = False, extra: list[str] | None = None) -> Broker:
        d = tempfile.mkdtemp(prefix="fpmq", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
        b = _start_mosquitto(d, unix=unix, extra=extra)
        started.append((b, d))
        return b

    yield start
    for b, d in started:
        b.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mosquitto(mosquitto_factory) -> Broker:
    """A Mosquitto broker on 127.0.0.1:<free port>."""
    return mosquitto_factory()


@pytest.fixture
def mosquitto_unix(mosquitto_factory) -> Broker:
    """A Mosquitto broker listening only on a unix socket (skips if unsupported)."""
    return mosquitto_factory(unix=True)


# ----------------------------------------------------------------------------- the proxy


@dataclass
class FastProxy:
    proc: subprocess.Popen
    host: str
    port: int
    args: list[str]
    access_log_path: str | None
    stdout_path: str
    stderr_path: str
    allow_traceback: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def access_log(self) -> list[str]:
        """The access-log lines written so far."""
        if not self.access_log_path:
            return []
        try:
            with open(self.access_log_path, errors="replace") as f:
                return [ln.rstrip("\n") for ln in f if ln.strip()]
        except FileNotFoundError:
            return []

    def access_entries(self) -> list[U.AccessLine]:
        return [U.parse_access_line(ln) for ln in self.access_log()]

    def wait_access(self, pred: Callable[[U.AccessLine], bool] | None = None, n: int = 1,
                    timeout: float = 10.0) -> list[U.AccessLine]:
        """Wait until at least n access-log lines satisfy pred; returns those lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.access_log()
            entries = []
            for ln in lines:
                m = U.ACCESS_RE.match(ln)
                if m:
                    e = U.parse_access_line(ln)
                    if pred is None or pred(e):
                        entries.append(e)
            if len(entries) >= n:
                return entries
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {n} matching access-log line(s) within {timeout}s, got {len(entries)}; "
                    f"access log:\n" + "\n".join(lines[-30:]) + f"\nstderr:\n{self.stderr()[-3000:]}"
                )
            time.sleep(0.05)

    def stderr(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        try:
            return Path(self.stdout_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 3.0) -> int | None:
        """SIGTERM; after timeout a second SIGTERM (stop at once); then SIGKILL. Bounded."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                try:
                    self.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                if self.wait(5) is None:
                    self.proc.kill()
                    self.wait(5)
        return self.proc.returncode


def _listen_port(args: tuple[str, ...]) -> tuple[str, int] | None:
    for i, a in enumerate(args):
        v = None
        if a == "--listen" and i + 1 < len(args):
            v = args[i + 1]
        elif a.startswith("--listen="):
            v = a.split("=", 1)[1]
        if v:
            host, _, port = v.rpartition(":")
            return host.strip("[]") or U.HOST, int(port)
    return None


@pytest.fixture
def run_fastproxy(tmp_path):
    """Factory: run_fastproxy(*serve_args, env=None, port=None, access_log=True, ready_timeout=10).

    Starts `python -m fastproxy serve ARGS` with stdout/stderr to files, adds
    `--access-log FILE` unless the args name one (or access_log=False), waits until the
    --listen port (or `port=`) is in LISTEN state, and stops it at teardown.
    Readiness is read from /proc/net/tcp rather than by connecting, so that no spurious
    session shows up in the access log.
    """
    started: list[FastProxy] = []
    counter = [0]

    def start(*args: str, env: dict | None = None, port: int | None = None, access_log: bool = True,
              ready_timeout: float = 10.0, wait_ready: bool = True, allow_traceback: bool = False) -> FastProxy:
        counter[0] += 1
        n = counter[0]
        args = tuple(str(a) for a in args)
        out_p = str(tmp_path / f"fastproxy{n}.stdout")
        err_p = str(tmp_path / f"fastproxy{n}.stderr")
        acc_p = None
        if any(a == "--access-log" or a.startswith("--access-log=") for a in args):
            for i, a in enumerate(args):
                if a == "--access-log":
                    acc_p = args[i + 1]
                elif a.startswith("--access-log="):
                    acc_p = a.split("=", 1)[1]
            if acc_p in ("-", "off", "stdout"):
                acc_p = out_p if acc_p in ("-", "stdout") else None
        elif access_log:
            acc_p = str(tmp_path / f"access{n}.log")
            args = args + ("--access-log", acc_p)
        hp = _listen_port(args)
        host = hp[0] if hp else U.HOST
        if port is None:
            assert hp is not None, "pass port= when the listen address comes from a config file"
            port = hp[1]
        cmd = [sys.executable, "-m", "fastproxy", "serve", *args]
        with open(out_p, "wb") as so, open(err_p, "wb") as se:
            proc = subprocess.Popen(
                cmd, cwd=str(REPO), env=proxy_env(env), stdin=subprocess.DEVNULL, stdout=so, stderr=se,
                preexec_fn=U._preexec_raise_nofile,
            )
        fp = FastProxy(proc, host, port, list(cmd), acc_p, out_p, err_p, allow_traceback)
        started.append(fp)
        if wait_ready:
            U.wait_port(host, port, timeout=ready_timeout, proc=proc, connect=False,
                        diag=lambda: f"command: {cmd}\nstderr:\n{fp.stderr()}")
        return fp

    yield start

    problems = []
    for fp in started:
        fp.stop()
        err = fp.stderr()
        if err.strip():
            print(f"--- stderr of {' '.join(fp.args[3:])}\n{err[-4000:]}")
        if not fp.allow_traceback and "Traceback (most recent call last)" in err:
            problems.append(f"proxy {fp.args[3:]} printed a Python traceback:\n{err[-4000:]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# ----------------------------------------------------------------------------- clients


@pytest.fixture
def paho_client(certs):
    """Factory for connected paho clients: paho_client(port, client_id=..., version=4|5, tls=True, ...)."""
    clients: list[U.PahoClient] = []

    def make(port: int, *, client_id: str, version: int = 4, tls: bool = True, connect: bool = True,
             **kw) -> U.PahoClient:
        c = U.PahoClient(port, client_id=client_id, version=version, tls=tls, certs=certs, **kw)
        clients.append(c)
        if connect:
            c.connect()
        return c

    yield make
    for c in clients:
        try:
            c.close()
        except Exception:
            pass


@pytest.fixture
def raw_sockets():
    """Keeps raw sockets opened by a test and closes them at teardown: track(sock) -> sock."""
    socks: list[socket.socket] = []

    def track(s: socket.socket) -> socket.socket:
        socks.append(s)
        return s

    yield track
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


@pytest.fixture
def start_proxy(run_fastproxy, certs):
    """start_proxy(broker_or_upstream, *extra_flags, tls=True, **run_fastproxy_kw) -> FastProxy.

    Listens on 127.0.0.1:<free port>; with tls=True uses the test server certificate.
    """

    def start(upstream, *extra: str, tls: bool = True, **kw) -> FastProxy:
        up = upstream.upstream if isinstance(upstream, Broker) else str(upstream)
        port = U.free_port()
        args = ["--listen", f"{U.HOST}:{port}", "--upstream", up]
        if tls:
            args += ["--tls-cert", certs.server_cert, "--tls-key", certs.server_key]
        return run_fastproxy(*args, *extra, **kw)

    return start


# ----------------------------------------------------------------------------- device identity
# (appended for tests/test_identity.py, tests/test_mqtt_gate.py, tests/test_policy.py)


@pytest.fixture(scope="session")
def identity_certs(certs, tmp_path_factory) -> U.IdentityCerts:
    """Extra client certificates from the test CA: CN=sensor-7 with two SAN DNS names (plus an
    email and a URI SAN), CN=thing002, and one without a CN."""
    return U.make_identity_certs(certs, tmp_path_factory.mktemp("idcerts"))


@pytest.fixture
def echo_server():
    """A plain TCP echo server on loopback (not MQTT): .port, .accepted, .received."""
    srv = U.EchoServer()
    yield srv
    srv.close()


@pytest.fixture
def fake_broker():
    """A minimal MQTT 'broker' that never times clients out (CONNACK 0, PINGRESP)."""
    srv = U.FakeBroker()
    yield srv
    srv.close()


# ----------------------------------------------------------------------------- Mosquitto 2.1 (PROXY receiver)
# (appended for tests/test_mosquitto21.py) Debian 12's Mosquitto 2.0 cannot read PROXY headers;
# scripts/build-mosquitto builds 2.1.2 from the vendored source into the cache below. Its binary
# carries an rpath ($ORIGIN/../lib), so it runs without LD_LIBRARY_PATH.

MOSQUITTO21_MISSING = "Mosquitto 2.1 not built: run scripts/build-mosquitto"


def mosquitto21_binary() -> str | None:
    """$FASTPROXY_MOSQUITTO21, else scripts/build-mosquitto's default output; None when absent."""
    path = os.environ.get("FASTPROXY_MOSQUITTO21") or os.path.join(
        os.environ.get("FASTPROXY_CACHE") or os.path.expanduser("~/.cache/fastproxy"),
        "mosquitto-2.1.2", "prefix", "sbin", "mosquitto")
    return path if os.access(path, os.X_OK) else None


def _start_mosquitto21(workdir: str, binary: str, body: list[str]) -> Broker:
    """Like _start_mosquitto, but the listener's lines are the caller's and readiness is read
    from /proc/net/tcp: a bare connect would be a header-less connection in the broker's log."""
    log_path = os.path.join(workdir, "mosquitto.log")
    conf_path = os.path.join(workdir, "mosquitto.conf")
    port = U.free_port()
    # Only global options before the listener line: a listener option there (max_connections,
    # ...) would create Mosquitto's default listener on port 1883.
    lines = [f"log_dest file {log_path}", "log_type all", "persistence false"]
    if os.geteuid() == 0:
        lines.append("user root")  # see _start_mosquitto
    lines += [f"listener {port} {U.HOST}", "max_connections -1", *body]
    Path(conf_path).write_text("\n".join(lines) + "\n")
    err_path = os.path.join(workdir, "mosquitto.stderr")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([binary, "-c", conf_path], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                preexec_fn=U._preexec_raise_nofile)
    broker = Broker(U.HOST, port, None, log_path, conf_path, proc)

    def diag() -> str:
        return (f"config:\n{Path(conf_path).read_text()}\nmosquitto stderr:\n"
                f"{Path(err_path).read_text(errors='replace')}\nmosquitto log:\n{broker.log()}")

    deadline = time.monotonic() + 10
    while not U.port_is_listening(port):
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto 2.1 exited with {proc.returncode}\n{diag()}")
        if time.monotonic() > deadline:
            U.stop_process(proc, timeout=3)
            raise AssertionError(f"mosquitto 2.1 did not listen on {port} within 10s\n{diag()}")
        time.sleep(0.05)
    return broker


@pytest.fixture
def mosquitto21_factory():
    """Start Mosquitto 2.1 brokers: mosquitto21_factory(["enable_proxy_protocol 2", ...]) -> Broker.

    The lines follow `listener <free port> 127.0.0.1` (logging to .log(), persistence off are set
    before it). Skips when the binary is missing (scripts/build-mosquitto)."""
    binary = mosquitto21_binary()
    if binary is None:
        pytest.skip(MOSQUITTO21_MISSING)
    started: list[tuple[Broker, str]] = []

    def start(body: list[str]) -> Broker:
        d = tempfile.mkdtemp(prefix="fpmq21", dir="/tmp")
        b = _start_mosquitto21(d, binary, list(body))
        started.append((b, d))
        return b

    yield start
    for b, d in started:
        b.stop()
        shutil.rmtree(d, ignore_errors=True)
