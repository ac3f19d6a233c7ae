"""Helpers shared by the end-to-end benchmark (benchmarks/e2e.py), its load generators and
benchmarks/bench_health.py.

Everything here is loopback-only and bounded: every wait has a deadline, every process that is
started through `Procs` runs in its own session (process group) and is stopped by `Procs.stop_all`.

Measuring a proxy: each proxy is started with `start_new_session=True`, so its process group id
is its pid and every process it forks (nginx's worker, fastproxy's workers) stays in that group.
`group_cpu()` sums CPU time over all processes of the group, `group_rss_kib()` sums VmRSS,
`group_fd_count()` their open descriptors.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Iterable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# TLS 1.3 for every proxy, one cipher suite for all (OpenSSL's first default preference).
TLS13_SUITE = "TLS_AES_256_GCM_SHA384"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def file_tail(path: str, n: int = 600) -> str:
    """The last n bytes of a (log) file on one line, for an error message; "(no log)" without it."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode(errors="replace").strip().replace("\n", " | ")
    except OSError:
        return "(no log)"


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM raises KeyboardInterrupt (in the main thread), so that cleanups run."""

    def on_signal(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)


# --------------------------------------------------------------------------- ports, limits


def comma_choices(parser, flag: str, text: str, choices: Sequence[str], what: str) -> list[str]:
    """A comma-separated option value whose items must be among choices (parser.error if not)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    for x in items:
        if x not in choices:
            parser.error(f"{flag}: unknown {what} {x!r} (choose from {', '.join(choices)})")
    return items


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (the usual bind-to-0 race applies; ports are used at once)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until host:port accepts a TCP connection; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before {host}:{port} was open")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s ({last})")


def nofile_target() -> int:
    """The RLIMIT_NOFILE every process we start gets: the hard limit, capped at 65536.

    (The hard limit is not raised: containers often lack CAP_SYS_RESOURCE even as root.)"""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 65536 if hard == resource.RLIM_INFINITY or hard > 65536 else hard


def raise_nofile() -> None:
    """preexec_fn: raise the soft RLIMIT_NOFILE of the child to nofile_target()."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile_target(), hard))
    except (ValueError, OSError):
        pass


# --------------------------------------------------------------------------- processes


class Procs:
    """Starts processes in their own session and guarantees they are stopped.

    Only the process groups created here are ever signalled (by their id)."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: str | None = None,
        stdin: int | IO | None = subprocess.DEVNULL,
        stdout: int | IO | None = None,
        env: dict | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen:
        out: int | IO | None
        logf = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            out = stdout if stdout is not None else logf
            p = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=out,
                stderr=logf,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=raise_nofile,
                close_fds=True,
            )
        finally:
            if log_path:
                logf.close()  # type: ignore[union-attr]
        self._procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after `timeout`; always reaps."""
        if p.poll() is None:
            _killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        # leftovers of the group (e.g. an nginx worker whose master died first)
        if group_pids(p.pid):
            _killpg(p.pid, signal.SIGKILL)
            t_end = time.monotonic() + 2
            while group_pids(p.pid) and time.monotonic() < t_end:
                time.sleep(0.02)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._procs = [(n, q) for n, q in self._procs if q is not p]
        return p.returncode

    def stop_all(self) -> None:
        for _, p in reversed(list(self._procs)):
            try:
                self.stop(p, timeout=3)
            except Exception as e:  # pragma: no cover - best effort at exit
                log(f"warning: stopping pid {p.pid}: {e}")


def stop_and_clean(procs: Procs, tmp: str, keep_tmp: bool) -> None:
    """The end of a benchmark run: stop every process of `procs`, then remove the scratch
    directory `tmp` (or, with keep_tmp, say where it is)."""
    procs.stop_all()
    if keep_tmp:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- /proc accounting


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces/parentheses: split after the last ')'
    rest = data[data.rindex(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def group_pids(pgid: int) -> list[int]:
    """All live (non-zombie) processes whose process group is `pgid`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(name)
        if f is None or f[0] == "Z":
            continue
        if int(f[2]) == pgid:  # field 5: pgrp
            out.append(int(name))
    return out


@dataclass
class CpuSample:
    ticks: int  # utime+stime of the processes (all their threads, dead ones included), clock ticks
    sched_ns: int  # sum of /proc/<pid>/task/*/schedstat on-CPU time (ns resolution, live threads)
    pids: tuple[int, ...]

    @property
    def tick_s(self) -> float:
        return self.ticks / CLK_TCK


def group_cpu(pgid: int) -> CpuSample:
    ticks = 0
    sched = 0
    pids = group_pids(pgid)
    for pid in pids:
        f = _stat_fields(pid)
        if f is None:
            continue
        ticks += int(f[11]) + int(f[12])  # fields 14, 15: utime, stime
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as sf:
                    sched += int(sf.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return CpuSample(ticks, sched, tuple(pids))


def cpu_delta_s(a: CpuSample, b: CpuSample) -> tuple[float, float]:
    """(seconds from utime+stime, seconds from schedstat).

    Both count the same thing (on-CPU time of the group); utime+stime has a 1/CLK_TCK (10 ms)
    resolution, schedstat nanoseconds. The benchmark reports the schedstat figure when the two
    agree within the tick resolution and the utime+stime figure otherwise (e.g. when a thread
    exited during the measurement, which schedstat of live tasks would miss)."""
    return (b.ticks - a.ticks) / CLK_TCK, (b.sched_ns - a.sched_ns) / 1e9


def best_cpu_s(a: CpuSample, b: CpuSample) -> float:
    ticks_s, sched_s = cpu_delta_s(a, b)
    if set(a.pids) == set(b.pids) and sched_s > 0 and abs(sched_s - ticks_s) <= 2.0 / CLK_TCK + 0.05 * ticks_s:
        return sched_s
    return ticks_s


def group_rss_kib(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def group_fd_count(pgid: int) -> int:
    """Open file descriptors summed over the processes of the group (/proc/<pid>/fd entries)."""
    total = 0
    for pid in group_pids(pgid):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def cpu_busy_fraction(window: float = 0.5) -> float:
    """Fraction of all CPUs busy over `window` seconds (from /proc/stat): a check that the machine
    is otherwise idle before a round (the benchmark's own broker and sink are idle then)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v[:8]), idle  # user..steal (guest is already included in user)

    t0, i0 = sample()
    time.sleep(window)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0


def system_busy_s() -> float:
    """CPU seconds all CPUs have been busy since boot (/proc/stat user..steal, without idle/iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def own_cpu_s(pgids: Iterable[int]) -> float:
    """CPU seconds of this process, of its reaped children (os.times), and of the live process groups
    `pgids` (the broker, the proxy, ...). system_busy_s() minus this, over a measurement, is the CPU
    used by everything else on the machine (plus the part of our own loopback networking that the
    kernel does not charge to a process, a roughly constant share)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(group_cpu(g).tick_s for g in pgids)


# --------------------------------------------------------------------------- statistics


def median(xs: Iterable[float]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an already sorted sequence."""
    if not sorted_xs:
        raise ValueError("empty")
    k = max(0, min(len(sorted_xs) - 1, int(round(p / 100.0 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[k]


# --------------------------------------------------------------------------- certificates


@dataclass
class Certs:
    dir: str
    ca: str
    server_crt: str
    server_key: str
    server_combined: str  # crt + key, for HAProxy's `crt`
    client_crt: str
    client_key: str


def gen_certs(d: str) -> Certs:
    """CA, ECDSA P-256 server cert (localhost, 127.0.0.1, ::1), client cert CN=bench; all PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastproxy bench"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("fastproxy bench CA")).issuer_name(name("fastproxy bench CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, san: list | None, eku) -> tuple[bytes, bytes]:
        k = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        c = b.sign(ca_key, hashes.SHA256())
        return c.public_bytes(serialization.Encoding.PEM), key_pem(k)

    srv_crt, srv_key = leaf("localhost", [x509.DNSName("localhost"),
                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                          x509.IPAddress(ipaddress.ip_address("::1"))],
                            ExtendedKeyUsageOID.SERVER_AUTH)
    cli_crt, cli_key = leaf("bench", None, ExtendedKeyUsageOID.CLIENT_AUTH)

    os.makedirs(d, exist_ok=True)
    paths = Certs(d, *(os.path.join(d, n) for n in ("ca.crt", "server.crt", "server.key", "server-combined.pem",
                                                     "client.crt", "client.key")))
    files = {paths.ca: ca_cert.public_bytes(serialization.Encoding.PEM), paths.server_crt: srv_crt,
             paths.server_key: srv_key, paths.server_combined: srv_crt + srv_key,
             paths.client_crt: cli_crt, paths.client_key: cli_key}
    for p, data in files.items():
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if p.endswith((".key", ".pem")) else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return paths


def client_ssl_context(ca: str, cert: str, key: str):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = True
    return ctx


# --------------------------------------------------------------------------- MQTT 3.1.1 packets


def mqtt_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def mqtt_connect(client_id: str, keepalive: int = 3600) -> bytes:
    body = mqtt_str("MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big") + mqtt_str(client_id)
    return b"\x10" + mqtt_varint(len(body)) + body


def mqtt_subscribe(packet_id: int, topic: str) -> bytes:
    body = packet_id.to_bytes(2, "big") + mqtt_str(topic) + b"\x00"
    return b"\x82" + mqtt_varint(len(body)) + body


def mqtt_publish_header(topic: str, payload_len: int) -> bytes:
    t = mqtt_str(topic)
    return b"\x30" + mqtt_varint(len(t) + payload_len) + t


MQTT_DISCONNECT = b"\xe0\x00"
MQTT_CONNACK_OK = b"\x20\x02\x00\x00"


class MqttReader:
    """Incremental MQTT packet splitter: feed bytes, get (first_byte, body) tuples."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while True:
            b = self.buf
            if len(b) < 2:
                return out
            mult, n, i = 1, 0, 1
            while True:
                if i >= len(b):
                    return out
                c = b[i]
                n += (c & 0x7F) * mult
                mult *= 128
                i += 1
                if not c & 0x80:
                    break
                if i > 4:
                    raise ValueError("malformed MQTT remaining length")
            if len(b) < i + n:
                return out
            out.append((b[0], bytes(b[i : i + n])))
            del b[: i + n]


# --------------------------------------------------------------------------- environment


def _first_line(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
        text = (r.stdout + r.stderr).strip()
        return text.splitlines()[0] if text else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def environment() -> dict:
    import platform
    import ssl

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "python_openssl": ssl.OPENSSL_VERSION,
        "openssl": _first_line(["openssl", "version"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
        "mosquitto": _first_line(["mosquitto", "-h"]),
        "clk_tck": CLK_TCK,
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }
