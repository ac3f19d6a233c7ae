"""A small, readable pure-Python PROXY protocol v1/v2 builder and parser.

It is the specification (HAProxy's doc/proxy-protocol.txt) written out plainly, with the
same strictness rules as the C parser (ext/src/proxy_v2.c), so tests can compare the two
on random input. Speed is not a goal; clarity is. IPv6 text goes through the C library's
inet_pton / inet_ntop (an implementation independent of ours).
"""
from __future__ import annotations

import os
import re
import socket
import struct

from fastproxy.proxy_protocol import ProxyHeader, SSLInfo

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# family/transport byte -> (family name, transport name, address block length)
FAMILIES = {
    0x00: ("UNSPEC", "UNSPEC", 0),
    0x11: ("INET", "STREAM", 12),
    0x12: ("INET", "DGRAM", 12),
    0x21: ("INET6", "STREAM", 36),
    0x22: ("INET6", "DGRAM", 36),
    0x31: ("UNIX", "STREAM", 216),
    0x32: ("UNIX", "DGRAM", 216),
}

TYPE_ALPN, TYPE_AUTHORITY, TYPE_CRC32C, TYPE_NOOP, TYPE_UNIQUE_ID = 0x01, 0x02, 0x03, 0x04, 0x05
TYPE_SSL, TYPE_NETNS = 0x20, 0x30
SUB_VERSION, SUB_CN, SUB_CIPHER, SUB_SIG_ALG, SUB_KEY_ALG = 0x21, 0x22, 0x23, 0x24, 0x25


class NeedMore(Exception):
    """The bytes are a proper prefix of what may still become a valid header."""


class Invalid(Exception):
    """The bytes can never become a valid header."""


# ---- CRC32C ---------------------------------------------------------------------------
def crc32c(data: bytes) -> int:
    """Bit-by-bit CRC32C (reflected Castagnoli polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# ---- builder --------------------------------------------------------------------------
def tlv(type_: int, value: bytes) -> bytes:
    return struct.pack("!BH", type_, len(value)) + value


def _b(v: str | bytes) -> bytes:
    return v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)


def _packed(host: str) -> tuple[int, bytes]:
    try:
        return 4, socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return 6, socket.inet_pton(socket.AF_INET6, host)


def build_v2(src=None, dst=None, *, command=None, transport="stream", alpn=None,
             authority=None, unique_id=None, ssl: SSLInfo | None = None, crc32c_=False,
             netns=None, tlvs=(), noop=None) -> bytes:
    if command is None:
        command = "PROXY" if src is not None else "LOCAL"
    dgram = transport == "dgram"
    if command == "LOCAL":
        ver_cmd, fam, addresses = 0x20, 0x00, b""
    elif src is None:
        ver_cmd, fam, addresses = 0x21, 0x00, b""
    elif isinstance(src, tuple):
        ver_cmd = 0x21
        (fs, s), (fd, d) = _packed(src[0]), _packed(dst[0])
        if fs == fd == 4:
            fam = 0x12 if dgram else 0x11
        else:  # a v4/v6 mix goes out as IPv6 with ::ffff:a.b.c.d
            s = s if fs == 6 else b"\0" * 10 + b"\xff\xff" + s
            d = d if fd == 6 else b"\0" * 10 + b"\xff\xff" + d
            fam = 0x22 if dgram else 0x21
        addresses = s + d + struct.pack("!HH", src[1], dst[1])
    else:
        ver_cmd, fam = 0x21, (0x32 if dgram else 0x31)
        addresses = os.fsencode(src).ljust(108, b"\0") + os.fsencode(dst).ljust(108, b"\0")

    body = b""
    crc_at = None
    if crc32c_:
        crc_at = 16 + len(addresses) + 3
        body += tlv(TYPE_CRC32C, b"\0\0\0\0")
    if alpn is not None:
        body += tlv(TYPE_ALPN, _b(alpn))
    if authority is not None:
        body += tlv(TYPE_AUTHORITY, _b(authority))
    if unique_id is not None:
        body += tlv(TYPE_UNIQUE_ID, _b(unique_id))
    if ssl is not None:
        value = struct.pack("!BI", ssl.client, ssl.verify)
        for sub, v in ((SUB_VERSION, ssl.version), (SUB_CN, ssl.cn), (SUB_KEY_ALG, ssl.key_alg),
                       (SUB_SIG_ALG, ssl.sig_alg), (SUB_CIPHER, ssl.cipher)):
            if v is not None:
                value += tlv(sub, _b(v))
        body += tlv(TYPE_SSL, value)
    if netns is not None:
        body += tlv(TYPE_NETNS, _b(netns))
    for t, v in tlvs:
        body += tlv(t, _b(v))
    if noop is not None:
        body += tlv(TYPE_NOOP, b"\0" * noop)

    rest = addresses + body
    header = bytearray(SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", len(rest)) + rest)
    if crc_at is not None:
        header[crc_at:crc_at + 4] = struct.pack("!I", crc32c(bytes(header)))
    return bytes(header)


def build_v1(src=None, dst=None) -> bytes:
    if src is None:
        return b"PROXY UNKNOWN\r\n"
    (fs, s), (fd, d) = _packed(src[0]), _packed(dst[0])
    if fs == fd == 4:
        proto, s_txt, d_txt = "TCP4", socket.inet_ntop(socket.AF_INET, s), socket.inet_ntop(socket.AF_INET, d)
    else:
        s = s if fs == 6 else b"\0" * 10 + b"\xff\xff" + s
        d = d if fd == 6 else b"\0" * 10 + b"\xff\xff" + d
        proto, s_txt, d_txt = "TCP6", socket.inet_ntop(socket.AF_INET6, s), socket.inet_ntop(socket.AF_INET6, d)
    return f"PROXY {proto} {s_txt} {d_txt} {src[1]} {dst[1]}\r\n".encode()


# ---- parser ---------------------------------------------------------------------------
def parse(data: bytes, max_length: int = 4096) -> ProxyHeader | None:
    """ProxyHeader, None when more bytes are needed; raises Invalid."""
    data = bytes(data)
    try:
        if not data:
            raise NeedMore
        if data[:1] == b"P":
            return _parse_v1(data)
        if data[:1] == b"\r":
            return _parse_v2(data, max(16, min(max_length, 16 + 65535)))
        raise Invalid("not a PROXY protocol header")
    except NeedMore:
        return None


def _need(data: bytes, n: int) -> None:
    if len(data) < n:
        raise NeedMore


def _parse_v2(data: bytes, max_length: int) -> ProxyHeader:
    if not SIGNATURE.startswith(data[:12]):
        raise Invalid("bad signature")
    _need(data, 13)
    if data[12] >> 4 != 2:
        raise Invalid("version")
    command = data[12] & 0x0F
    if command not in (0, 1):
        raise Invalid("command")
    _need(data, 14)
    if data[13] not in FAMILIES:
        raise Invalid("family")
    family, transport, addr_len = FAMILIES[data[13]]
    _need(data, 16)
    (length,) = struct.unpack("!H", data[14:16])
    total = 16 + length
    if total > max_length:
        raise Invalid("too long")
    if length < addr_len:
        raise Invalid("address block does not fit")
    _need(data, total)
    header = data[:total]

    src = dst = sport = dport = None
    a = header[16:16 + addr_len]
    if family == "INET":
        src, dst = socket.inet_ntop(socket.AF_INET, a[0:4]), socket.inet_ntop(socket.AF_INET, a[4:8])
        sport, dport = struct.unpack("!HH", a[8:12])
    elif family == "INET6":
        src, dst = socket.inet_ntop(socket.AF_INET6, a[0:16]), socket.inet_ntop(socket.AF_INET6, a[16:32])
        sport, dport = struct.unpack("!HH", a[32:36])
    elif family == "UNIX":
        src, dst = os.fsdecode(a[:108].rstrip(b"\0")), os.fsdecode(a[108:].rstrip(b"\0"))

    tlvs = _split_tlvs(header, 16 + addr_len, total)
    crc = None
    fields: dict = {}
    for offset, t, v in tlvs:
        if t == TYPE_CRC32C:
            if len(v) != 4:
                raise Invalid("CRC32C length")
            if crc is not None:
                raise Invalid("two CRC32C TLVs")
            crc = (struct.unpack("!I", v)[0], offset)
        elif t == TYPE_AUTHORITY and len(v) > 255:
            raise Invalid("authority too long")
        elif t == TYPE_UNIQUE_ID and len(v) > 128:
            raise Invalid("unique id too long")
        elif t == TYPE_SSL:
            if len(v) < 5:
                raise Invalid("SSL TLV too short")
            subs = _split_tlvs(v, 5, len(v))
            if "ssl" not in fields:
                fields["ssl"] = _ssl_info(v, subs)
        if t == TYPE_ALPN:
            fields.setdefault("alpn", v)
        elif t == TYPE_AUTHORITY:
            fields.setdefault("authority", v.decode("utf-8", "surrogateescape"))
        elif t == TYPE_UNIQUE_ID:
            fields.setdefault("unique_id", v)
        elif t == TYPE_NETNS:
            fields.setdefault("netns", v.decode("utf-8", "surrogateescape"))
    if crc is not None:
        value, offset = crc
        zeroed = header[:offset + 3] + b"\0\0\0\0" + header[offset + 7:]
        if crc32c(zeroed) != value:
            raise Invalid("CRC32C mismatch")
    return ProxyHeader(
        version=2, command="PROXY" if command else "LOCAL", family=family, transport=transport,
        src_addr=src, dst_addr=dst, src_port=sport, dst_port=dport, length=total,
        tlvs=tuple((t, v) for _, t, v in tlvs), crc32c=crc[0] if crc else None, **fields)


def _split_tlvs(buf: bytes, start: int, end: int) -> list[tuple[int, int, bytes]]:
    """(offset, type, value) for each TLV in buf[start:end]; they must fill it exactly."""
    out = []
    pos = start
    while pos < end:
        if end - pos < 3:
            raise Invalid("truncated TLV header")
        t, n = struct.unpack("!BH", buf[pos:pos + 3])
        if pos + 3 + n > end:
            raise Invalid("TLV overrun")
        out.append((pos, t, buf[pos + 3:pos + 3 + n]))
        pos += 3 + n
    return out


def _ssl_info(value: bytes, subs: list[tuple[int, int, bytes]]) -> SSLInfo:
    client, verify = struct.unpack("!BI", value[:5])
    names = {SUB_VERSION: "version", SUB_CN: "cn", SUB_CIPHER: "cipher",
             SUB_SIG_ALG: "sig_alg", SUB_KEY_ALG: "key_alg"}
    fields: dict = {}
    for _, t, v in subs:
        if t in names:
            fields.setdefault(names[t], v.decode("utf-8", "surrogateescape"))
    return SSLInfo(client=client, verify=verify, tlvs=tuple((t, v) for _, t, v in subs), **fields)


_DEC = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")


def _parse_v1(data: bytes) -> ProxyHeader:
    if not b"PROXY ".startswith(data[:6]):
        raise Invalid("prefix")
    window = data[:107]
    lf = window.find(b"\n")
    cr_bad = [i for i in range(min(len(data), 107)) if data[i:i + 1] == b"\r"
              and i + 1 < len(data) and data[i + 1:i + 2] != b"\n"]
    if cr_bad and (lf < 0 or cr_bad[0] < lf):
        raise Invalid("CR without LF")
    if lf < 0:
        if len(data) >= 107:
            raise Invalid("no CRLF within 107 bytes")
        _v1_prefix_check(data)
        raise NeedMore
    if lf == 0 or data[lf - 1:lf] != b"\r":
        raise Invalid("LF without CR")
    line = data[:lf + 1]
    if len(line) < 15:
        raise Invalid("too short")
    body = line[6:-2]
    if body.startswith(b"UNKNOWN") and body[7:8] in (b"", b" "):
        return ProxyHeader(version=1, command="PROXY", family="UNSPEC", transport="UNSPEC",
                           src_addr=None, dst_addr=None, src_port=None, dst_port=None,
                           length=len(line))
    if body[:5] not in (b"TCP4 ", b"TCP6 "):
        raise Invalid("protocol")
    fields = body[5:].split(b" ")
    if len(fields) != 4 or b"" in fields:
        raise Invalid("fields")
    src, dst, sport, dport = fields
    for port in (sport, dport):
        if not _DEC.fullmatch(port) or int(port) > 65535:
            raise Invalid("port")
    if body[:4] == b"TCP4":
        for a in (src, dst):
            if not _IPV4.fullmatch(a) or any(int(x) > 255 for x in a.split(b".")):
                raise Invalid("IPv4 address")
        family, af = "INET", socket.AF_INET
    else:
        family, af = "INET6", socket.AF_INET6
    try:
        s_packed = socket.inet_pton(af, src.decode("ascii"))
        d_packed = socket.inet_pton(af, dst.decode("ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise Invalid("address") from None
    return ProxyHeader(version=1, command="PROXY", family=family, transport="STREAM",
                       src_addr=socket.inet_ntop(af, s_packed), dst_addr=socket.inet_ntop(af, d_packed),
                       src_port=int(sport), dst_port=int(dport), length=len(line))


def _v1_prefix_check(data: bytes) -> None:
    """Reject early what can no longer become a valid line (no CRLF seen yet)."""
    proto = data[6:]
    if not proto:
        return
    for name, allowed in ((b"TCP4 ", b"0123456789. \r"),
                          (b"TCP6 ", b"0123456789abcdefABCDEF.: \r"),
                          (b"UNKNOWN", None)):
        if name.startswith(proto[:len(name)]):
            rest = proto[len(name):]
            if allowed is None:
                if rest and rest[:1] not in (b" ", b"\r"):
                    raise Invalid("UNKNOWN followed by garbage")
            elif any(c not in allowed for c in rest):
                raise Invalid("character")
            return
    raise Invalid("protocol")
