"""The rig of `fastproxy bench` and benchmarks/idle_scale.py: facts about the machine, the proxy's
CPU and memory from /proc, a throw-away PKI, Mosquitto on loopback, `fastproxy serve` with a
bench's version of a configuration, and the compiled load generator in processes of its own.

A generator process is `python -m fastproxy.bench _gen PARAMS-JSON` (see _gen_main): it writes
progress lines (`ready live=...`) on stdout, stops holding when its stdin closes, and ends with
`result {json}`.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import BenchError, ConfigError

HOST = "127.0.0.1"
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FDS_PER_SESSION = 2            # the client's socket and the broker's
FD_RESERVE = 200               # per process: listeners, logs, pipes, epoll
KEEPALIVE_S = 60               # devices' MQTT keepalive (and PINGREQ interval)


# ----------------------------------------------------------------------------- the machine


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.split(":")[0].strip() in ("model name", "Model", "Hardware") and ":" in line:
            cpu = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                break
    mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.endswith("kB")}
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lo_hi = _read("/proc/sys/net/ipv4/ip_local_port_range").split()
    file_nr = _read("/proc/sys/fs/file-nr").split()
    return {
        "cpu_model": cpu or platform.processor() or "unknown",
        "cores": cores,
        "arch": platform.machine(),
        "kernel": platform.release(),
        "ram_gib": round(mem.get("MemTotal", 0) / 2**20, 2),
        "mem_available_kib": mem.get("MemAvailable", mem.get("MemFree", 0)),
        "nofile_soft": soft,
        "nofile_hard": hard,
        "file_max": int(_read("/proc/sys/fs/file-max").strip() or 0) or None,
        "files_open": int(file_nr[0]) if file_nr else 0,
        "port_range": [int(lo_hi[0]), int(lo_hi[1])] if len(lo_hi) == 2 else [32768, 60999],
    }


def tls_library_name() -> str:
    """What `fastproxy version` says about the TLS library."""
    try:
        from .tls import openssl_version, tls_library

        name, version, static = tls_library()
        text = version if version.startswith(name) else f"{name} {version}"
        runtime = openssl_version()
        return text + (" (built in)" if static else "" if runtime in text else f" (runtime {runtime})")
    except ImportError as e:
        raise BenchError(f"the compiled modules are not built ({e}); build fastproxy first") from None


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it). Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------------- processes


def children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        for c in _read(f"/proc/{pid}/task/{tid}/children").split():
            out.append(int(c))
    return out


def process_tree(pid: int) -> list[int]:
    """pid and every process below it."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10_000:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """On-CPU time of these processes: the sum over their live threads of schedstat's ns (full
    resolution); utime+stime (10 ms ticks, exited threads included) when schedstat is missing."""
    total = 0.0
    for pid in pids:
        sched = 0
        ok = False
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                s = _read(f"/proc/{pid}/task/{tid}/schedstat").split()
                if s:
                    sched += int(s[0])
                    ok = True
        except OSError:
            continue
        if ok:
            total += sched / 1e9
            continue
        st = _read(f"/proc/{pid}/stat")
        fields = st[st.rfind(")") + 2:].split()
        if len(fields) > 12:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def memory_kib(pids: Sequence[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over these processes (PSS shares the pages a fork shares)."""
    rss = pss = 0
    for pid in pids:
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
        for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen | None, *, twice: bool = False, timeout: float = 10.0) -> None:
    """SIGTERM (twice: fastproxy's 'stop now'), bounded wait, then SIGKILL of its process group."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        if twice:
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def _tail(path: str, n: int = 6) -> str:
    return "\n".join(_read(path).strip().splitlines()[-n:])


# ----------------------------------------------------------------------------- PKI


@dataclass
class Pki:
    dir: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    device_key: str   # the key of every minted device certificate


def make_pki(directory: str) -> Pki:
    """A throw-away CA, a server certificate for localhost/127.0.0.1/::1 and a device key (ECDSA
    P-256); the generator mints one device certificate per connection from the CA."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise BenchError("the throw-away PKI needs the cryptography package: pip install 'fastproxy[bench]'") from None
    now = _dt.datetime.now(_dt.timezone.utc)

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastproxy bench"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(fname: str, data: bytes, mode: int = 0o644) -> str:
        p = os.path.join(directory, fname)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        return p

    def key_pem(k: Any) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_k = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("fastproxy bench CA")).issuer_name(name("fastproxy bench CA"))
          .public_key(ca_k.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_k, hashes.SHA256()))
    srv_k = ec.generate_private_key(ec.SECP256R1())
    srv = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
           .public_key(srv_k.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=30))
           .add_extension(x509.SubjectAlternativeName([
               x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
               x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_k, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return Pki(
        dir=directory,
        ca_cert=write("ca.crt", ca.public_bytes(pem)),
        ca_key=write("ca.key", key_pem(ca_k), 0o600),
        server_cert=write("server.crt", srv.public_bytes(pem)),
        server_key=write("server.key", key_pem(srv_k), 0o600),
        device_key=write("device.key", key_pem(ec.generate_private_key(ec.SECP256R1())), 0o600),
    )


# ----------------------------------------------------------------------------- broker


MOSQUITTO_HINT = "install Mosquitto (Debian/Ubuntu: apt install mosquitto) or give --broker HOST:PORT"


def find_mosquitto(proxy_protocol: bool) -> str:
    """The mosquitto binary; one that reads PROXY headers (Mosquitto >= 2.1) when asked."""
    if not proxy_protocol:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
        if exe is None:
            raise BenchError(f"no mosquitto binary found: {MOSQUITTO_HINT}")
        return exe
    candidates = [os.environ.get("FASTPROXY_MOSQUITTO21", "")]
    cache = os.environ.get("FASTPROXY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastproxy")
    if os.path.isdir(cache):
        candidates += [os.path.join(cache, d, "prefix", "sbin", "mosquitto") for d in sorted(os.listdir(cache))
                       if d.startswith("mosquitto-")]
    candidates += [shutil.which("mosquitto") or ""]
    for exe in candidates:
        if exe and os.access(exe, os.X_OK) and mosquitto_version(exe) >= (2, 1):
            return exe
    raise BenchError("the configuration sends PROXY headers to the broker, which Mosquitto 2.0 cannot read: "
                     "build Mosquitto >= 2.1 (scripts/build-mosquitto, or set FASTPROXY_MOSQUITTO21 to its binary) "
                     "or give --broker HOST:PORT of a broker that reads them")


def mosquitto_version(exe: str) -> tuple[int, ...]:
    try:
        r = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    for word in (r.stdout + r.stderr).split():
        if word[:1].isdigit() and word.count(".") >= 1:
            try:
                return tuple(int(x) for x in word.split(".")[:3])
            except ValueError:
                continue
    return (0,)


class Mosquitto:
    """A Mosquitto on loopback that can be restarted on the same port (the reconnect storm)."""

    def __init__(self, exe: str, workdir: str, *, port: int | None = None, proxy_protocol: str = "none",
                 name: str = "mosquitto") -> None:
        self.exe, self.workdir, self.name = exe, workdir, name
        self.port = port or free_port()
        self.conf = os.path.join(workdir, f"{name}.conf")
        self.log = os.path.join(workdir, f"{name}.log")
        lines = [f"listener {self.port} {HOST}", "allow_anonymous true", "max_connections -1",
                 "persistence false", "set_tcp_nodelay true", "max_queued_messages 1000",
                 f"log_dest file {self.log}", "log_type error", "log_type warning"]
        if proxy_protocol.startswith("v2"):
            lines.append("enable_proxy_protocol 2")
        elif proxy_protocol == "v1":
            lines.append("enable_proxy_protocol 1")
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot write the log here
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> None:
        err = open(os.path.join(self.workdir, f"{self.name}.stderr"), "ab")
        self.proc = subprocess.Popen([self.exe, "-c", self.conf], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     start_new_session=True)
        err.close()
        deadline = time.monotonic() + timeout
        while not can_connect(HOST, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop(self.proc)
                raise BenchError(f"{self.name} did not start on {HOST}:{self.port}: "
                                 f"{_tail(os.path.join(self.workdir, self.name + '.stderr')) or _tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop(self.proc)


# ----------------------------------------------------------------------------- the proxy's configuration


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise BenchError(f"cannot write {v!r} to TOML")


def write_toml(path: str, raw: dict[str, Any]) -> None:
    """A flat configuration (one listener at the top level, [upstreams] as a table)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


PATH_KEYS = ("tls_cert", "tls_key", "client_ca", "crl")
# What a bench replaces in a user's configuration, and why (said in the report).
DROPPED = {
    "admin": "no admin endpoint (it would clash with the running one)",
    "pid_file": "no pid file",
    "user": "not dropping privileges",
    "group": "not dropping privileges",
    "watch_certs": "no certificate watching",
    "crl": "no CRL (device certificates come from the bench CA)",
    "allow": "no allow list (the load comes from 127.0.0.x)",
    "deny": "no deny list (the load comes from 127.0.0.x)",
    "max_conns_per_ip": "no per-address limit (the load comes from a few 127.0.0.x addresses)",
    "conn_rate_per_ip": "no per-address rate (the load comes from a few 127.0.0.x addresses)",
    "accept_proxy_protocol": "no PROXY header from a load balancer (the generator connects directly)",
    "trusted_proxies": "no PROXY header from a load balancer",
    "websocket": "plain MQTT over TLS instead of WebSocket (the generator speaks mqtts)",
    "ws_passthrough": "plain MQTT over TLS instead of WebSocket",
    "max_connections": "max_connections auto",
    "upstream_source": "the bench's broker on loopback",
    "named_upstream": "",
}


@dataclass
class Setup:
    """What is measured: the proxy's configuration and how the generator must talk to it."""
    raw: dict[str, Any]
    source: str                     # "throw-away PKI" or the user's file
    tls: bool
    mtls: bool
    verify_server: bool             # the server certificate is the bench's (the generator checks it)
    proxy_protocol: str
    keepalive: int
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    pythonpath: list[str] = field(default_factory=list)
    # source address x broker address pairs the proxy connects over, each good for one port
    # range of sessions; 0: a unix socket, no port limit
    upstream_paths: int = 1


def default_setup(pki: Pki) -> Setup:
    raw = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "client_ca": pki.ca_cert, "verify": "required",
           "idle_timeout": "keepalive", "access_log": "off"}
    s = Setup(raw=raw, source="built in (throw-away PKI, mutual TLS)", tls=True, mtls=True, verify_server=True,
              proxy_protocol="none", keepalive=KEEPALIVE_S)
    s.summary = {"tls": "TLS 1.2/1.3, ECDSA P-256 server certificate", "client_certificates": "required (ECDSA P-256)",
                 "identity_rules": "none", "proxy_protocol": "none", "policy": "none", "access_log": "off"}
    return s


def user_setup(path: str, pki: Pki) -> Setup:
    """The user's configuration, changed only where a bench must (each change is noted)."""
    from .config import load_config, load_file

    cfg = load_config(path)  # a configuration error names the user's file and key
    raw = load_file(path)
    base = os.path.dirname(os.path.abspath(path))
    listeners = raw.pop("listener", None)
    notes: list[str] = []
    if listeners:
        tls_ones = [i for i, lc in enumerate(cfg.listeners) if lc.tls]
        pick = tls_ones[0] if tls_ones else 0
        if len(listeners) > 1:
            notes.append(f"listener {pick} ({cfg.listeners[pick].name or 'unnamed'}) of {len(listeners)} measured")
        raw = {**raw, **listeners[pick]}
    lc = cfg.listeners[0] if not listeners else cfg.listeners[pick]
    for key in PATH_KEYS:
        if isinstance(raw.get(key), str) and not os.path.isabs(raw[key]):
            raw[key] = os.path.join(base, raw[key])
    for key, why in DROPPED.items():
        if key in raw:
            raw.pop(key)
            if why:
                notes.append(f"{key}: {why}")
    if "upstreams" in raw:
        notes.append("[upstreams]: every named upstream is the bench's broker")
    if isinstance(raw.get("upstream"), list) and len(raw["upstream"]) > 1:
        notes.append(f"upstream: one broker instead of the pool of {len(raw['upstream'])}")
    raw.pop("listen", None)
    raw.pop("name", None)
    if lc.tls and lc.client_ca:
        raw["client_ca"] = pki.ca_cert
        notes.append("client_ca: the bench CA (it mints a certificate per device, CN = ClientId)")
    pp = lc.proxy_protocol
    for sv in lc.servers:
        if sv.proxy_protocol and sv.proxy_protocol != "none":
            pp = sv.proxy_protocol
    if pp != lc.proxy_protocol:  # a server's own mode: the bench's one broker gets it
        raw["proxy_protocol"] = pp
        notes.append(f"proxy_protocol: {pp}, the mode of a server of the pool")
    # devices ping often enough for the configured idle limits
    limits = [t for t in (lc.idle_timeout if not lc.idle_keepalive else 0, lc.client_timeout) if t and t > 0]
    keepalive = max(1, min([KEEPALIVE_S] + [int(t / 2) for t in limits]))
    rules = [name for name, on in (("require_clientid_cn", lc.require_clientid_cn),
                                   ("require_username_cn", lc.require_username_cn),
                                   ("clientid_from_cn", lc.clientid_from_cn)) if on]
    if lc.clientid_template:
        rules.append(f"clientid_template = {lc.clientid_template!r}")
    s = Setup(raw=raw, source=os.path.abspath(path), tls=lc.tls, mtls=bool(lc.tls and lc.client_ca),
              verify_server=False, proxy_protocol=pp, keepalive=keepalive, notes=notes)
    s.summary = {
        "tls": (f"min {lc.tls_min_version}, certificate {os.path.basename(lc.tls_cert or '')}" if lc.tls else "off (plain TCP)"),
        "client_certificates": f"verify {lc.verify}" if lc.tls and lc.client_ca else "none",
        "identity_rules": ", ".join(rules) or "none",
        "proxy_protocol": pp,
        "policy": lc.policy or "none",
        "access_log": str(raw.get("access_log", cfg.access_log or "off")),
        "mqtt": "on" if lc.mqtt else "off",
    }
    s.pythonpath = [base]
    tcp_servers = sum(1 for sv in lc.servers if not sv.address.is_unix) if lc.servers else int(not lc.upstream.is_unix)
    s.upstream_paths = tcp_servers * max(1, len(lc.upstream_source))
    return s


class Proxy:
    """`fastproxy serve` with a Setup, on a free loopback port, in its own process group."""

    def __init__(self, setup: Setup, workdir: str, upstream: str, workers: int) -> None:
        self.setup, self.workdir, self.workers = setup, workdir, workers
        self.port = free_port()
        self.conf = os.path.join(workdir, "fastproxy.toml")
        self.err = os.path.join(workdir, "fastproxy.err")
        raw = dict(setup.raw)
        raw["listen"] = f"{HOST}:{self.port}"
        raw["upstream"] = upstream
        if "upstreams" in raw:
            raw["upstreams"] = {k: upstream for k in raw["upstreams"]}
        raw["workers"] = workers
        raw["error_log"] = self.err
        raw["drain_timeout"] = "1s"
        if raw.get("access_log", "-") != "off":
            raw["access_log"] = os.path.join(workdir, "access.log")  # the same work, not the user's file
        write_toml(self.conf, raw)
        from .config import load_config

        try:
            load_config(self.conf)
        except ConfigError as e:
            raise BenchError(f"the bench's version of the configuration is not valid: {e}") from None
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join([PKG_PARENT, *self.setup.pythonpath] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
        return e

    def start(self, timeout: float = 30.0) -> None:
        out = open(os.path.join(self.workdir, "fastproxy.out"), "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastproxy", "serve", "-c", self.conf],
                                     cwd=self.workdir, env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=out, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while not can_connect(HOST, self.port) or len(self.pids()) < 1 + (self.workers if self.workers > 1 else 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"fastproxy did not start: {_tail(self.err) or _tail(os.path.join(self.workdir, 'fastproxy.out'))}")
            time.sleep(0.05)
        time.sleep(0.2)  # workers finish their start-up (imports) before the baseline is read

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def memory(self) -> tuple[int, int]:
        return memory_kib(self.pids())

    def stop(self) -> None:
        stop(self.proc, twice=True)


# ----------------------------------------------------------------------------- generator processes


class Gen:
    """One generator process: `python -m fastproxy.bench _gen PARAMS`."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        env = dict(os.environ)
        env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it until the end
        self.proc = subprocess.Popen([sys.executable, "-m", "fastproxy.bench", "_gen", json.dumps(params)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.last: dict[str, int] = {}
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")

    def _take(self, line: str) -> str:
        word = line.split(" ", 1)[0]
        if word == "result":
            self.result = json.loads(line.split(" ", 1)[1])
        elif word == "error":
            self.error = line.split(" ", 1)[1] if " " in line else "unknown"
        else:
            self.last = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:] if "=" in kv)}
        return word

    def wait(self, phase: str, timeout: float, tick: Callable[[dict[str, int]], None] | None = None) -> bool:
        """Until a line of this phase (or the result); False at the timeout or the process's end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line == "":
                self.lines.put("")  # keep the end visible to later waits
                return False
            word = self._take(line)
            if tick and self.last:
                tick(self.last)
            if word == phase or word in ("result", "error"):
                return word == phase
        return False

    def finish(self, timeout: float) -> dict[str, Any]:
        """Stop holding (stdin EOF) and return the result dict."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while self.result is None and self.error is None and time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line == "":
                break
            self._take(line)
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
        if self.result is None:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace").strip()[-500:]
            raise BenchError(f"the load generator failed: {self.error or tail or 'no result'}")
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=5)


def _gen_main(argv: list[str]) -> int:
    """The generator process: runs one scenario; stdin EOF stops an idle hold."""
    from . import _loadgen

    params = json.loads(argv[0])
    raise_nofile()
    hold = params.pop("hold", False)
    try:
        r = _loadgen.run(params.pop("scenario"), stop_fd=0 if hold else -1, notify_fd=1, **params)
    except BenchError as e:
        print(f"error {e}", flush=True)
        return 2
    print("result " + json.dumps(r), flush=True)
    return 0
