"""Shared helpers for the functional tests: certificates, ports, processes, raw MQTT, clients.

Everything here talks to real processes over loopback only (127.0.0.1, ::1, unix sockets).
Every wait is bounded in time; nothing here mocks a socket.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import queue
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent

# The access-log line of docs/CONTRACT.md:
# $remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time $reason $clientid $cn
ACCESS_RE = re.compile(
    r"^(?P<remote>\S+) "
    r"\[(?P<time>\d{2}/(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "
    r"(?P<protocol>TCP|TLSv1\.2|TLSv1\.3|TLS) "
    r"(?P<status>\d{3}) "
    r"(?P<sent>\d+) "
    r"(?P<received>\d+) "
    r"(?P<time_s>\d+\.\d{3}) "
    r"(?P<reason>[a-z0-9-]+) "
    r"(?P<clientid>\S+) "
    r"(?P<cn>\S+)$"
)

STATUS_REASONS = {
    "200": {"ok", "idle-timeout", "client-reset", "upstream-reset", "client-timeout"},
    "400": {"tls-handshake-failed", "tls-handshake-timeout", "ws-bad-request", "ws-protocol-error"},
    "403": {"denied", "address-denied", "ws-origin-denied"},
    "404": {"ws-not-found"},
    "426": {"ws-upgrade-required"},
    "429": {"too-many-connections", "rate-limited", "reconnect-too-fast"},
    "500": {"internal-error"},
    "502": {"upstream-refused", "upstream-unreachable", "upstream-down"},
    "503": {"shutdown", "no-server", "no-source-port"},
    "504": {"upstream-timeout", "policy-timeout", "server-timeout"},
}


@dataclass
class AccessLine:
    raw: str
    remote: str
    time: str
    protocol: str
    status: int
    sent: int
    received: int
    session_time: float
    reason: str
    clientid: str
    cn: str


def parse_access_line(line: str) -> AccessLine:
    m = ACCESS_RE.match(line)
    if not m:
        raise AssertionError(f"access-log line does not match the contract format: {line!r}")
    return AccessLine(
        raw=line,
        remote=m["remote"],
        time=m["time"],
        protocol=m["protocol"],
        status=int(m["status"]),
        sent=int(m["sent"]),
        received=int(m["received"]),
        session_time=float(m["time_s"]),
        reason=m["reason"],
        clientid=m["clientid"],
        cn=m["cn"],
    )


# ----------------------------------------------------------------------------- waiting


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll pred() until it is truthy (returned) or timeout seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def raise_nofile(n: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (to n, or to the hard limit). Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if n is None else (min(n, hard) if hard != resource.RLIM_INFINITY else n)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _preexec_raise_nofile() -> None:  # runs in the child between fork and exec
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except Exception:
        pass


# ----------------------------------------------------------------------------- ports


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago on host (bind to 0, read it, close)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_net_listening_ports() -> set[int]:
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def port_is_listening(port: int) -> bool:
    """True if some socket is in LISTEN state on port (no connection is made, so nothing is logged)."""
    return port in _proc_net_listening_ports()


def can_connect(host: str, port: int, timeout: float = 0.5) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None,
              diag: Callable[[], str] | None = None, connect: bool = True) -> None:
    """Wait until host:port accepts TCP (connect=True) or is in LISTEN state (connect=False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process {proc.args!r} exited with {proc.returncode} before port {port} was ready\n"
                + (diag() if diag else "")
            )
        ok = can_connect(host, port) if connect else port_is_listening(port)
        if ok:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {host}:{port} not ready after {timeout}s\n" + (diag() if diag else ""))


# ----------------------------------------------------------------------------- processes


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Send sig, wait up to timeout, then SIGKILL (bounded). Returns the exit status."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    return proc.returncode


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is pid (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        # the command name can hold spaces and parentheses: split after the last ')'
        rest = data.rsplit(")", 1)[1].split()
        if int(rest[1]) == pid:
            out.append(int(d))
    return out


def descendants(pid: int) -> set[int]:
    """Every process below pid (children, their children...)."""
    out, todo = set(), [pid]
    while todo:
        for c in children_of(todo.pop()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


CONFIG_ERROR = "fastproxy: configuration error: "


def one_error_line(r) -> str:
    """A CLI run refused as the contract says: exit 2, no traceback, exactly one non-empty
    stderr line starting with CONFIG_ERROR. Returns that line."""
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    assert lines[0].startswith(CONFIG_ERROR), lines[0]
    return lines[0]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def listening_pids(port: int) -> set[int]:
    """PIDs holding a listening TCP socket on port (via `ss -tlnpH`)."""
    r = subprocess.run(["ss", "-tlnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    return {int(p) for p in re.findall(r"pid=(\d+)", r.stdout)}


# ----------------------------------------------------------------------------- certificates


@dataclass
class Certs:
    dir: Path
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    server_key_encrypted: str
    server_key_password: str
    other_key: str  # a valid key that does not match server_cert
    client_cert: str  # CN=thing001, signed by the CA
    client_key: str
    rogue_ca_cert: str
    rogue_client_cert: str  # CN=thing001, signed by an untrusted CA
    rogue_client_key: str
    expired_client_cert: str  # CN=thing001, signed by the CA, expired
    expired_client_key: str
    garbage_pem: str  # not a certificate


def make_certs(directory: Path) -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str, org: str = "fastproxy tests"):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(k, fname: str, password: bytes | None = None) -> str:
        enc = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
        p = directory / fname
        p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
        os.chmod(p, 0o600)
        return str(p)

    def write_cert(c, fname: str) -> str:
        p = directory / fname
        p.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return str(p)

    def make_ca(cn: str):
        k = key()
        c = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
            .sign(k, hashes.SHA256())
        )
        return k, c

    def leaf(ca_key, ca_cert, cn: str, *, server: bool, not_before=None, not_after=None):
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or (now - _dt.timedelta(days=1)))
            .not_valid_after(not_after or (now + _dt.timedelta(days=825)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        return k, b.sign(ca_key, hashes.SHA256())

    ca_k, ca_c = make_ca("fastproxy test CA")
    rogue_ca_k, rogue_ca_c = make_ca("untrusted test CA")
    srv_k, srv_c = leaf(ca_k, ca_c, "localhost", server=True)
    cli_k, cli_c = leaf(ca_k, ca_c, "thing001", server=False)
    rog_k, rog_c = leaf(rogue_ca_k, rogue_ca_c, "thing001", server=False)
    exp_k, exp_c = leaf(
        ca_k, ca_c, "thing001", server=False,
        not_before=now - _dt.timedelta(days=30), not_after=now - _dt.timedelta(days=1),
    )
    password = "correct horse battery staple"
    garbage = directory / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")

    return Certs(
        dir=directory,
        ca_cert=write_cert(ca_c, "ca.crt"),
        ca_key=write_key(ca_k, "ca.key"),
        server_cert=write_cert(srv_c, "server.crt"),
        server_key=write_key(srv_k, "server.key"),
        server_key_encrypted=write_key(srv_k, "server-encrypted.key", password.encode()),
        server_key_password=password,
        other_key=write_key(key(), "other.key"),
        client_cert=write_cert(cli_c, "thing001.crt"),
        client_key=write_key(cli_k, "thing001.key"),
        rogue_ca_cert=write_cert(rogue_ca_c, "rogue-ca.crt"),
        rogue_client_cert=write_cert(rog_c, "rogue-thing001.crt"),
        rogue_client_key=write_key(rog_k, "rogue-thing001.key"),
        expired_client_cert=write_cert(exp_c, "expired-thing001.crt"),
        expired_client_key=write_key(exp_k, "expired-thing001.key"),
        garbage_pem=str(garbage),
    )


def client_context(certs: Certs, *, min_version: ssl.TLSVersion | None = None,
                   max_version: ssl.TLSVersion | None = None, alpn: Sequence[str] | None = None,
                   cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs.ca_cert)
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


# ----------------------------------------------------------------------------- raw MQTT


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, *, keepalive: int = 0, clean: bool = True, version: int = 4) -> bytes:
    """CONNECT for MQTT 3.1.1 (version=4) or 5 (version=5), no will, no credentials."""
    flags = 0x02 if clean else 0
    vh = _str("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        vh += b"\x00"  # no properties
    body = vh + _str(client_id)
    return b"\x10" + varint(len(body)) + body


def subscribe_packet(mid: int, topic: str, qos: int = 0, version: int = 4) -> bytes:
    body = struct.pack("!H", mid) + (b"\x00" if version == 5 else b"") + _str(topic) + bytes([qos])
    return b"\x82" + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, mid: int = 1, version: int = 4) -> bytes:
    body = _str(topic) + (struct.pack("!H", mid) if qos else b"") + (b"\x00" if version == 5 else b"") + payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body


PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_packet(sock: socket.socket) -> tuple[int, int, bytes]:
    """One MQTT packet: (type, flags, body). Uses the socket's own timeout."""
    h = recv_exact(sock, 1)[0]
    length, mult = 0, 1
    for _ in range(4):
        b = recv_exact(sock, 1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return h >> 4, h & 0x0F, recv_exact(sock, length)


def open_socket(port: int, *, host: str = HOST, tls_ctx: ssl.SSLContext | None = None,
                server_hostname: str | None = None, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    if tls_ctx is not None:
        try:
            s = tls_ctx.wrap_socket(s, server_hostname=server_hostname or host)
        except BaseException:
            s.close()
            raise
    return s


def mqtt_handshake(sock: socket.socket, client_id: str, *, keepalive: int = 0, version: int = 4) -> int:
    """Send CONNECT, read CONNACK; returns the return/reason code."""
    sock.sendall(connect_packet(client_id, keepalive=keepalive, version=version))
    ptype, _, body = read_packet(sock)
    assert ptype == 2, f"expected CONNACK, got packet type {ptype}"
    return body[1]


def ping_ok(sock: socket.socket, timeout: float = 5.0) -> bool:
    """PINGREQ through the session; True if exactly a PINGRESP comes back."""
    sock.settimeout(timeout)
    try:
        sock.sendall(PINGREQ)
        return recv_exact(sock, 2) == PINGRESP
    except (OSError, ConnectionError):
        return False


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes, float]:
    """Read until EOF/reset or timeout. Returns (closed, bytes_read, seconds_waited)."""
    t0 = time.monotonic()
    got = bytearray()
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, bytes(got), time.monotonic() - t0
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False, bytes(got), time.monotonic() - t0
        except ssl.SSLWantReadError:
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            return True, bytes(got), time.monotonic() - t0
        if not chunk:
            return True, bytes(got), time.monotonic() - t0
        got += chunk


# ----------------------------------------------------------------------------- paho clients


class PahoClient:
    """A paho-mqtt 2.x client with a message queue and bounded waits."""

    def __init__(self, port: int, *, client_id: str, version: int = 4, tls: bool = False,
                 certs: Certs | None = None, host: str = HOST, certfile: str | None = None,
                 keyfile: str | None = None, keepalive: int = 60) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.mqtt = mqtt
        self.host, self.port, self.keepalive, self.version = host, port, keepalive, version
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
        self.client.max_inflight_messages_set(50)
        if tls:
            assert certs is not None
            self.client.tls_set(ca_certs=certs.ca_cert, certfile=certfile, keyfile=keyfile)
        self.messages: "queue.Queue" = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_rc = None
        self.connect_props = None
        self._subacks: dict[int, list] = {}
        self._sub_cv = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_rc = reason_code
        self.connect_props = properties
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put(msg)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._sub_cv:
            self._subacks[mid] = list(reason_codes)
            self._sub_cv.notify_all()

    def connect(self, timeout: float = 10.0, **kw) -> "PahoClient":
        if self.version == 5:
            kw.setdefault("clean_start", True)
        self.client.connect(self.host, self.port, keepalive=self.keepalive, **kw)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise AssertionError(f"no CONNACK within {timeout}s through {self.host}:{self.port}")
        assert not self.connect_rc.is_failure, f"CONNACK refused: {self.connect_rc}"
        return self

    def subscribe(self, topic: str, qos: int = 0, timeout: float = 10.0) -> list:
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == self.mqtt.MQTT_ERR_SUCCESS, rc
        with self._sub_cv:
            ok = self._sub_cv.wait_for(lambda: mid in self._subacks, timeout)
        assert ok, f"no SUBACK for {topic} within {timeout}s"
        codes = self._subacks[mid]
        assert all(not c.is_failure for c in codes), codes
        return codes

    def publish(self, topic: str, payload: bytes, qos: int = 0, timeout: float = 10.0, wait: bool = True, **kw):
        info = self.client.publish(topic, payload, qos=qos, **kw)
        if wait and qos > 0:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"publish of mid {info.mid} not acknowledged within {timeout}s"
        return info

    def collect(self, n: int, timeout: float = 20.0) -> list:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        try:
            if self.connected.is_set() and not self.disconnected.is_set():
                self.client.disconnect()
                self.disconnected.wait(3)
        finally:
            self.client.loop_stop()


# ----------------------------------------------------------------------------- mosquitto clients


def mosq_conn_args(port: int, certs: Certs | None, *, host: str = HOST) -> list[str]:
    args = ["-h", host, "-p", str(port)]
    if certs is not None:
        args += ["--cafile", certs.ca_cert]
    return args


class MosqSub:
    """`mosquitto_sub` in the background; wait_subscribed() reads the broker's log."""

    def __init__(self, port: int, certs: Certs | None, topic: str, *, count: int, qos: int = 0,
                 client_id: str, version: str | None = None, timeout: int = 30, extra: Sequence[str] = ()) -> None:
        self.client_id = client_id
        cmd = ["mosquitto_sub", *mosq_conn_args(port, certs), "-t", topic, "-C", str(count), "-W", str(timeout),
               "-q", str(qos), "-i", client_id, *extra]
        if version:
            cmd += ["-V", version]
        self.cmd = cmd
        self.timeout = timeout
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def wait_subscribed(self, broker_log: Callable[[], str], timeout: float = 10.0) -> None:
        needle = f"Received SUBSCRIBE from {self.client_id}"

        def ready():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"mosquitto_sub exited early ({self.proc.returncode}): {out!r} {err!r}")
            return needle in broker_log()

        wait_until(ready, timeout, what=f"mosquitto_sub {self.client_id} to subscribe")

    def result(self, timeout: float | None = None) -> tuple[int, bytes, bytes]:
        try:
            out, err = self.proc.communicate(timeout=timeout or self.timeout + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=5)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=5)


def mosquitto_pub(port: int, certs: Certs | None, topic: str, *, messages: Sequence[str] | None = None,
                  message: str | None = None, qos: int = 0, client_id: str = "mpub", version: str | None = None,
                  extra: Sequence[str] = (), timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Publish with `mosquitto_pub`: one message (-m) or several lines (-l from stdin)."""
    cmd = ["mosquitto_pub", *mosq_conn_args(port, certs), "-t", topic, "-q", str(qos), "-i", client_id, *extra]
    if version:
        cmd += ["-V", version]
    inp = None
    if messages is not None:
        cmd.append("-l")
        inp = ("\n".join(messages) + "\n").encode()
    else:
        cmd += ["-m", message if message is not None else ""]
    return subprocess.run(cmd, input=inp, capture_output=True, timeout=timeout)


# ----------------------------------------------------------------------------- the CLI


def proxy_env(env: dict | None = None) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    if env:
        e.update(env)
    return e


def run_cli(*args: str, timeout: float = 30.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m fastproxy ARGS` to completion (bounded) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "fastproxy", *args],
        cwd=str(REPO),
        env=proxy_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,  # no controlling terminal: a passphrase prompt cannot block
    )


# ----------------------------------------------------------------------------- device identity
# (appended for tests/test_identity.py, tests/test_mqtt_gate.py, tests/test_policy.py)


@dataclass
class IdentityCerts:
    """More client certificates signed by the test CA of make_certs (all with clientAuth)."""

    dir: Path
    sensor_cert: str  # CN=sensor-7; SAN DNS a.sensor-7.example, b.sensor-7.example; email; URI
    sensor_key: str
    sensor_dns: tuple[str, ...]
    sensor_email: str
    sensor_uri: str
    thing002_cert: str  # CN=thing002
    thing002_key: str
    nocn_cert: str  # subject O only, no CN
    nocn_key: str
    twocn_cert: str  # subject O, CN=admin, CN=thing001: two CNs, so no identity
    twocn_key: str


def make_identity_certs(certs: Certs, directory: Path) -> IdentityCerts:
    """Issue the extra client certificates with the CA of `certs` (same style as make_certs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_cert = x509.load_pem_x509_certificate(Path(certs.ca_cert).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(certs.ca_key).read_bytes(), password=None)

    def issue(fname: str, cn: str | list[str] | None, sans: list | None = None) -> tuple[str, str]:
        k = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastproxy tests")]
        for one in [cn] if isinstance(cn, str) else cn or []:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, one))
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        c = b.sign(ca_key, hashes.SHA256())
        cert_p, key_p = directory / f"{fname}.crt", directory / f"{fname}.key"
        cert_p.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        key_p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        os.chmod(key_p, 0o600)
        return str(cert_p), str(key_p)

    dns = ("a.sensor-7.example", "b.sensor-7.example")
    email, uri = "sensor-7@devices.example", "urn:dev:sensor-7"
    sensor = issue("sensor-7", "sensor-7", [x509.DNSName(d) for d in dns]
                   + [x509.RFC822Name(email), x509.UniformResourceIdentifier(uri)])
    thing002 = issue("thing002", "thing002")
    nocn = issue("nocn", None)
    twocn = issue("twocn", ["admin", "thing001"])
    return IdentityCerts(directory, sensor[0], sensor[1], dns, email, uri, thing002[0], thing002[1], nocn[0], nocn[1],
                         twocn[0], twocn[1])


def cert_der(pem_path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())


@dataclass
class ConnectOutcome:
    """What a raw client saw after sending its first bytes (see try_connect)."""

    connack: bytes | None  # the whole CONNACK packet, None if none came
    closed: bool  # the proxy closed the connection (EOF, reset or TLS alert) within the timeout
    local_port: int  # the client's source port (the proxy logs ADDR:PORT)
    error: str | None = None  # handshake / socket error, if any

    @property
    def code(self) -> int | None:
        """The CONNACK return code (3.x) / reason code (5.0), or None without a CONNACK."""
        return None if self.connack is None else self.connack[3]


def _read_one_packet(sock: socket.socket, timeout: float) -> tuple[bytes | None, str]:
    """The first MQTT packet (raw), or None with 'eof' / 'error: ...' / 'timeout'."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if len(buf) >= 2:
            length, mult, i = 0, 1, 1
            complete_header = False
            while i < len(buf) and i <= 4:
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    complete_header = True
                    break
            if complete_header and len(buf) >= i + length:
                return bytes(buf[: i + length]), "packet"
        left = deadline - time.monotonic()
        if left <= 0:
            return None, "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return None, "timeout"
        except ssl.SSLWantReadError:
            continue
        except (ssl.SSLError, OSError) as e:
            return None, f"error: {e!r}"
        if not chunk:
            return None, "eof"
        buf += chunk


def try_connect(port: int, first_bytes: bytes, *, tls_ctx: ssl.SSLContext | None = None,
                timeout: float = 10.0, split: bool = False) -> ConnectOutcome:
    """Open a connection (TLS when tls_ctx), send first_bytes (all at once, or one byte per
    write with TCP_NODELAY when split), read the answer: a CONNACK with code 0 is followed by
    DISCONNECT; any other outcome waits (bounded) for the proxy to close."""
    try:
        s = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as e:
        return ConnectOutcome(None, True, 0, f"connect: {e!r}")
    local = s.getsockname()[1]
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_ctx is not None:
            try:
                s = tls_ctx.wrap_socket(s, server_hostname=HOST)
            except (ssl.SSLError, OSError) as e:
                return ConnectOutcome(None, True, local, f"handshake: {e!r}")
        try:
            if split:
                for i in range(len(first_bytes)):
                    s.sendall(first_bytes[i:i + 1])
                    time.sleep(0.005)
            else:
                s.sendall(first_bytes)
        except (ssl.SSLError, OSError) as e:
            # the proxy may refuse (and close) before everything was sent
            pkt, how = _read_one_packet(s, 1.0)
            return ConnectOutcome(pkt if pkt and pkt[0] == 0x20 else None, True, local, f"send: {e!r}")
        pkt, how = _read_one_packet(s, timeout)
        if pkt is not None and pkt[0] == 0x20 and pkt[3] == 0:
            try:
                s.sendall(DISCONNECT)  # the broker then closes, and so does the proxy
                wait_closed(s, timeout)
            except OSError:
                pass
            return ConnectOutcome(pkt, False, local)
        if pkt is None:
            return ConnectOutcome(None, how != "timeout", local, None if how in ("eof", "timeout") else how)
        closed, _, _ = wait_closed(s, timeout)
        return ConnectOutcome(pkt, closed, local)
    finally:
        s.close()


NEW_CONNECTION_RE = re.compile(r"New connection from \S+")
NEW_CLIENT_RE = re.compile(r"New client connected from \S+ as (\S*) \(")


def broker_connections(log: str) -> int:
    """How many TCP connections Mosquitto accepted, from its log."""
    return len(NEW_CONNECTION_RE.findall(log))


def broker_client_ids(log: str) -> list[str]:
    """ClientIds of the clients Mosquitto accepted ("New client connected from ... as ID (...)")."""
    return NEW_CLIENT_RE.findall(log)


class ThreadedServer:
    """A small threaded test server on loopback (IPv4 or IPv6, by `host`) or on a unix socket
    (`path`): it listens at once, accepts in a daemon thread (`.thread`) that looks at its stop flag
    every `poll` seconds, and serves each connection in a daemon thread of its own.

    Subclasses set up their own fields, then call `super().__init__(...)` (which starts accepting),
    and implement `handle(conn, peer, state)`; `on_accept(peer)` runs in the accept thread, in
    accept order, before the connection's thread starts, and its result is `state` (bookkeeping
    whose order matters goes there). `close()` stops accepting and joins the accept thread (and,
    with `join_sessions`, each connection's thread) for a bounded time; `self._stop` is set from
    then on, for sessions that poll it."""

    def __init__(self, host: str = HOST, *, path: str | None = None, backlog: int = 16, poll: float = 0.2,
                 join_timeout: float = 5.0, join_sessions: float | None = None) -> None:
        if path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.host = host
        self.path = path
        self.port: int = 0 if path else self.sock.getsockname()[1]
        self._poll = poll
        self._join_timeout = join_timeout
        self._join_sessions = join_sessions
        self._stop = threading.Event()
        self._session_threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def upstream(self) -> str:
        """The server as an `--upstream` value."""
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def on_accept(self, peer) -> object:
        return None

    def handle(self, conn: socket.socket, peer, state) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        self.sock.settimeout(self._poll)
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            state = self.on_accept(peer)
            t = threading.Thread(target=self.handle, args=(conn, peer, state), daemon=True)
            if self._join_sessions is not None:
                self._session_threads.append(t)
            t.start()

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        self.thread.join(self._join_timeout)
        if self._join_sessions is not None:
            for t in self._session_threads:
                t.join(self._join_sessions)


class EchoServer(ThreadedServer):
    """A loopback TCP server that echoes every byte back (not MQTT); counts its connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.received = bytearray()
        super().__init__()

    def on_accept(self, peer) -> None:
        self.accepted += 1

    def handle(self, conn: socket.socket, peer, state) -> None:
        conn.settimeout(30)
        with conn:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    self.received += data
                    conn.sendall(data)
            except OSError:
                return


class FakeBroker(ThreadedServer):
    """A loopback 'broker' that answers CONNECT with CONNACK 0 (in the client's version),
    PINGREQ with PINGRESP, never closes on its own and never times anyone out; keeps what
    each connection sent. For timing tests where Mosquitto's own keepalive would interfere."""

    def __init__(self) -> None:
        self.conns: list[bytearray] = []
        super().__init__()

    def on_accept(self, peer) -> bytearray:
        got = bytearray()
        self.conns.append(got)
        return got

    def handle(self, conn: socket.socket, peer, got: bytearray) -> None:
        conn.settimeout(60)
        with conn:
            try:
                first = True
                while not self._stop.is_set():
                    ptype, flags, body = read_packet(conn)
                    raw = bytes([ptype << 4 | flags]) + varint(len(body)) + body
                    got += raw
                    if first and ptype == 1:
                        level = body[2 + body[1]] if len(body) > 2 else 4
                        conn.sendall(b"\x20\x03\x00\x00\x00" if level == 5 else b"\x20\x02\x00\x00")
                    elif ptype == 12:
                        conn.sendall(b"\xd0\x00")
                    elif ptype == 14:
                        return
                    first = False
            except (OSError, ConnectionError):
                return


def paho_connack(port: int, certs: Certs, client_id: str, *, version: int = 4, certfile: str | None = None,
                 keyfile: str | None = None, username: str | None = None, password: str | None = None,
                 timeout: float = 10.0) -> int | None:
    """Connect once with paho-mqtt (no retry, no reconnect) and return the CONNACK code it read:
    the 3.1.1 return code for version 4, the 5.0 reason code for version 5; None without one."""
    import warnings

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: dict = {}
    done = threading.Event()

    # Callback API version 1 hands MQTT 3.1.1 clients the raw CONNACK return code (version 2
    # converts it to a 5.0 reason code).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        c = mqtt.Client(CallbackAPIVersion.VERSION1, client_id=client_id,
                        protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311, reconnect_on_failure=False)

    def on_connect(client, userdata, flags, rc, properties=None):
        got["rc"] = rc.value if hasattr(rc, "value") else int(rc)
        done.set()

    def on_disconnect(client, userdata, *args):
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.tls_set(ca_certs=certs.ca_cert, certfile=certfile, keyfile=keyfile)
    if username is not None:
        c.username_pw_set(username, password)
    try:
        c.connect(HOST, port, keepalive=30)
    except (ssl.SSLError, OSError):
        return None
    c.loop_start()
    try:
        done.wait(timeout)
        if got.get("rc") == 0:
            c.disconnect()
    finally:
        c.loop_stop()
    return got.get("rc")
