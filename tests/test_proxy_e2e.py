"""PROXY protocol end to end: fastproxy as a sender and as a receiver, with real processes.

- Reference comparison: HAProxy 2.6 (`send-proxy-v2-ssl-cn`, optionally with
  `proxy-v2-options`) and fastproxy (`--proxy-protocol v2-ssl-cn`, `--proxy-protocol-options`)
  run side by side; the same client (certificate thing001, same TLS version, ALPN mqtt, SNI
  localhost) goes through each into a recording backend; the two headers are compared field
  by field, TLV by TLV and byte for byte with the addresses set aside, parsed by
  fastproxy.proxy_protocol and by the independent `proxy-protocol` PyPI package.
- Real receivers of what fastproxy sends: nginx 1.22 (`listen ... proxy_protocol`) and
  HAProxy 2.6 (`bind ... accept-proxy`) in front of Mosquitto 2.0.11, with mosquitto_pub
  and a paho subscriber bound to distinct loopback addresses (127.0.0.5, 127.0.0.6), so the
  receivers' logs can only name them if the header carried them.
- Accept side: HAProxy `send-proxy[-v2]` in front of fastproxy `--accept-proxy-protocol`;
  untrusted sources, malformed headers, no header in time, v1, LOCAL.
- `fastproxy check` warnings, and --proxy-protocol-max-len at its boundary.

Loopback only (127.0.0.0/8; 192.0.2.1 / 198.51.100.x / 2001:db8:: appear only inside
headers and in `fastproxy check`, which does not connect). Every wait is bounded.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import proxyutil as U
from recorder import Recorder

pp = pytest.importorskip("fastproxy.proxy_protocol")
pytest.importorskip("fastproxy._proxyproto", reason="compiled module not built")
pytest.importorskip("fastproxy._engine", reason="compiled engine not built")

HOST = U.HOST
PUB_SRC = "127.0.0.5"     # mosquitto_pub / raw clients bind here
SUB_SRC = "127.0.0.6"     # the paho subscriber binds here
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"
TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2

needs_haproxy = pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed")
needs_nginx = pytest.mark.skipif(not shutil.which("nginx") or not os.path.exists(NGINX_STREAM),
                                 reason="nginx with the stream module not installed")


# ----------------------------------------------------------------------------- processes


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def daemons(tmp_path):
    """start(name, cmd, ports) runs cmd with output to files and waits (bounded) until every
    port is in LISTEN state, read from /proc so that no probe connection is made."""
    started: list[Daemon] = []

    def start(name: str, cmd: list[str], ports: list[int]) -> Daemon:
        n = len(started)
        out, err = tmp_path / f"{name}{n}.stdout", tmp_path / f"{name}{n}.stderr"
        with open(out, "wb") as so, open(err, "wb") as se:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=so, stderr=se, cwd=str(tmp_path))
        d = Daemon(name, proc, out, err)
        started.append(d)
        for p in ports:
            U.wait_port(HOST, p, timeout=10, proc=proc, connect=False,
                        diag=lambda: f"{cmd}\nstdout:\n{d.stdout()}\nstderr:\n{d.stderr()}")
        return d

    yield start
    for d in started:
        U.stop_process(d.proc, timeout=5)


HAPROXY_HEAD = """
global
    log stdout format raw local0
    maxconn 200
    nbthread 1
defaults
    mode tcp
    log global
    timeout connect 3s
    timeout client 30s
    timeout server 30s
"""


@pytest.fixture
def haproxy(daemons, tmp_path):
    """haproxy(body, ports) -> Daemon; body is appended to HAPROXY_HEAD; logs go to stdout."""
    counter = [0]

    def start(body: str, ports: list[int]) -> Daemon:
        counter[0] += 1
        cfg = tmp_path / f"haproxy{counter[0]}.cfg"
        cfg.write_text(HAPROXY_HEAD + body)
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
        assert check.returncode == 0, f"haproxy -c refused the configuration:\n{check.stdout}{check.stderr}\n{body}"
        return daemons("haproxy", ["haproxy", "-f", str(cfg), "-db"], ports)

    return start


@pytest.fixture
def nginx_proxy(daemons, tmp_path):
    """nginx_proxy(port, upstream_port) -> (Daemon, access_log_path): a stream server on
    127.0.0.1:port that expects a PROXY header and relays to 127.0.0.1:upstream_port."""

    def start(port: int, upstream_port: int) -> tuple[Daemon, Path]:
        prefix = tmp_path / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        log = prefix / "logs" / "stream.log"
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
load_module {NGINX_STREAM};
worker_processes 1;
events {{ worker_connections 64; }}
stream {{
    log_format pp '$remote_addr:$remote_port|$proxy_protocol_addr:$proxy_protocol_port|$proxy_protocol_server_addr:$proxy_protocol_server_port|$status';
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        proxy_pass 127.0.0.1:{upstream_port};
        access_log {log} pp;
    }}
}}
""")
        d = daemons("nginx", ["nginx", "-p", str(prefix), "-c", str(conf), "-g",
                              f"daemon off; pid {prefix}/logs/nginx.pid; error_log stderr;"], [port])
        return d, log

    return start


@pytest.fixture
def recorders():
    made: list[Recorder] = []

    def make(**kw) -> Recorder:
        r = Recorder(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# ----------------------------------------------------------------------------- clients


def tls_ctx(certs, *, version: ssl.TLSVersion = TLS13, cert: bool = True, alpn=("mqtt",)) -> ssl.SSLContext:
    return U.client_context(certs, min_version=version, max_version=version, alpn=list(alpn) if alpn else None,
                            cert=certs.client_cert if cert else None, key=certs.client_key if cert else None)


def tcp_from(source: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection from source:<ephemeral> (a loopback address) to port on 127.0.0.1,
    or on ::1 when source is IPv6."""
    v6 = ":" in source
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect(("::1" if v6 else HOST, port))
    except BaseException:
        s.close()
        raise
    return s


@dataclass
class Session:
    local: tuple               # the client's own address and source port (IPv6: 4-tuple)
    version: str                # negotiated TLS version
    cipher: str
    alpn: str | None
    connect: bytes              # the CONNECT bytes the client sent
    rc: int                     # CONNACK return code


def mqtt_tls_session(port: int, ctx: ssl.SSLContext, client_id: str, *, source: str = HOST,
                     sni: str = "localhost", prefix: bytes = b"") -> Session:
    """TCP from `source`, optional raw prefix (a PROXY header, its own write), TLS, CONNECT,
    CONNACK, DISCONNECT, then wait (bounded) for the close."""
    raw = tcp_from(source, port)
    local = raw.getsockname()
    if prefix:
        raw.sendall(prefix)
    s = ctx.wrap_socket(raw, server_hostname=sni)
    try:
        pkt = U.connect_packet(client_id, keepalive=30)
        s.sendall(pkt)
        ptype, _, body = U.read_packet(s)
        assert ptype == 2, f"expected CONNACK, got packet type {ptype}"
        sess = Session(local, s.version(), s.cipher()[0], s.selected_alpn_protocol(), pkt, body[1])
        s.sendall(U.DISCONNECT)
        U.wait_closed(s, 5)
        return sess
    finally:
        s.close()


class BioTLS:
    """A TLS client over memory BIOs, so that a PROXY header and the ClientHello can leave in
    one write (as a load balancer would send them)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, sni: str, prefix: bytes = b"",
                 timeout: float = 10.0) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=sni)
        self.deadline = time.monotonic() + timeout
        pending = prefix
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush(pending)
                pending = b""
                self._fill()

    def _flush(self, prefix: bytes = b"") -> None:
        data = prefix + self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS over BIO: timed out")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the peer")
        self.inc.write(chunk)

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def read_packet(self) -> bytes:
        buf = b""
        while True:
            if len(buf) >= 2 and len(buf) >= 2 + buf[1] and not buf[1] & 0x80:
                return buf[:2 + buf[1]]
            try:
                buf += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def version(self) -> str:
        return self.obj.version()


def assert_refused_quietly(fp, rec: Recorder, status: int, reason: str, *, remote: str = HOST) -> U.AccessLine:
    (e,) = fp.wait_access(lambda e: e.status == status, n=1, timeout=10)
    assert e.reason == reason, e.raw
    assert e.remote == remote, e.raw
    assert e.sent == 0 and e.received == 0, e.raw
    time.sleep(0.3)   # anything the proxy might still send upstream would have arrived by now
    assert rec.connection_count() == 0, \
        f"a refused client reached the upstream: {[bytes(r.data[:80]) for r in rec.conns]}"
    return e


# ============================================================================ reference comparison


def _tlvs_at(hdr: bytes) -> list[tuple[int, int, int]]:
    """(type, value offset, value length) of a v2 header's top-level TLVs."""
    fam = hdr[13]
    off = 16 + {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}.get(fam, 0)
    end = 16 + int.from_bytes(hdr[14:16], "big")
    out = []
    while off < end:
        t, n = hdr[off], int.from_bytes(hdr[off + 1:off + 3], "big")
        out.append((t, off + 3, n))
        off += 3 + n
    assert off == end
    return out


def normalize(other: bytes, ours: bytes, *, verify: int | None = None) -> bytes:
    """`other` with `ours`'s address block (and `verify` if given), CRC32C recomputed."""
    h = bytearray(other)
    assert h[13] == ours[13] == 0x11
    h[16:28] = ours[16:28]
    tl = _tlvs_at(bytes(h))
    if verify is not None:
        (off,) = [o for t, o, _ in tl if t == pp.PP2_TYPE_SSL]
        h[off + 1:off + 5] = verify.to_bytes(4, "big")
    for t, off, n in tl:
        if t == pp.PP2_TYPE_CRC32C:
            h[off:off + 4] = b"\0\0\0\0"
            h[off:off + 4] = pp.crc32c(bytes(h)).to_bytes(4, "big")
    return bytes(h)


def describe(h) -> dict:
    """Everything in a parsed header except addresses, ports and the CRC value."""
    d = {
        "version": h.version, "command": h.command, "family": h.family, "transport": h.transport,
        "length": h.length,
        "tlv types (wire order)": [t for t, _ in h.tlvs],
        "tlvs": [(t, v) for t, v in h.tlvs if t not in (pp.PP2_TYPE_CRC32C, pp.PP2_TYPE_SSL)],
        "has crc32c": h.crc32c is not None,
    }
    if h.ssl is not None:
        d["ssl.client"] = h.ssl.client
        d["ssl.verify"] = h.ssl.verify
        d["ssl sub-tlvs (wire order)"] = list(h.ssl.tlvs)
    return d


def describe_pkg(data: bytes) -> tuple[dict, object]:
    """The same header as the `proxy-protocol` PyPI package reads it: (fields, raw result)."""
    v2 = pytest.importorskip("proxyprotocol.v2")
    r = v2.ProxyProtocolV2().unpack(data)
    t = r.tlv
    d = {"proxied": r.proxied, "alpn": t.alpn, "authority": t.authority, "crc32c present": t.crc32c is not None,
         "unique_id": t.unique_id or None}
    s = t.ssl
    d.update({"ssl.client": s.client, "ssl.verify": s.verify, "ssl.version": s.version, "ssl.cn": s.cn,
              "ssl.cipher": s.cipher, "ssl.sig_alg": s.sig_alg, "ssl.key_alg": s.key_alg,
              "ssl.has_ssl": s.has_ssl, "ssl.has_cert_conn": s.has_cert_conn,
              "ssl.has_cert_sess": s.has_cert_sess, "ssl.verified(pkg)": s.verified})
    return d, r


REF_CASES = {
    # name: (client certificate, TLS version, proxy-v2-options)
    "cert-tls13": (True, TLS13, ()),
    "cert-tls12": (True, TLS12, ()),
    "nocert-tls13": (False, TLS13, ()),
    "options-tls13": (True, TLS13, ("authority", "cert-key", "cert-sig", "ssl-cipher")),
    "options-crc32c-tls12": (True, TLS12, ("authority", "cert-key", "cert-sig", "ssl-cipher", "crc32c")),
}


@needs_haproxy
@pytest.mark.parametrize("case", list(REF_CASES))
def test_reference_haproxy_vs_fastproxy(case, certs, tmp_path, haproxy, start_proxy, recorders):
    """Same client into HAProxy 2.6 send-proxy-v2-ssl-cn and fastproxy --proxy-protocol v2-ssl-cn:
    identical headers (addresses aside), except verify without a certificate (ours 50)."""
    with_cert, version, options = REF_CASES[case]
    verify_mode = "required" if with_cert else "optional"
    pem = tmp_path / "server-haproxy.pem"
    pem.write_bytes(Path(certs.server_cert).read_bytes() + Path(certs.server_key).read_bytes())

    rec_h, rec_f = recorders(), recorders()
    hport = U.free_port()
    opts = f" proxy-v2-options {','.join(options)}" if options else ""
    haproxy(f"""
frontend fe
    bind 127.0.0.1:{hport} ssl crt {pem} verify {verify_mode} ca-file {certs.ca_cert} alpn mqtt
    default_backend be
backend be
    server s 127.0.0.1:{rec_h.port} send-proxy-v2-ssl-cn{opts}
""", [hport])
    extra = ["--proxy-protocol", "v2-ssl-cn", "--client-ca", certs.ca_cert, "--verify", verify_mode]
    if options:
        extra += ["--proxy-protocol-options", ",".join(options)]
    fp = start_proxy(rec_f.upstream, *extra)

    ctx = tls_ctx(certs, version=version, cert=with_cert)
    if version == TLS12:
        # One suite offered, so both proxies pick it: from the same "HIGH" list OpenSSL (HAProxy)
        # prefers AES-256 and AWS-LC AES-128, and the header names the suite negotiated.
        ctx.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
    s_h = mqtt_tls_session(hport, ctx, "thing001")
    s_f = mqtt_tls_session(fp.port, ctx, "thing001")
    assert s_h.rc == 0 and s_f.rc == 0
    assert (s_h.version, s_h.alpn) == (s_f.version, s_f.alpn) == (
        {TLS13: "TLSv1.3", TLS12: "TLSv1.2"}[version], "mqtt")
    r_h, r_f = rec_h.wait_connect(), rec_f.wait_connect()
    hh, hf = r_h.parsed, r_f.parsed

    # addresses: each names the client's real socket and the address it reached
    assert (hh.src, hh.dst) == (s_h.local, (HOST, hport))
    assert (hf.src, hf.dst) == (s_f.local, (HOST, fp.port))

    # field by field, TLV by TLV
    d_h, d_f = describe(hh), describe(hf)
    v_h, v_f = d_h.pop("ssl.verify"), d_f.pop("ssl.verify")
    assert d_h == d_f, f"HAProxy {d_h}\nfastproxy {d_f}"
    if with_cert:
        assert v_h == v_f == 0
    else:
        assert (v_h, v_f) == (0, pp.PP2_VERIFY_NO_CERT)   # the documented deliberate difference

    # what the facts must be (not merely equal)
    assert hf.version == 2 and hf.command == "PROXY" and hf.family == "INET" and hf.transport == "STREAM"
    assert hf.alpn == b"mqtt"                            # ALPN whenever negotiated
    assert hf.ssl.version == s_f.version
    if with_cert:
        assert hf.ssl.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
        assert hf.ssl.cn == "thing001" and hf.ssl.verified
    else:
        assert hf.ssl.client == pp.PP2_CLIENT_SSL and hf.ssl.cn is None and not hf.ssl.verified
    if options:
        assert hf.authority == "localhost"               # the client's SNI
        assert hf.ssl.key_alg == "EC256"                 # of the server certificate (EC P-256)
        assert hf.ssl.sig_alg == "ecdsa-with-SHA256"
        assert hf.ssl.cipher == s_f.cipher == s_h.cipher
    else:
        assert hf.authority is None
        assert (hf.ssl.key_alg, hf.ssl.sig_alg, hf.ssl.cipher) == (None, None, None)
    if "crc32c" in options:
        assert hh.tlvs[0][0] == hf.tlvs[0][0] == pp.PP2_TYPE_CRC32C     # first TLV, as HAProxy
        assert hh.crc32c is not None and hf.crc32c is not None          # and both valid (parse checks)
    else:
        assert hf.crc32c is None

    # byte for byte with HAProxy's addresses replaced by ours (and verify, without a cert)
    assert normalize(r_h.header, r_f.header, verify=None if with_cert else pp.PP2_VERIFY_NO_CERT) == r_f.header, \
        f"\nHAProxy   {r_h.header.hex()}\nfastproxy {r_f.header.hex()}"

    # the independent proxy-protocol package reads the same
    p_h, res_h = describe_pkg(r_h.header)
    p_f, res_f = describe_pkg(r_f.header)
    assert (res_h.source, res_h.dest) == ((ipaddress.ip_address(HOST), s_h.local[1]),
                                          (ipaddress.ip_address(HOST), hport))
    assert (res_f.source, res_f.dest) == ((ipaddress.ip_address(HOST), s_f.local[1]),
                                          (ipaddress.ip_address(HOST), fp.port))
    pv_h, pv_f = p_h.pop("ssl.verify"), p_f.pop("ssl.verify")
    pver_h, pver_f = p_h.pop("ssl.verified(pkg)"), p_f.pop("ssl.verified(pkg)")
    assert p_h == p_f, f"HAProxy {p_h}\nfastproxy {p_f}"
    assert (pv_h, pv_f) == (v_h, v_f)
    assert p_f["ssl.cn"] == ("thing001" if with_cert else None)
    assert p_f["ssl.version"] == s_f.version
    # the package's `verified` is verify == 0 alone: HAProxy's no-certificate header reads as verified
    assert (pver_h, pver_f) == ((True, True) if with_cert else (True, False))

    # the CONNECT follows the header exactly as the client sent it (and fastproxy sends both in one write)
    for r, s in ((r_h, s_h), (r_f, s_f)):
        assert r.after.startswith(s.connect), (r.after[:80], s.connect)
        assert r.packets[0] == s.connect
    assert r_f.first_chunk == r_f.header + s_f.connect, \
        f"fastproxy's first write was {len(r_f.first_chunk)} bytes, header {len(r_f.header)} + CONNECT {len(s_f.connect)}"
    fp.wait_access(lambda e: e.status == 200, n=1)


# ============================================================================ real receivers


def pub_sub_through(port: int, certs, paho_client, broker, tag: str) -> tuple[tuple[str, int], str]:
    """A paho subscriber (bound to SUB_SRC:<known port>) and mosquitto_pub (bound to PUB_SRC)
    through fastproxy's port; the message must arrive. Both then disconnect.
    Returns the subscriber's (address, port) and the publisher's client id."""
    sub_port = U.free_port(SUB_SRC)
    sub = paho_client(port, client_id=f"{tag}-sub", connect=False, certfile=certs.client_cert,
                      keyfile=certs.client_key)
    sub.connect(bind_address=SUB_SRC, bind_port=sub_port)
    sub.subscribe(f"e2e/{tag}", 1)
    r = U.mosquitto_pub(port, certs, f"e2e/{tag}", message=f"hello {tag}", qos=1, client_id=f"{tag}-pub",
                        extra=["--cert", certs.client_cert, "--key", certs.client_key, "-A", PUB_SRC])
    assert r.returncode == 0, (r.stdout, r.stderr)
    got = sub.collect(1, timeout=10)
    assert [m.payload for m in got] == [f"hello {tag}".encode()]
    sub.close()
    ids = U.broker_client_ids(broker.log())
    assert f"{tag}-sub" in ids and f"{tag}-pub" in ids, ids
    return (SUB_SRC, sub_port), f"{tag}-pub"


def wait_lines(read, pred, n: int, timeout: float = 10.0, what: str = "log lines") -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in read().splitlines() if pred(ln)]
        if len(lines) >= n:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {n} {what} within {timeout}s, got:\n{read()}")
        time.sleep(0.05)


NGINX_MODES = {
    "v1": ["--proxy-protocol", "v1"],
    "v2": ["--proxy-protocol", "v2"],
    # nginx 1.22 reads at most 107 bytes of header; this one is 57-64 bytes and must fit
    "v2-ssl-cn-max107": ["--proxy-protocol", "v2-ssl-cn", "--proxy-protocol-max-len", "107"],
}


@needs_nginx
@pytest.mark.parametrize("mode", list(NGINX_MODES))
def test_nginx_receiver_in_front_of_mosquitto(mode, certs, mosquitto, nginx_proxy, start_proxy, paho_client):
    """client -TLS-> fastproxy -PROXY-> nginx 1.22 (proxy_protocol) -> Mosquitto: messages flow and
    nginx's $proxy_protocol_addr:$proxy_protocol_port name the real clients."""
    nport = U.free_port()
    _, log = nginx_proxy(nport, mosquitto.port)
    fp = start_proxy(f"{HOST}:{nport}", "--client-ca", certs.ca_cert, *NGINX_MODES[mode])
    sub_src, _ = pub_sub_through(fp.port, certs, paho_client, mosquitto, f"ngx-{mode}")

    lines = wait_lines(lambda: log.read_text() if log.exists() else "", lambda ln: True, 2, what="nginx log lines")
    fields = [ln.split("|") for ln in lines]
    assert all(f[3] == "200" for f in fields), lines
    assert all(f[0].startswith(f"{HOST}:") for f in fields), lines          # the TCP peer is fastproxy
    assert all(f[2] == f"{HOST}:{fp.port}" for f in fields), lines         # what the clients reached
    clients = sorted(f[1] for f in fields)
    assert f"{sub_src[0]}:{sub_src[1]}" in clients, lines                 # the subscriber's exact port
    pub = [c for c in clients if c.startswith(PUB_SRC + ":")]
    assert len(pub) == 1 and int(pub[0].split(":")[1]) > 0, lines
    remotes = sorted(e.remote for e in fp.wait_access(lambda e: e.status == 200, n=2))
    assert remotes == [PUB_SRC, SUB_SRC]


@needs_haproxy
@pytest.mark.parametrize("mode", ["v1", "v2", "v2-ssl-cn"])
def test_haproxy_accept_proxy_in_front_of_mosquitto(mode, certs, mosquitto, haproxy, start_proxy, paho_client):
    """client -TLS-> fastproxy -PROXY-> HAProxy 2.6 (bind accept-proxy) -> Mosquitto: messages flow
    and HAProxy's %ci:%cp / %fi:%fp are the real client and the address it reached."""
    hport = U.free_port()
    d = haproxy(f"""
frontend fe
    bind 127.0.0.1:{hport} accept-proxy
    log-format "PPLOG %ci:%cp %fi:%fp %ts"
    default_backend be
backend be
    server m 127.0.0.1:{mosquitto.port}
""", [hport])
    fp = start_proxy(f"{HOST}:{hport}", "--client-ca", certs.ca_cert, "--proxy-protocol", mode)
    sub_src, _ = pub_sub_through(fp.port, certs, paho_client, mosquitto, f"hap-{mode}")

    lines = wait_lines(d.stdout, lambda ln: ln.startswith("PPLOG "), 2, what="HAProxy log lines")
    fields = [ln.split()[1:] for ln in lines]
    assert all(f[1] == f"{HOST}:{fp.port}" for f in fields), lines
    assert all(f[2] == "--" for f in fields), lines                         # normal termination
    clients = [f[0] for f in fields]
    assert f"{sub_src[0]}:{sub_src[1]}" in clients, lines
    assert len([c for c in clients if c.startswith(PUB_SRC + ":")]) == 1, lines
    remotes = sorted(e.remote for e in fp.wait_access(lambda e: e.status == 200, n=2))
    assert remotes == [PUB_SRC, SUB_SRC]


# ============================================================================ accept side


def accepting_proxy(start_proxy, upstream: str, *extra: str, trusted: str = "127.0.0.1/32"):
    return start_proxy(upstream, "--accept-proxy-protocol", "--trusted-proxies", trusted, *extra)


@needs_haproxy
@pytest.mark.parametrize("send", ["send-proxy-v2", "send-proxy"])
def test_accept_from_haproxy(send, certs, haproxy, start_proxy, recorders):
    """client (127.0.0.5) -> HAProxy (send-proxy[-v2], TLS passthrough) -> fastproxy
    --accept-proxy-protocol --proxy-protocol v2 -> recorder: the client is who HAProxy saw."""
    rec = recorders()
    fp = accepting_proxy(start_proxy, rec.upstream, "--proxy-protocol", "v2")
    hport = U.free_port()
    haproxy(f"""
frontend fe
    bind 127.0.0.1:{hport}
    default_backend be
backend be
    server fp 127.0.0.1:{fp.port} {send}
""", [hport])

    s = mqtt_tls_session(hport, tls_ctx(certs), "acc-1", source=PUB_SRC)
    assert s.rc == 0 and s.version == "TLSv1.3"
    r = rec.wait_connect()
    h = r.parsed
    # what fastproxy emits names the original client and the address it reached (HAProxy's)
    assert (h.version, h.command, h.family) == (2, "PROXY", "INET")
    assert h.src == (PUB_SRC, s.local[1]) and h.dst == (HOST, hport), (h.src, h.dst, s.local)
    assert h.alpn == b"mqtt" and h.ssl is None        # v2: ALPN (negotiated) but no SSL TLV
    assert r.packets[0] == s.connect and r.first_chunk == r.header + s.connect
    (e,) = fp.wait_access(lambda e: e.status == 200, n=1)
    assert e.remote == PUB_SRC and e.protocol == "TLSv1.3" and e.clientid == "acc-1", e.raw

    # the error log names ADDR:PORT: a client refused at the CONNECT shows its real source port
    raw = tcp_from(PUB_SRC, hport)
    port2 = raw.getsockname()[1]
    t = tls_ctx(certs).wrap_socket(raw, server_hostname="localhost")
    try:
        t.sendall(U.PINGREQ)                            # not a CONNECT
        closed, _, _ = U.wait_closed(t, 10)
        assert closed
    finally:
        t.close()
    (e2,) = fp.wait_access(lambda e: e.status == 400, n=1)
    assert (e2.remote, e2.reason) == (PUB_SRC, "bad-connect"), e2.raw
    U.wait_until(lambda: f"client {PUB_SRC}:{port2}: bad-connect" in fp.stderr(), 5,
                 what=f"error-log line for {PUB_SRC}:{port2}")
    assert rec.connection_count() == 1


@needs_haproxy
def test_accept_from_haproxy_real_broker(certs, mosquitto, haproxy, start_proxy, paho_client):
    """paho clients through HAProxy send-proxy-v2 -> fastproxy (accept) -> Mosquitto: pub/sub works
    and the access log shows the clients' own addresses, not HAProxy's."""
    fp = accepting_proxy(start_proxy, mosquitto.upstream)
    hport = U.free_port()
    haproxy(f"""
frontend fe
    bind 127.0.0.1:{hport}
    default_backend be
backend be
    server fp 127.0.0.1:{fp.port} send-proxy-v2
""", [hport])
    sub = paho_client(hport, client_id="acc-sub", connect=False)
    sub.connect(bind_address=SUB_SRC)
    sub.subscribe("acc/t", 1)
    pub = paho_client(hport, client_id="acc-pub", connect=False)
    pub.connect(bind_address=PUB_SRC)
    pub.publish("acc/t", b"through haproxy", qos=1)
    assert [m.payload for m in sub.collect(1, timeout=10)] == [b"through haproxy"]
    pub.close()
    sub.close()
    remotes = sorted(e.remote for e in fp.wait_access(lambda e: e.status == 200, n=2))
    assert remotes == [PUB_SRC, SUB_SRC]


TRUST_CASES = [
    # (--trusted-proxies, listen host, client source, accepted)
    ("127.0.0.2/32", HOST, "127.0.0.1", False),
    ("127.0.0.0/8", HOST, "127.0.0.5", True),
    ("127.0.0.4/31", HOST, "127.0.0.5", True),
    ("127.0.0.6/31", HOST, "127.0.0.5", False),
    ("127.0.0.9/32,127.0.0.5/32", HOST, "127.0.0.5", True),
    ("0.0.0.0/0", HOST, "127.0.0.5", True),
    ("::1/128", "::1", "::1", True),
    ("127.0.0.1/32", "::1", "::1", False),
]


@pytest.mark.parametrize("trusted,listen,source,accepted", TRUST_CASES)
def test_accept_trusted_proxies(trusted, listen, source, accepted, certs, run_fastproxy, recorders):
    """Only a --trusted-proxies source may send a header: others are closed at once with
    403 untrusted-proxy (access log names the real peer) and nothing reaches the upstream."""
    rec = recorders()
    lport = U.free_port(listen)
    laddr = f"[{listen}]:{lport}" if ":" in listen else f"{listen}:{lport}"
    fp = run_fastproxy("--listen", laddr, "--upstream", rec.upstream, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key, "--accept-proxy-protocol", "--trusted-proxies", trusted,
                       "--proxy-protocol", "v2")
    header = pp.build_v2(("198.51.100.7", 40000), ("198.51.100.1", 8883))
    if accepted:
        sess = mqtt_tls_session(lport, tls_ctx(certs), "trusted-1", source=source, prefix=header)
        assert sess.rc == 0
        h = rec.wait_connect().parsed
        assert (h.version, h.src, h.dst) == (2, ("198.51.100.7", 40000), ("198.51.100.1", 8883)), h
        (e,) = fp.wait_access(lambda e: e.status == 200, n=1)
        assert e.remote == "198.51.100.7", e.raw
        return
    s = tcp_from(source, lport)
    try:
        try:
            s.sendall(header)
        except OSError:
            pass            # already closed by the proxy
        closed, data, waited = U.wait_closed(s, 5)
    finally:
        s.close()
    assert closed and data == b"", (closed, data, waited)
    assert_refused_quietly(fp, rec, 403, "untrusted-proxy", remote=source)


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "tls-clienthello-no-header": b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c\x03\x03" + b"\x11" * 42,
    "v2-version-1": b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12),
    "v1-bad-ipv4": b"PROXY TCP4 256.1.1.1 127.0.0.1 1000 2000\r\n",
    "v1-no-crlf-in-107": b"PROXY TCP4 " + b"1" * 120,
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_accept_malformed_header_is_refused(kind, certs, start_proxy, recorders):
    rec = recorders()
    fp = accepting_proxy(start_proxy, rec.upstream, "--proxy-protocol", "v2")
    s = tcp_from(HOST, fp.port)
    try:
        s.sendall(GARBAGE[kind])
        closed, data, _ = U.wait_closed(s, 5)
    finally:
        s.close()
    assert closed and data == b""
    assert_refused_quietly(fp, rec, 400, "bad-proxy-header")


def test_accept_no_header_in_time(certs, start_proxy, recorders):
    """--handshake-timeout 1 bounds the wait for the header: closed after ~1 s, 400 bad-proxy-header."""
    rec = recorders()
    fp = accepting_proxy(start_proxy, rec.upstream, "--proxy-protocol", "v2", "--handshake-timeout", "1")
    s = tcp_from(HOST, fp.port)
    try:
        closed, data, waited = U.wait_closed(s, 6)
    finally:
        s.close()
    assert closed and data == b"", (closed, data, waited)
    assert 0.8 <= waited <= 4.0, f"closed after {waited:.2f}s with --handshake-timeout 1"
    assert_refused_quietly(fp, rec, 400, "bad-proxy-header")


ACCEPTED = {
    # header in its own write, then the TLS handshake
    "v1-tcp4-separate-write": (lambda fport: pp.build_v1(("198.51.100.23", 40001), (HOST, fport)),
                               "198.51.100.23", 40001, False),
    # v2 with an IPv6 client, header and ClientHello in ONE write (leftover bytes feed TLS)
    "v2-tcp6-same-write": (lambda fport: pp.build_v2(("2001:db8::5", 40002), ("2001:db8::1", 8883)),
                           "2001:db8::5", 40002, True),
}


@pytest.mark.parametrize("kind", list(ACCEPTED))
def test_accept_direct_header(kind, certs, start_proxy, recorders):
    """A trusted peer's v1 / v2 header: the carried source becomes the client (access log and
    the header fastproxy emits upstream)."""
    make, src, sport, same_write = ACCEPTED[kind]
    rec = recorders()
    fp = accepting_proxy(start_proxy, rec.upstream, "--proxy-protocol", "v2")
    header = make(fp.port)
    ctx = tls_ctx(certs)
    if same_write:
        raw = tcp_from(HOST, fp.port)
        try:
            t = BioTLS(raw, ctx, "localhost", prefix=header)
            connect = U.connect_packet("direct-1", keepalive=30)
            t.sendall(connect)
            assert t.read_packet() == b"\x20\x02\x00\x00"
            t.sendall(U.DISCONNECT)
        finally:
            raw.close()
    else:
        s = mqtt_tls_session(fp.port, ctx, "direct-1", prefix=header)
        assert s.rc == 0
        connect = s.connect
    r = rec.wait_connect()
    h = r.parsed
    assert h.src == (src, sport), h
    want_dst = (HOST, fp.port) if kind.startswith("v1") else ("2001:db8::1", 8883)
    assert h.dst == want_dst, h
    assert (h.version, h.command, h.family) == (2, "PROXY", "INET6" if ":" in src else "INET")
    assert r.packets[0] == connect
    (e,) = fp.wait_access(lambda e: e.status == 200, n=1)
    assert e.remote == src and e.clientid == "direct-1", e.raw


def test_accept_local_header_keeps_real_peer(certs, start_proxy, recorders):
    """A v2 LOCAL header (a balancer's health check): the real peer address stays the client."""
    rec = recorders()
    fp = accepting_proxy(start_proxy, rec.upstream, "--proxy-protocol", "v2")
    local_hdr = pp.build_v2()
    assert pp.parse(local_hdr).command == "LOCAL"
    s = mqtt_tls_session(fp.port, tls_ctx(certs), "local-1", prefix=local_hdr)
    assert s.rc == 0
    h = rec.wait_connect().parsed
    assert h.version == 2 and h.command == "PROXY" and h.src == (HOST, s.local[1]) and h.dst == (HOST, fp.port), h
    (e,) = fp.wait_access(lambda e: e.status == 200, n=1)
    assert e.remote == HOST, e.raw


# ============================================================================ check, max length


@pytest.mark.parametrize("upstream,mode,want", [
    ("192.0.2.1:1883", "v2", True),
    ("192.0.2.1:1883", "v1", True),
    ("127.0.0.1:1883", "v2-ssl-cn", False),
    ("[::1]:1883", "v2", False),
    ("unix:/tmp/fastproxy-e2e-nonexistent.sock", "v2", False),
    ("192.0.2.1:1883", "none", False),
])
def test_check_warns_about_proxy_headers_to_non_loopback(upstream, mode, want, certs):
    """`fastproxy check` (which does not connect) warns when PROXY headers go to a non-loopback
    upstream; not for loopback/unix, and the PROXY warning is absent without --proxy-protocol."""
    r = U.run_cli("check", "--listen", f"{HOST}:{U.free_port()}", "--upstream", upstream,
                  "--tls-cert", certs.server_cert, "--tls-key", certs.server_key, "--proxy-protocol", mode)
    assert r.returncode == 0, r.stderr
    pp_warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln and "PROXY" in ln]
    if want:
        assert len(pp_warnings) == 1 and "192.0.2.1:1883" in pp_warnings[0], r.stderr
    else:
        assert pp_warnings == [], r.stderr
        if upstream.startswith(("127.", "[::1]", "unix:")):
            assert "warning" not in r.stderr, r.stderr


@pytest.mark.parametrize("max_len,fits", [(40, False), (56, False), (57, True)])
def test_header_longer_than_max_len_is_refused(max_len, fits, certs, start_proxy, recorders):
    """v2-ssl-cn for thing001 over TLS 1.3 without ALPN is exactly 57 bytes (16 + 12 addresses +
    SSL TLV 3 + 5 + VERSION 10 + CN 11): 57 passes, 56 and 40 end the session with
    500 internal-error and nothing is sent upstream."""
    rec = recorders()
    fp = start_proxy(rec.upstream, "--client-ca", certs.ca_cert, "--proxy-protocol", "v2-ssl-cn",
                     "--proxy-protocol-max-len", str(max_len))
    out = U.try_connect(fp.port, U.connect_packet("thing001", keepalive=30), tls_ctx=tls_ctx(certs, alpn=None),
                        timeout=5)
    if fits:
        assert out.code == 0, out
        r = rec.wait_connect()
        assert len(r.header) == 57 and r.parsed.ssl.cn == "thing001"
        fp.wait_access(lambda e: e.status == 200, n=1)
        return
    assert out.connack is None and out.closed, out
    (e,) = fp.wait_access(lambda e: e.status == 500, n=1)
    assert e.reason == "internal-error" and e.clientid == "thing001", e.raw
    U.wait_until(lambda: "PROXY header longer than proxy_protocol_max_len" in fp.stderr(), 5,
                 what="the error-log line")
    time.sleep(0.3)
    # Observed: the header is built only once the upstream TCP connection is up, so the
    # upstream sees a connection open and close with zero bytes; the brief asks for no bytes.
    sent = b"".join(bytes(c.data) for c in rec.conns)
    assert sent == b"", f"{len(sent)} bytes reached the upstream: {sent[:80]!r}"
