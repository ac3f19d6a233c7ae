"""Load generators for benchmarks/e2e.py (each run as its own process, loopback only).

    loadgen.py sink     --port P                         plain TCP sink; one JSON line per connection
    loadgen.py bulk     --port P --mb N --ca --cert --key  push N MiB of MQTT PUBLISH packets over mTLS
    loadgen.py idle     --port P --conns N ...            open N mTLS + MQTT CONNECT/CONNACK sessions, hold
    loadgen.py silent   --port P --conns N                open N plain TCP connections that send nothing, hold
    loadgen.py latency  --port P [--ca --cert --key] ...  1000 msg/s QoS 0 round trip, pub + sub
    loadgen.py connect  --port P --conns N ...            N x (mTLS handshake, CONNECT, CONNACK, DISCONNECT)
    loadgen.py broker   --port P                          fake MQTT broker: skips a PROXY v1/v2 header,
                                                          CONNACKs every CONNECT, closes on DISCONNECT
    loadgen.py pub      --port P --messages N [--ws] ...  N QoS 0 PUBLISHes over mTLS, as MQTT (mqtts) or
                                                          MQTT over WebSocket (wss: masked binary frames)

Every mode is bounded by --max-seconds and prints one JSON object per result on stdout.
"""
from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import json
import os
import selectors
import signal
import socket
import ssl
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    MQTT_CONNACK_OK,
    MQTT_DISCONNECT,
    MqttReader,
    client_ssl_context,
    mqtt_connect,
    mqtt_publish_header,
    mqtt_subscribe,
    percentile,
)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _term(signum, frame):  # noqa: ARG001
    raise SystemExit(0)


# --------------------------------------------------------------------------- sink


def cmd_sink(a: argparse.Namespace) -> int:
    """Accept connections one at a time, answer an MQTT CONNACK, count bytes until EOF."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.host, a.port))
    srv.listen(64)
    srv.settimeout(0.5)
    emit({"listening": srv.getsockname()[1]})
    deadline = time.monotonic() + a.max_seconds
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while time.monotonic() < deadline:
        try:
            c, _ = srv.accept()
        except socket.timeout:
            continue
        c.settimeout(a.conn_timeout)
        n = 0
        t_first = t_last = 0
        err = None
        try:
            if a.connack:
                c.sendall(MQTT_CONNACK_OK)
            while True:
                k = c.recv_into(view)
                if not k:
                    break
                t_last = time.monotonic_ns()
                if not n:
                    t_first = t_last
                n += k
        except OSError as e:
            err = str(e)
        finally:
            c.close()
        emit({"bytes": n, "t_first_ns": t_first, "t_last_ns": t_last, "error": err})
    return 0


# --------------------------------------------------------------------------- bulk


def cmd_bulk(a: argparse.Namespace) -> int:
    """Send an MQTT CONNECT, then QoS 0 PUBLISH packets until --mb MiB of application bytes are sent."""
    ctx = client_ssl_context(a.ca, a.cert, a.key)
    total = a.mb * 1024 * 1024
    payload_len = a.chunk_kib * 1024
    pkt = mqtt_publish_header("bench/bulk", payload_len) + os.urandom(payload_len)
    t0 = time.monotonic_ns()
    raw = socket.create_connection((a.host, a.port), timeout=a.max_seconds)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    t_hs = time.monotonic_ns()
    deadline = time.monotonic() + a.max_seconds
    first = mqtt_connect(f"bulk-{os.getpid()}")
    s.sendall(first)
    sent = len(first)
    mv = memoryview(pkt)
    while sent < total and time.monotonic() < deadline:
        chunk = mv if total - sent >= len(pkt) else mv[: total - sent]
        s.sendall(chunk)
        sent += len(chunk)
    t_sent = time.monotonic_ns()
    # close_notify, then wait (bounded) for the proxy to close its side
    cipher_info = s.cipher()
    s.settimeout(10)
    try:
        s.unwrap().close()
    except (OSError, ValueError):
        s.close()
    cipher, version = cipher_info[0], cipher_info[1]
    emit({"bytes": sent, "cipher": cipher, "version": version, "t_start_ns": t0, "t_handshake_ns": t_hs, "t_sent_ns": t_sent,
          "t_closed_ns": time.monotonic_ns(), "complete": sent >= total})
    return 0


# --------------------------------------------------------------------------- idle


class _Conn:
    __slots__ = ("sock", "state", "t0", "out", "inbuf", "ssl")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ssl: ssl.SSLSocket | None = None
        self.state = "connect"
        self.t0 = time.monotonic()
        self.out = b""
        self.inbuf = b""


def cmd_idle(a: argparse.Namespace) -> int:
    """Open --conns mTLS connections (TCP, TLS handshake, MQTT CONNECT, wait CONNACK), at most
    --concurrency in progress; report; hold them until stdin closes (or --max-seconds); close."""
    signal.signal(signal.SIGTERM, _term)
    ctx = client_ssl_context(a.ca, a.cert, a.key)
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    failed: list[str] = []
    pending = 0
    started = 0
    t_start = time.monotonic()
    deadline = t_start + a.open_seconds
    prefix = f"idle-{os.getpid()}-"

    def fail(c: _Conn, why: str) -> None:
        failed.append(why)
        try:
            sel.unregister(c.ssl or c.sock)
        except (KeyError, ValueError):
            pass
        (c.ssl or c.sock).close()

    def step(c: _Conn) -> None:
        """Advance one connection's state machine as far as it goes without blocking."""
        nonlocal pending
        s = c.ssl or c.sock
        try:
            if c.state == "connect":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                sel.unregister(c.sock)
                c.ssl = ctx.wrap_socket(c.sock, server_hostname="localhost", do_handshake_on_connect=False)
                s = c.ssl
                sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                c.state = "handshake"
            if c.state == "handshake":
                c.ssl.do_handshake()
                c.out = mqtt_connect(prefix + str(id(c)), keepalive=a.keepalive)
                c.state = "send"
            if c.state == "send":
                while c.out:
                    n = c.ssl.send(c.out)
                    c.out = c.out[n:]
                c.state = "connack"
                sel.modify(s, selectors.EVENT_READ, c)
            if c.state == "connack":
                while len(c.inbuf) < 4:
                    data = c.ssl.recv(4 - len(c.inbuf))
                    if not data:
                        raise ConnectionError("closed before CONNACK")
                    c.inbuf += data
                if c.inbuf != MQTT_CONNACK_OK:
                    raise ConnectionError(f"unexpected CONNACK {c.inbuf.hex()}")
                c.state = "idle"
                pending -= 1
                done.append(s)
                sel.modify(s, selectors.EVENT_READ, c)  # only to notice closes while idle
        except ssl.SSLWantReadError:
            sel.modify(s, selectors.EVENT_READ, c)
        except ssl.SSLWantWriteError:
            sel.modify(s, selectors.EVENT_WRITE, c)
        except (OSError, ValueError, ConnectionError) as e:
            pending -= 1
            fail(c, f"{c.state}: {e}")

    while (started < a.conns or pending) and time.monotonic() < deadline:
        while started < a.conns and pending < a.concurrency:
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started += 1
            pending += 1
            c = _Conn(raw)
            rc = raw.connect_ex((a.host, a.port))
            if rc not in (0, errno.EINPROGRESS):
                pending -= 1
                failed.append(f"connect: {os.strerror(rc)}")
                raw.close()
                continue
            sel.register(raw, selectors.EVENT_WRITE, c)
        for key, _ in sel.select(timeout=0.2):
            c = key.data
            if c.state == "idle":
                # data or close on an established idle session
                try:
                    if not c.ssl.recv(1024):
                        raise ConnectionError("closed")
                except ssl.SSLWantReadError:
                    continue
                except (OSError, ConnectionError) as e:
                    done.remove(c.ssl)
                    fail(c, f"idle: {e}")
                continue
            step(c)
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            c = key.data
            if c.state != "idle" and now - c.t0 > a.conn_timeout:
                pending -= 1
                fail(c, f"{c.state}: timeout")
    if pending:
        failed.append(f"{pending} still opening at the deadline")
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[r] = reasons.get(r, 0) + 1
    emit({"ready": True, "ok": len(done), "failed": len(failed), "reasons": reasons,
          "open_seconds": round(time.monotonic() - t_start, 3)})

    # hold: watch stdin (EOF = stop) and the sessions (count closes)
    closed_while_idle = 0
    try:
        sel.register(sys.stdin, selectors.EVENT_READ, None)
    except (ValueError, PermissionError):
        pass
    hold_deadline = time.monotonic() + a.max_seconds
    stop = False
    while not stop and time.monotonic() < hold_deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.data is None:
                if not os.read(sys.stdin.fileno(), 4096):
                    stop = True
                continue
            c = key.data
            if c.state != "idle":
                continue
            try:
                if not c.ssl.recv(1024):
                    raise ConnectionError("closed")
            except ssl.SSLWantReadError:
                continue
            except (OSError, ConnectionError):
                closed_while_idle += 1
                sel.unregister(c.ssl)
                c.ssl.close()
                c.state = "closed"
    n_open = 0
    for key in list(sel.get_map().values()):
        if key.data is not None and key.data.state == "idle":
            n_open += 1
            if a.disconnect:
                try:
                    key.data.ssl.send(MQTT_DISCONNECT)
                except (OSError, ssl.SSLError):
                    pass
            key.data.ssl.close()
    emit({"closed_while_idle": closed_while_idle, "closed_at_end": n_open})
    return 0


# --------------------------------------------------------------------------- silent


def cmd_silent(a: argparse.Namespace) -> int:
    """Open --conns plain TCP connections (at most --concurrency connecting at once) that never send
    a byte; report; hold them until stdin closes (or --max-seconds), counting the ones the server
    closes (or sends something on) meanwhile; close them all."""
    signal.signal(signal.SIGTERM, _term)
    sel = selectors.DefaultSelector()
    connecting: dict[socket.socket, float] = {}
    held: list[socket.socket] = []
    failed: list[str] = []
    started = 0
    t_start = time.monotonic()
    deadline = t_start + a.open_seconds
    while (started < a.conns or connecting) and time.monotonic() < deadline:
        while started < a.conns and len(connecting) < a.concurrency:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            started += 1
            rc = s.connect_ex((a.host, a.port))
            if rc not in (0, errno.EINPROGRESS):
                failed.append(f"connect: {os.strerror(rc)}")
                s.close()
                continue
            connecting[s] = time.monotonic()
            sel.register(s, selectors.EVENT_WRITE)
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            sel.unregister(s)
            del connecting[s]
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                failed.append(f"connect: {os.strerror(err)}")
                s.close()
            else:
                held.append(s)
        now = time.monotonic()
        for s, t0 in list(connecting.items()):
            if now - t0 > a.conn_timeout:
                sel.unregister(s)
                del connecting[s]
                failed.append("connect: timeout")
                s.close()
    if connecting:
        failed.append(f"{len(connecting)} still connecting at the deadline")
        for s in connecting:
            sel.unregister(s)
            s.close()
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[r] = reasons.get(r, 0) + 1
    emit({"ready": True, "ok": len(held), "failed": len(failed), "reasons": reasons,
          "open_seconds": round(time.monotonic() - t_start, 3)})

    # hold: watch stdin (EOF = stop) and the sockets (a readable silent socket was closed or answered)
    for s in held:
        sel.register(s, selectors.EVENT_READ)
    try:
        sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    except (ValueError, PermissionError):
        pass
    closed_while_held = 0
    data_received = 0
    t_hold = time.monotonic()
    first_close_s = None
    hold_deadline = t_hold + a.max_seconds
    stop = False
    while not stop and time.monotonic() < hold_deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    stop = True
                continue
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                data_received += 1
            closed_while_held += 1
            if first_close_s is None:
                first_close_s = round(time.monotonic() - t_hold, 3)
            sel.unregister(s)
            s.close()
            held.remove(s)
    for s in held:
        s.close()
    emit({"closed_while_held": closed_while_held, "answered_while_held": data_received,
          "first_close_after_s": first_close_s, "closed_at_end": len(held)})
    return 0


# --------------------------------------------------------------------------- latency


def _mqtt_session(a: argparse.Namespace, client_id: str):
    raw = socket.create_connection((a.host, a.port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if a.ca:
        s = client_ssl_context(a.ca, a.cert, a.key).wrap_socket(raw, server_hostname="localhost")
    else:
        s = raw
    s.sendall(mqtt_connect(client_id, keepalive=600))
    rd = MqttReader()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = s.recv(4096)
        if not data:
            raise ConnectionError("closed before CONNACK")
        for first, body in rd.feed(data):
            if first == 0x20:
                if body[1] != 0:
                    raise ConnectionError(f"CONNACK refused: {body.hex()}")
                return s, rd
    raise TimeoutError("no CONNACK")


def cmd_latency(a: argparse.Namespace) -> int:
    """A subscriber (forked child) and a publisher, both via --host:--port (TLS if --ca).

    The publisher sends --rate msg/s for --seconds, each payload carrying time.monotonic_ns()
    and a sequence number; the subscriber computes arrival - send (CLOCK_MONOTONIC is shared by
    processes) and reports percentiles over the messages after the first --warmup seconds."""
    n = int(a.rate * a.seconds)
    topic = f"lat/{os.getpid()}"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # subscriber
        os.close(rfd)
        code = 1
        try:
            s, rd = _mqtt_session(a, f"lat-sub-{os.getpid()}")
            s.sendall(mqtt_subscribe(1, topic))
            lat: list[int] = []
            got = 0
            seen_suback = False
            s.settimeout(0.5)
            skip = int(a.rate * a.warmup)
            deadline = time.monotonic() + a.seconds + 15
            last_rx = None
            while time.monotonic() < deadline and got < n:
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    if last_rx is not None and time.monotonic() - last_rx > 3:
                        break
                    continue
                now = time.monotonic_ns()
                if not data:
                    break
                for first, body in rd.feed(data):
                    if first == 0x90 and not seen_suback:
                        seen_suback = True
                        os.write(wfd, b"R")
                    elif first & 0xF0 == 0x30:
                        tl = int.from_bytes(body[:2], "big")
                        ts, seq = struct.unpack_from("!qI", body, 2 + tl)
                        got += 1
                        last_rx = time.monotonic()
                        if seq >= skip:
                            lat.append(now - ts)
            lat.sort()
            res = {"n": n, "received": got, "lost": n - got, "samples": len(lat)}
            if lat:
                res.update(p50_us=percentile(lat, 50) / 1e3, p90_us=percentile(lat, 90) / 1e3,
                           p99_us=percentile(lat, 99) / 1e3, max_us=lat[-1] / 1e3,
                           mean_us=sum(lat) / len(lat) / 1e3)
            os.write(wfd, b"J" + json.dumps(res).encode() + b"\n")
            code = 0
        except Exception as e:  # report, never hang the parent
            os.write(wfd, b"J" + json.dumps({"error": f"subscriber: {e!r}"}).encode() + b"\n")
        finally:
            os._exit(code)

    os.close(wfd)
    rf = os.fdopen(rfd, "rb")
    result: dict = {}
    try:
        # wait for SUBACK (bounded)
        import select

        r, _, _ = select.select([rf], [], [], 15)
        first = rf.read(1) if r else b""
        if first != b"R":
            rest = rf.read() if first == b"J" else b""
            emit(json.loads(rest) if rest else {"error": "subscriber not ready"})
            return 1
        s, _ = _mqtt_session(a, f"lat-pub-{os.getpid()}")
        pad = b"x" * max(0, a.size - 12)
        hdr = mqtt_publish_header(topic, 12 + len(pad))
        interval = 1e9 / a.rate
        t0 = time.monotonic_ns() + 1_000_000
        for seq in range(n):
            target = t0 + int(seq * interval)
            d = target - time.monotonic_ns()
            if d > 0:
                time.sleep(d / 1e9)  # absolute schedule: a late wake-up is caught up, not accumulated
            s.sendall(hdr + struct.pack("!qI", time.monotonic_ns(), seq) + pad)
        r, _, _ = select.select([rf], [], [], a.seconds + 20)
        line = rf.readline() if r else b""
        result = json.loads(line[1:]) if line.startswith(b"J") else {"error": "no result from subscriber"}
        try:
            s.sendall(MQTT_DISCONNECT)
            s.close()
        except OSError:
            pass
    finally:
        try:
            os.kill(pid, signal.SIGKILL) if result == {} else None
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    emit(result)
    return 0 if "error" not in result else 1


# --------------------------------------------------------------------------- connect


def cmd_connect(a: argparse.Namespace) -> int:
    """--conns times, one after the other: a fresh TCP connection, a full TLS 1.3 handshake with the
    client certificate (no session resumption), MQTT CONNECT with --client-id, wait for the CONNACK,
    DISCONNECT, close. Reports ok (CONNACK 0x00), refused (CONNACK != 0 or closed before CONNACK) and
    errors, with reasons."""
    signal.signal(signal.SIGTERM, _term)
    ctx = client_ssl_context(a.ca, a.cert, a.key)
    pkt = mqtt_connect(a.client_id, keepalive=60)
    ok = refused = errors = 0
    reasons: dict[str, int] = {}
    deadline = time.monotonic() + a.max_seconds
    t0 = time.monotonic_ns()
    done = 0
    for _ in range(a.conns):
        if time.monotonic() > deadline:
            reasons["deadline"] = reasons.get("deadline", 0) + 1
            break
        done += 1
        why = None
        s = None
        try:
            raw = socket.create_connection((a.host, a.port), timeout=a.conn_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(pkt)
            buf = b""
            while len(buf) < 4:
                data = s.recv(4 - len(buf))
                if not data:
                    break
                buf += data
            if buf == MQTT_CONNACK_OK:
                ok += 1
                try:
                    s.sendall(MQTT_DISCONNECT)
                except OSError:
                    pass  # e.g. the broker's session takeover closed it already: the CONNACK counts
            elif len(buf) == 4 and buf[0] == 0x20:
                refused += 1
                why = f"CONNACK 0x{buf[3]:02x}"
            else:
                refused += 1
                why = "closed before CONNACK" if not buf else f"unexpected reply {buf.hex()}"
        except ssl.SSLError as e:
            # a refusal during the handshake (e.g. bad certificate) or a reset after it
            refused += 1
            why = f"TLS: {e.reason or e}"
        except (OSError, ValueError) as e:
            errors += 1
            why = f"{type(e).__name__}: {e}"
        finally:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    emit({"attempted": done, "ok": ok, "refused": refused, "errors": errors, "reasons": reasons,
          "t_start_ns": t0, "t_end_ns": time.monotonic_ns()})
    return 0


# --------------------------------------------------------------------------- fake broker

PP2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


class _BConn:
    __slots__ = ("sock", "buf", "pp_done")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pp_done = False


def cmd_broker(a: argparse.Namespace) -> int:
    """A minimal MQTT 'broker' for the connect-pp scenario (Mosquitto 2.0 does not accept PROXY
    headers). Per connection: an optional PROXY v2 (binary signature + 16-bit length) or v1
    ('PROXY ...\\r\\n') header is skipped and counted, every CONNECT is answered with CONNACK 0x00,
    DISCONNECT or EOF closes. Any line on stdin makes it print its counters as one JSON line;
    EOF on stdin (or --max-seconds) ends it."""
    signal.signal(signal.SIGTERM, _term)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.host, a.port))
    srv.listen(1024)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, "srv")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    st = {"accepted": 0, "pp_v2": 0, "pp_v1": 0, "pp_v2_bytes": 0, "connacks": 0, "disconnects": 0,
          "bad": 0, "active": 0}
    emit({"listening": srv.getsockname()[1]})
    deadline = time.monotonic() + a.max_seconds

    def close(c: _BConn) -> None:
        sel.unregister(c.sock)
        c.sock.close()
        st["active"] -= 1

    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.data == "srv":
                for _ in range(64):
                    try:
                        cs, _addr = srv.accept()
                    except BlockingIOError:
                        break
                    cs.setblocking(False)
                    cs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(cs, selectors.EVENT_READ, _BConn(cs))
                    st["accepted"] += 1
                    st["active"] += 1
                continue
            if key.data == "stdin":
                line = sys.stdin.readline()
                if not line:
                    return 0
                emit(dict(st))
                continue
            c: _BConn = key.data
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                close(c)
                continue
            c.buf += data
            if not c.pp_done:
                if c.buf.startswith(PP2_SIG[: len(c.buf)]) and len(c.buf) < 16:
                    continue
                if c.buf.startswith(PP2_SIG):
                    total = 16 + int.from_bytes(c.buf[14:16], "big")
                    if len(c.buf) < total:
                        continue
                    st["pp_v2"] += 1
                    st["pp_v2_bytes"] += total
                    c.buf = c.buf[total:]
                elif c.buf.startswith(b"PROXY "[: len(c.buf)]) and b"\r\n" not in c.buf and len(c.buf) < 108:
                    continue
                elif c.buf.startswith(b"PROXY "):
                    end = c.buf.find(b"\r\n")
                    if end < 0:
                        st["bad"] += 1
                        close(c)
                        continue
                    st["pp_v1"] += 1
                    c.buf = c.buf[end + 2 :]
                c.pp_done = True
            rd_close = False
            while len(c.buf) >= 2:
                mult, n, i = 1, 0, 1
                complete = False
                while i < len(c.buf) and i <= 4:
                    b = c.buf[i]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        complete = True
                        break
                if not complete or len(c.buf) < i + n:
                    break
                first = c.buf[0]
                c.buf = c.buf[i + n :]
                if first == 0x10:
                    try:
                        c.sock.send(MQTT_CONNACK_OK)
                        st["connacks"] += 1
                    except OSError:
                        rd_close = True
                        break
                elif first == 0xE0:
                    st["disconnects"] += 1
                    rd_close = True
                    break
            if rd_close:
                close(c)
    return 0


# --------------------------------------------------------------------------- pub (mqtts / wss)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_mask(data: bytes, mask: bytes) -> bytes:
    """RFC 6455 5.3: payload XOR the 4-byte mask, repeated (big-int XOR: no per-byte Python loop)."""
    if not data:
        return b""
    m = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(len(data), "big")


def ws_client_frame(payload: bytes, opcode: int = 0x2, mask: bytes | None = None) -> bytes:
    """One client frame: FIN, the opcode, MASK set, 7/16/64-bit length, masking key, masked payload."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        hdr = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        hdr = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        hdr = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return hdr + mask + ws_mask(payload, mask)


class WsReader:
    """Server frames (unmasked) -> (opcode, payload) tuples."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            b = self.buf
            n, at = b[1] & 0x7F, 2
            if n == 126:
                if len(b) < 4:
                    break
                n, at = int.from_bytes(b[2:4], "big"), 4
            elif n == 127:
                if len(b) < 10:
                    break
                n, at = int.from_bytes(b[2:10], "big"), 10
            if b[1] & 0x80:
                at += 4  # a masked server frame is a protocol error; skip the key anyway
            if len(b) < at + n:
                break
            out.append((b[0] & 0x0F, bytes(b[at : at + n])))
            del b[: at + n]
        return out


def ws_upgrade(s, host: str, port: int, path: str, timeout: float) -> bytes:
    """The client side of the opening handshake (subprotocol mqtt); returns bytes that followed the
    101 response (already frames)."""
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() +
              b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key +
              b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline or len(buf) > 16384:
            raise ConnectionError("no WebSocket upgrade response")
        data = s.recv(4096)
        if not data:
            raise ConnectionError(f"closed during the WebSocket upgrade ({buf[:80]!r})")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    if len(lines[0].split()) < 2 or lines[0].split()[1] != b"101":
        raise ConnectionError(f"WebSocket upgrade refused: {lines[0]!r}")
    want = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    hdrs = {ln.split(b":", 1)[0].strip().lower(): ln.split(b":", 1)[1].strip() for ln in lines[1:] if b":" in ln}
    if hdrs.get(b"sec-websocket-accept") != want:
        raise ConnectionError("wrong Sec-WebSocket-Accept")
    return rest


def cmd_pub(a: argparse.Namespace) -> int:
    """One mTLS connection; with --ws the WebSocket upgrade (path --path, subprotocol mqtt); MQTT
    CONNECT, wait for CONNACK; then --messages QoS 0 PUBLISHes of --size bytes to --topic, --batch
    packets per write (1: one TLS record per message, like mosquitto_pub -l; TCP_NODELAY off unless
    --nodelay, as in mosquitto_pub, so that the kernel merges small records); DISCONNECT (and a
    close frame with --ws), close. With --ws every MQTT packet is one masked binary frame; the
    frames are prebuilt with 256 different random masking keys (the proxy unmasks every byte
    either way), so that the generator spends its time in ssl writes, not in Python masking."""
    signal.signal(signal.SIGTERM, _term)
    ctx = client_ssl_context(a.ca, a.cert, a.key)
    t0 = time.monotonic_ns()
    raw = socket.create_connection((a.host, a.port), timeout=a.max_seconds)
    if a.nodelay:  # off by default, as in mosquitto_pub (without --nodelay): Nagle merges small records
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    rest = ws_upgrade(s, a.host, a.port, a.path, 10) if a.ws else b""
    wrap = ws_client_frame if a.ws else (lambda p: p)
    s.sendall(wrap(mqtt_connect(a.client_id or f"pub-{os.getpid()}", keepalive=600)))
    rd, wr = MqttReader(), WsReader()
    deadline = time.monotonic() + 10
    connack = None
    data = rest
    while connack is None:
        pkts = [p for op, p in wr.feed(data) if op in (0x0, 0x2)] if a.ws else [data]
        for p in pkts:
            for first, body in rd.feed(p):
                if first == 0x20:
                    connack = body
        if connack is not None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("no CONNACK")
        data = s.recv(4096)
        if not data:
            raise ConnectionError("closed before CONNACK")
    if len(connack) < 2 or connack[1] != 0:
        emit({"error": f"CONNACK refused: {connack.hex()}"})
        return 1
    t_conn = time.monotonic_ns()
    pkt = mqtt_publish_header(a.topic, a.size) + b"x" * a.size
    variants = [wrap(pkt) for _ in range(256 if a.ws else 1)]
    batch = max(1, a.batch)
    blocks = [b"".join(variants[(i + j) % len(variants)] for j in range(batch)) for i in range(len(variants))]
    full, tail = divmod(a.messages, batch)
    sent = 0
    stop = time.monotonic() + a.max_seconds
    nb = len(blocks)
    for i in range(full):
        s.sendall(blocks[i % nb])
        if not i & 4095 and time.monotonic() > stop:
            break
        sent += batch
    if sent == full * batch and tail:
        s.sendall(b"".join(variants[j % len(variants)] for j in range(tail)))
        sent += tail
    t_sent = time.monotonic_ns()
    try:
        s.sendall(wrap(MQTT_DISCONNECT))
        if a.ws:
            s.sendall(ws_client_frame((1000).to_bytes(2, "big"), opcode=0x8))
        s.settimeout(5)
        while s.recv(4096):  # the broker closes after DISCONNECT (the server answers the close frame)
            pass
    except OSError:
        pass
    finally:
        s.close()
    emit({"sent": sent, "messages": a.messages, "ws": bool(a.ws), "t_start_ns": t0, "t_connected_ns": t_conn,
          "t_sent_ns": t_sent, "t_closed_ns": time.monotonic_ns()})
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, tls_required: bool) -> None:
        sp.add_argument("--host", default="127.0.0.1")
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--ca", required=tls_required)
        sp.add_argument("--cert", required=tls_required)
        sp.add_argument("--key", required=tls_required)
        sp.add_argument("--max-seconds", type=float, default=600)

    sp = sub.add_parser("sink")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=0)
    sp.add_argument("--max-seconds", type=float, default=3600)
    sp.add_argument("--conn-timeout", type=float, default=120)
    sp.add_argument("--no-connack", dest="connack", action="store_false")

    sp = sub.add_parser("bulk")
    common(sp, True)
    sp.add_argument("--mb", type=int, default=1024, help="MiB of application data to send")
    sp.add_argument("--chunk-kib", type=int, default=256, help="PUBLISH payload size")

    sp = sub.add_parser("idle")
    common(sp, True)
    sp.add_argument("--conns", type=int, default=5000)
    sp.add_argument("--concurrency", type=int, default=64)
    sp.add_argument("--open-seconds", type=float, default=180)
    sp.add_argument("--conn-timeout", type=float, default=30)
    sp.add_argument("--keepalive", type=int, default=3600)
    sp.add_argument("--disconnect", action="store_true", help="send DISCONNECT before closing")

    sp = sub.add_parser("silent")
    common(sp, False)
    sp.add_argument("--conns", type=int, default=5000)
    sp.add_argument("--concurrency", type=int, default=256, help="connections being opened at once")
    sp.add_argument("--open-seconds", type=float, default=180)
    sp.add_argument("--conn-timeout", type=float, default=30)

    sp = sub.add_parser("latency")
    common(sp, False)
    sp.add_argument("--rate", type=float, default=1000)
    sp.add_argument("--seconds", type=float, default=5)
    sp.add_argument("--warmup", type=float, default=0.5)
    sp.add_argument("--size", type=int, default=64, help="payload bytes (>= 12)")

    sp = sub.add_parser("connect")
    common(sp, True)
    sp.add_argument("--conns", type=int, default=1000)
    sp.add_argument("--client-id", default="bench")
    sp.add_argument("--conn-timeout", type=float, default=15)

    sp = sub.add_parser("pub")
    common(sp, True)
    sp.add_argument("--messages", type=int, default=200_000)
    sp.add_argument("--size", type=int, default=64, help="payload bytes")
    sp.add_argument("--topic", default="bench/pub/data")
    sp.add_argument("--client-id", default="")
    sp.add_argument("--batch", type=int, default=1, help="MQTT packets per write (1: one TLS record each)")
    sp.add_argument("--ws", action="store_true", help="MQTT over WebSocket (RFC 6455, masked binary frames)")
    sp.add_argument("--path", default="/mqtt", help="WebSocket request path")
    sp.add_argument("--nodelay", action="store_true",
                    help="TCP_NODELAY (default off, as mosquitto_pub without --nodelay)")

    sp = sub.add_parser("broker")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=0)
    sp.add_argument("--max-seconds", type=float, default=3600)

    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _term)
    return {"sink": cmd_sink, "bulk": cmd_bulk, "idle": cmd_idle, "silent": cmd_silent, "latency": cmd_latency,
            "connect": cmd_connect, "broker": cmd_broker, "pub": cmd_pub}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
