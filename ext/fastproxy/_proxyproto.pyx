# cython: language_level=3
"""Python wrappers around ext/src/proxy_v2.c (PROXY protocol v1/v2 builder and parser).

Public entry points are re-exported by fastproxy.proxy_protocol, which also defines the
result types (ProxyHeader, SSLInfo) and the constants; see docs/proxy-protocol.md.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

import os
import socket
import time

from proxyproto cimport *

cdef object _types = None


cdef object _t():
    """(ProxyHeader, SSLInfo, errors...) from the pure-Python side, imported on first use
    (fastproxy.proxy_protocol imports this module, so not at import time)."""
    global _types
    if _types is None:
        from fastproxy import proxy_protocol as pp
        from fastproxy import errors
        _types = (pp.ProxyHeader, pp.SSLInfo, errors.ProxyProtocolError,
                  errors.InvalidProxyHeaderError, errors.ProxyHeaderTooLongError)
    return _types


cdef object _err(str msg):
    return _t()[2](msg)


cdef bytes _as_bytes(object v, str what):
    if v is None:
        return None
    if isinstance(v, str):
        return (<str>v).encode("utf-8", "surrogateescape")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise TypeError(f"{what} must be str or bytes, not {type(v).__name__}")


cdef inline void _set(pp_str *s, bytes b):
    if b is None:
        s.ptr = NULL
        s.len = 0
    else:
        s.ptr = <const uint8_t *><const char *>b
        s.len = len(b)


cdef bytes _pack_ip(object host, int *fam):
    """Packed address and its family (4 or 6) from str / ipaddress object / packed bytes."""
    if isinstance(host, (bytes, bytearray)):
        if len(host) == 4:
            fam[0] = 4
            return bytes(host)
        if len(host) == 16:
            fam[0] = 6
            return bytes(host)
        raise _err(f"packed address must be 4 or 16 bytes, not {len(host)}")
    h = host if isinstance(host, str) else str(host)
    try:
        b = socket.inet_pton(socket.AF_INET, h)
        fam[0] = 4
        return b
    except OSError:
        pass
    try:
        b = socket.inet_pton(socket.AF_INET6, h)
        fam[0] = 6
        return b
    except OSError:
        raise _err(f"not an IPv4 or IPv6 address: {h!r}") from None


cdef int _port(object p) except -1:
    if not isinstance(p, int) or isinstance(p, bool) or not (0 <= p <= 65535):
        raise _err(f"port must be an int in 0-65535, not {p!r}")
    return <int>p


cdef bytes _unix_path(object p):
    b = os.fsencode(p) if isinstance(p, (str, os.PathLike)) else bytes(p)
    if len(b) > 108:
        raise _err(f"UNIX socket path longer than 108 bytes ({len(b)})")
    return b


cdef int _command_code(object command) except -2:
    """PP2_CMD_PROXY / PP2_CMD_LOCAL from "PROXY"/"LOCAL" (any case) or 1/0."""
    cdef str u
    cdef long c
    if isinstance(command, str):
        u = (<str>command).upper()
        if u == "PROXY":
            return PP2_CMD_PROXY
        if u == "LOCAL":
            return PP2_CMD_LOCAL
    elif type(command) is int:
        c = command
        if c == PP2_CMD_PROXY or c == PP2_CMD_LOCAL:
            return <int>c
    raise _err(f"command must be 'PROXY' or 'LOCAL', not {command!r}")


cdef int _is_dgram(object transport) except -1:
    cdef str u
    if transport is None:
        return 0
    if isinstance(transport, str):
        u = (<str>transport).lower()
        if u == "stream" or u == "tcp":
            return 0
        if u == "dgram" or u == "udp":
            return 1
    raise _err(f"transport must be 'stream' or 'dgram', not {transport!r}")


cdef int _fill_addresses(pp2_info *info, object src, object dst, object command,
                         object transport) except -1:
    cdef int fs = 0, fd = 0, dgram, cmd
    cdef bytes bs, bd
    dgram = _is_dgram(transport)
    if command is None:
        cmd = PP2_CMD_PROXY if (src is not None and dst is not None) else PP2_CMD_LOCAL
    else:
        cmd = _command_code(command)
    if cmd == PP2_CMD_LOCAL:
        if src is not None or dst is not None:
            raise _err("a LOCAL header carries no addresses (pass src=None, dst=None)")
        info.command = PP2_CMD_LOCAL
        info.fam = PP2_AF_UNSPEC
        return 0
    info.command = PP2_CMD_PROXY
    if src is None and dst is None:
        info.fam = PP2_AF_UNSPEC
        return 0
    if src is None or dst is None:
        raise _err("give both src and dst, or neither")
    if isinstance(src, tuple) and isinstance(dst, tuple):
        if len(src) != 2 or len(dst) != 2:
            raise _err("addresses are (host, port) tuples")
        bs = _pack_ip(src[0], &fs)
        bd = _pack_ip(dst[0], &fd)
        info.src_port = <uint16_t>_port(src[1])
        info.dst_port = <uint16_t>_port(dst[1])
        if fs == 4 and fd == 4:
            info.fam = PP2_UDP4 if dgram else PP2_TCP4
            memcpy(info.src_addr, <const char *>bs, 4)
            memcpy(info.dst_addr, <const char *>bd, 4)
        else:
            # HAProxy's v4tov6: a mixed pair goes out as IPv6 with ::ffff:a.b.c.d
            if fs == 4:
                bs = b"\x00" * 10 + b"\xff\xff" + bs
            if fd == 4:
                bd = b"\x00" * 10 + b"\xff\xff" + bd
            info.fam = PP2_UDP6 if dgram else PP2_TCP6
            memcpy(info.src_addr, <const char *>bs, 16)
            memcpy(info.dst_addr, <const char *>bd, 16)
        return 0
    if isinstance(src, tuple) or isinstance(dst, tuple):
        raise _err("src and dst must both be (host, port) tuples or both UNIX paths")
    bs = _unix_path(src)
    bd = _unix_path(dst)
    info.fam = PP2_UNIX_DGRAM if dgram else PP2_UNIX_STREAM
    memcpy(info.src_addr, <const char *>bs, len(bs))
    memcpy(info.dst_addr, <const char *>bd, len(bd))
    return 0


cdef bytes _encode_tlvs(object tlvs):
    parts = []
    for item in tlvs:
        t, v = item
        vb = _as_bytes(v, "TLV value")
        if not isinstance(t, int) or not (0 <= t <= 255):
            raise _err(f"TLV type must be an int in 0-255, not {t!r}")
        if len(vb) > 65535:
            raise _err("TLV value longer than 65535 bytes")
        parts.append(bytes((t, len(vb) >> 8, len(vb) & 0xff)) + vb)
    return b"".join(parts)


def build_v2(src=None, dst=None, *, command=None, transport="stream", alpn=None,
             authority=None, unique_id=None, ssl=None, crc32c=False, netns=None,
             tlvs=(), noop=None, int max_length=PP2_DEFAULT_MAX_LEN):
    """Build a PROXY protocol v2 header.

    src / dst: (host, port) for TCP over IPv4/IPv6 (a v4/v6 mix is sent as IPv6 with
    v4-mapped addresses, as HAProxy does), or str/bytes paths for AF_UNIX, or None (with
    command "LOCAL", the default when no addresses are given). TLVs are written in HAProxy
    2.6's order: CRC32C (crc32c=True), ALPN, AUTHORITY, UNIQUE_ID, SSL (ssl=SSLInfo),
    NETNS, then `tlvs` ((type, value) pairs) and a NOOP TLV of `noop` zero bytes.
    Raises ProxyHeaderTooLongError above max_length bytes (default 500).
    """
    cdef pp2_info info
    cdef int n
    cdef long size
    cdef bytes b_alpn, b_auth, b_uid, b_ver, b_cn, b_kalg, b_salg, b_ciph, b_ns, b_extra
    pp2_info_init(&info)
    _fill_addresses(&info, src, dst, command, transport)
    b_alpn = _as_bytes(alpn, "alpn")
    b_auth = _as_bytes(authority, "authority")
    b_uid = _as_bytes(unique_id, "unique_id")
    b_ns = _as_bytes(netns, "netns")
    _set(&info.alpn, b_alpn)
    _set(&info.authority, b_auth)
    _set(&info.unique_id, b_uid)
    _set(&info.netns, b_ns)
    if b_auth is not None and len(b_auth) > 255:
        raise _err("authority longer than 255 bytes (receivers such as HAProxy refuse it)")
    if b_uid is not None and len(b_uid) > 128:
        raise _err("unique_id longer than 128 bytes (the spec's limit)")
    if crc32c:
        info.flags |= PP2_F_CRC32C
    if ssl is not None:
        info.flags |= PP2_F_SSL
        client = ssl.client
        verify = ssl.verify
        if not isinstance(client, int) or not (0 <= client <= 255):
            raise _err(f"SSLInfo.client must be an int in 0-255, not {client!r}")
        if not isinstance(verify, int) or not (0 <= verify <= 0xFFFFFFFF):
            raise _err(f"SSLInfo.verify must be an int in 0-0xFFFFFFFF, not {verify!r}")
        info.ssl_client = <uint8_t>client
        info.ssl_verify = <uint32_t>verify
        b_ver = _as_bytes(ssl.version, "SSLInfo.version")
        b_cn = _as_bytes(ssl.cn, "SSLInfo.cn")
        b_kalg = _as_bytes(ssl.key_alg, "SSLInfo.key_alg")
        b_salg = _as_bytes(ssl.sig_alg, "SSLInfo.sig_alg")
        b_ciph = _as_bytes(ssl.cipher, "SSLInfo.cipher")
        _set(&info.ssl_version, b_ver)
        _set(&info.ssl_cn, b_cn)
        _set(&info.ssl_key_alg, b_kalg)
        _set(&info.ssl_sig_alg, b_salg)
        _set(&info.ssl_cipher, b_ciph)
    b_extra = _encode_tlvs(tlvs) if tlvs else None
    _set(&info.extra_tlvs, b_extra)
    if noop is not None:
        if not isinstance(noop, int) or not (0 <= noop <= 65535):
            raise _err(f"noop must be an int in 0-65535, not {noop!r}")
        info.noop_len = noop
    if max_length < 16:
        raise _err("max_length must be at least 16")
    info.max_len = <size_t>max_length
    size = pp2_build_size(&info)
    if size == PP_ERR_TOO_LONG:
        raise _err("PROXY v2 header longer than 65551 bytes (16-bit length field)")
    if size < 0:
        raise _err("invalid PROXY v2 header fields")
    if size > max_length:
        raise _t()[4](size, max_length)
    out = PyBytes_FromStringAndSize(NULL, size)
    n = pp2_build(&info, <uint8_t *><char *>out, <size_t>size)
    if n != size:  # pragma: no cover - measured above
        raise _err(f"pp2_build failed ({n})")
    return out


def build_v1(src=None, dst=None, *, int max_length=107):
    """Build a PROXY protocol v1 line: "PROXY TCP4|TCP6 src dst sport dport\\r\\n" for
    (host, port) pairs (a v4/v6 mix becomes TCP6 with ::ffff:a.b.c.d, as HAProxy does),
    "PROXY UNKNOWN\\r\\n" when src and dst are None."""
    cdef pp2_info info
    cdef char buf[128]
    cdef int n
    pp2_info_init(&info)
    if src is None and dst is None:
        info.command = PP2_CMD_LOCAL
    else:
        if not (isinstance(src, tuple) and isinstance(dst, tuple)):
            raise _err("v1 addresses are (host, port) tuples (UNIX sockets: pass None for UNKNOWN)")
        _fill_addresses(&info, src, dst, "PROXY", "stream")
    n = pp1_build(&info, buf, sizeof(buf))
    if n < 0:  # pragma: no cover
        raise _err(f"pp1_build failed ({n})")
    if n > max_length:
        raise _t()[4](n, max_length)
    return PyBytes_FromStringAndSize(buf, n)


cdef str _ip_text(const uint8_t *a, int v6):
    cdef char buf[64]
    cdef int n
    if v6:
        n = pp_format_ipv6(a, buf, sizeof(buf))
    else:
        n = pp_format_ipv4(a, buf, sizeof(buf))
    return buf[:n].decode("ascii")


cdef str _unix_text(const uint8_t *a):
    cdef Py_ssize_t n = 108
    while n > 0 and a[n - 1] == 0:
        n -= 1
    return os.fsdecode(PyBytes_FromStringAndSize(<const char *>a, n))


cdef str _text(bytes b):
    return b.decode("utf-8", "surrogateescape")


cdef object _decode_ssl(pp_tlv *t):
    cdef uint8_t client = 0
    cdef uint32_t verify = 0
    cdef pp_tlv_iter sub
    cdef pp_tlv s
    cdef int r
    pp_tlv_ssl_open(t, &client, &verify, &sub)
    fields = {}
    subs = []
    names = {PP2_SUBTYPE_SSL_VERSION: "version", PP2_SUBTYPE_SSL_CN: "cn",
             PP2_SUBTYPE_SSL_CIPHER: "cipher", PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
             PP2_SUBTYPE_SSL_KEY_ALG: "key_alg"}
    while True:
        r = pp_tlv_next(&sub, &s)
        if r != 1:
            break
        v = PyBytes_FromStringAndSize(<const char *>s.value, s.len)
        subs.append((s.type, v))
        name = names.get(s.type)
        if name is not None and name not in fields:
            fields[name] = _text(v)
    return _t()[1](client=client, verify=verify, tlvs=tuple(subs), **fields)


def parse(data, *, int max_length=PP_PARSE_DEFAULT_MAX):
    """Parse a PROXY v1 or v2 header at the start of `data` (bytes-like).

    Returns a ProxyHeader (its .length is the number of bytes to consume), or None when
    `data` is a proper prefix of a header that may still be valid (read more, call again).
    Raises InvalidProxyHeaderError otherwise. v2 headers longer than max_length are
    refused (default 4096; at most 65551).
    """
    cdef Py_buffer buf
    cdef pp_result res
    cdef int r
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        r = pp_parse_ex(<const uint8_t *>buf.buf, <size_t>buf.len,
                        <size_t>max_length if max_length > 0 else 0, &res)
        if r == PP_NEED_MORE:
            return None
        if r != PP_VALID:
            raise _t()[3](res.reason.decode("ascii") if res.reason != NULL else "invalid",
                          res.error_offset)
        return _to_header(&res)
    finally:
        PyBuffer_Release(&buf)


cdef object _to_header(pp_result *res):
    cdef pp_tlv_iter it
    cdef pp_tlv t
    cdef int v6
    fam = res.fam & 0xF0
    trans = res.fam & 0x0F
    family = {0x00: "UNSPEC", 0x10: "INET", 0x20: "INET6", 0x30: "UNIX"}[fam]
    transport = {0: "UNSPEC", 1: "STREAM", 2: "DGRAM"}[trans]
    src = dst = sport = dport = None
    if fam == 0x10 or fam == 0x20:
        v6 = fam == 0x20
        src = _ip_text(res.src_addr, v6)
        dst = _ip_text(res.dst_addr, v6)
        sport = res.src_port
        dport = res.dst_port
    elif fam == 0x30:
        src = _unix_text(res.src_addr)
        dst = _unix_text(res.dst_addr)
    tlvs = []
    typed = {}
    pp_tlv_iter_init(&it, res.tlv, res.tlv_len)
    while pp_tlv_next(&it, &t) == 1:
        v = PyBytes_FromStringAndSize(<const char *>t.value, t.len)
        tlvs.append((t.type, v))
        if t.type in typed:
            continue
        if t.type == PP2_TYPE_ALPN:
            typed[t.type] = ("alpn", v)
        elif t.type == PP2_TYPE_AUTHORITY:
            typed[t.type] = ("authority", _text(v))
        elif t.type == PP2_TYPE_UNIQUE_ID:
            typed[t.type] = ("unique_id", v)
        elif t.type == PP2_TYPE_NETNS:
            typed[t.type] = ("netns", _text(v))
        elif t.type == PP2_TYPE_SSL:
            typed[t.type] = ("ssl", _decode_ssl(&t))
    kw = {name: value for name, value in typed.values()}
    return _t()[0](
        version=res.version,
        command="PROXY" if res.command == PP2_CMD_PROXY else "LOCAL",
        family=family, transport=transport,
        src_addr=src, dst_addr=dst, src_port=sport, dst_port=dport,
        length=res.header_len, tlvs=tuple(tlvs),
        crc32c=res.crc32c if res.has_crc32c else None,
        **kw)


def crc32c(data) -> int:
    """CRC32C (Castagnoli) of a bytes-like object: crc32c(b"123456789") == 0xE3069283."""
    cdef Py_buffer buf
    cdef uint32_t c
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    c = pp_crc32c(<const uint8_t *>buf.buf, <size_t>buf.len)
    PyBuffer_Release(&buf)
    return c


def find_control_char(data) -> int:
    """Index of the first control character (0x00-0x1F, 0x7F) in a str/bytes, or -1."""
    cdef bytes b = _as_bytes(data, "data")
    return pp_find_ctl(<const uint8_t *><const char *>b, len(b))


def _bench_c(str what, long n):
    """Nanoseconds per call of the C function alone, over n calls (for benchmarks):
    what = "build_v2_ssl_cn" | "parse_v2_ssl_cn" | "build_v1" | "parse_v1"."""
    cdef pp2_info info
    cdef pp_result res
    cdef uint8_t out[512]
    cdef char out1[128]
    cdef long i
    cdef long acc = 0
    cdef bytes hdr
    cdef const uint8_t *hp
    cdef size_t hn
    pp2_info_init(&info)
    _fill_addresses(&info, ("203.0.113.7", 51234), ("127.0.0.1", 8883), "PROXY", "stream")
    ver, cn, ciph = b"TLSv1.3", b"sensor-0042.plant-7.example.com", b"TLS_AES_256_GCM_SHA384"
    info.flags = PP2_F_SSL
    info.ssl_client = 0x07
    info.ssl_verify = 0
    _set(&info.ssl_version, ver)
    _set(&info.ssl_cn, cn)
    _set(&info.ssl_cipher, ciph)
    if what == "build_v2_ssl_cn":
        t0 = time.perf_counter_ns()
        with nogil:
            for i in range(n):
                acc += pp2_build(&info, out, sizeof(out))
        t1 = time.perf_counter_ns()
    elif what == "build_v1":
        t0 = time.perf_counter_ns()
        with nogil:
            for i in range(n):
                acc += pp1_build(&info, out1, sizeof(out1))
        t1 = time.perf_counter_ns()
    elif what in ("parse_v2_ssl_cn", "parse_v1"):
        if what == "parse_v1":
            hn = pp1_build(&info, out1, sizeof(out1))
            hdr = PyBytes_FromStringAndSize(out1, hn)
        else:
            hn = pp2_build(&info, out, sizeof(out))
            hdr = PyBytes_FromStringAndSize(<const char *>out, hn)
        hp = <const uint8_t *><const char *>hdr
        t0 = time.perf_counter_ns()
        with nogil:
            for i in range(n):
                acc += pp_parse_ex(hp, hn, 4096, &res)
        t1 = time.perf_counter_ns()
    else:
        raise ValueError(what)
    if acc == 0:  # keep the loop
        raise RuntimeError("benchmark loop produced nothing")
    return (t1 - t0) / n
