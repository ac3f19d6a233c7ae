"""A recording upstream for the PROXY protocol end-to-end tests (tests/test_proxy_e2e.py).

`Recorder` listens on loopback and keeps, per accepted connection, every byte it received,
the first recv() chunk on its own, and the PROXY header (v1 or v2, found with
fastproxy.proxy_protocol.parse) split from what followed it. By default it also plays a
minimal MQTT broker after the header so that clients see a normal session: CONNACK 0 for a
CONNECT (in the CONNECT's protocol version), PINGRESP for PINGREQ, and it closes on
DISCONNECT. Nothing here mocks a socket; all waits are bounded.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from fastproxy import proxy_protocol as pp
from proxyutil import HOST, ThreadedServer


@dataclass
class Recording:
    """What one upstream connection carried."""

    peer: tuple
    data: bytearray = field(default_factory=bytearray)   # every byte received, in order
    first_chunk: bytes = b""                              # the first recv() (one write on loopback)
    header: bytes | None = None      # the PROXY header bytes; b"" when the stream had none
    header_error: str | None = None  # set when the start looked like a header but was refused
    packets: list = field(default_factory=list)           # raw MQTT packets after the header
    got_connect: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)

    @property
    def after(self) -> bytes:
        """The bytes that followed the header."""
        return bytes(self.data[len(self.header or b""):])

    @property
    def parsed(self) -> "pp.ProxyHeader":
        assert self.header, f"no PROXY header was received (first bytes {bytes(self.data[:32])!r})"
        return pp.parse(self.header)


def _split_packet(buf: bytes | bytearray, off: int) -> int:
    """End offset of the MQTT packet starting at off, or -1 when incomplete."""
    if len(buf) - off < 2:
        return -1
    length, mult, i = 0, 1, off + 1
    while True:
        if i >= len(buf) or i > off + 4:
            return -1
        b = buf[i]
        length += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            break
    end = i + length
    return end if end <= len(buf) else -1


class Recorder(ThreadedServer):
    """A loopback TCP server recording what its clients send (see the module docstring)."""

    def __init__(self, host: str = HOST, *, answer: bool = True) -> None:
        self.answer = answer
        self.conns: list[Recording] = []
        self._lock = threading.Lock()
        super().__init__(host, backlog=32, poll=0.1, join_timeout=5, join_sessions=2)

    # -- server side
    def on_accept(self, peer) -> Recording:
        rec = Recording(peer=peer)
        with self._lock:
            self.conns.append(rec)
        return rec

    def handle(self, conn: socket.socket, peer, rec: Recording) -> None:
        conn.settimeout(0.2)
        off = None  # offset of the next MQTT packet once the header is known
        deadline = time.monotonic() + 60
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    chunk = conn.recv(65536)
                except (socket.timeout, TimeoutError):
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                if not rec.data:
                    rec.first_chunk = chunk
                rec.data += chunk
                if rec.header is None:
                    first = rec.data[:1]
                    if first in (b"\r", b"P"):
                        try:
                            h = pp.parse(bytes(rec.data))
                        except pp.ProxyProtocolError as e:
                            rec.header_error = str(e)
                            rec.header = b""
                        else:
                            if h is None:
                                continue
                            rec.header = bytes(rec.data[:h.length])
                    else:
                        rec.header = b""
                    off = len(rec.header)
                while off is not None:
                    end = _split_packet(rec.data, off)
                    if end < 0:
                        break
                    pkt = bytes(rec.data[off:end])
                    off = end
                    rec.packets.append(pkt)
                    ptype = pkt[0] >> 4
                    if ptype == 1:
                        rec.got_connect.set()
                        if self.answer:
                            level = self._connect_level(pkt)
                            conn.sendall(b"\x20\x03\x00\x00\x00" if level == 5 else b"\x20\x02\x00\x00")
                    elif ptype == 12 and self.answer:
                        conn.sendall(b"\xd0\x00")
                    elif ptype == 14:
                        return
        except OSError:
            pass
        finally:
            rec.closed.set()
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _connect_level(pkt: bytes) -> int:
        """The protocol level byte of a CONNECT (4 when it cannot be read)."""
        i = 1
        while i < len(pkt) and pkt[i] & 0x80:
            i += 1
        i += 1  # the variable header starts here
        name_len = int.from_bytes(pkt[i:i + 2], "big")
        at = i + 2 + name_len
        return pkt[at] if at < len(pkt) else 4

    # -- test side
    def connection_count(self) -> int:
        with self._lock:
            return len(self.conns)

    def wait_connection(self, n: int = 1, timeout: float = 10.0) -> Recording:
        """The n-th connection (1-based) once it exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.conns) >= n:
                    return self.conns[n - 1]
            time.sleep(0.02)
        raise AssertionError(f"recorder on port {self.port}: expected {n} connection(s) within {timeout}s, "
                             f"got {self.connection_count()}")

    def wait_connect(self, n: int = 1, timeout: float = 10.0) -> Recording:
        """The n-th connection once its MQTT CONNECT arrived (after any PROXY header)."""
        rec = self.wait_connection(n, timeout)
        if not rec.got_connect.wait(timeout):
            raise AssertionError(f"recorder: connection {n} sent no complete CONNECT within {timeout}s; "
                                 f"received {bytes(rec.data[:200])!r} (header error: {rec.header_error})")
        return rec
