"""PROXY protocol v1/v2 headers: constants, result types and the public functions.

The work is done in C (ext/src/proxy_v2.c) through the compiled module
``fastproxy._proxyproto``; this module names things after the specification
(HAProxy's doc/proxy-protocol.txt) and holds the typed results.

    >>> from fastproxy import proxy_protocol as pp
    >>> hdr = pp.build_v2(("203.0.113.7", 51000), ("127.0.0.1", 8883),
    ...                   ssl=pp.SSLInfo(version="TLSv1.3", cn="sensor-1", verify=0,
    ...                                  client=pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN
    ...                                         | pp.PP2_CLIENT_CERT_SESS))
    >>> pp.parse(hdr + b"\\x10...").ssl.cn
    'sensor-1'

Builders refuse headers longer than ``max_length`` (default 500 bytes, Mosquitto 2.1's
limit) with ProxyHeaderTooLongError. ``parse`` returns None while more bytes are needed
and raises InvalidProxyHeaderError (a ProxyProtocolError) on anything malformed.
See docs/proxy-protocol.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastproxy.errors import (
    EngineNotBuiltError,
    InvalidProxyHeaderError,
    ProxyHeaderTooLongError,
    ProxyProtocolError,
)

__all__ = [
    "PP2_SIGNATURE", "PP2_HEADER_LEN", "PP2_VERSION", "PP2_CMD_LOCAL", "PP2_CMD_PROXY",
    "PP2_FAM_UNSPEC", "PP2_FAM_INET", "PP2_FAM_INET6", "PP2_FAM_UNIX",
    "PP2_TRANS_UNSPEC", "PP2_TRANS_STREAM", "PP2_TRANS_DGRAM",
    "PP2_TYPE_ALPN", "PP2_TYPE_AUTHORITY", "PP2_TYPE_CRC32C", "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID", "PP2_TYPE_SSL", "PP2_SUBTYPE_SSL_VERSION", "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_CIPHER", "PP2_SUBTYPE_SSL_SIG_ALG", "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_TYPE_NETNS", "PP2_CLIENT_SSL", "PP2_CLIENT_CERT_CONN", "PP2_CLIENT_CERT_SESS",
    "PP2_VERIFY_NO_CERT", "PP1_MAX_LEN", "PP2_DEFAULT_MAX_LEN", "PP_PARSE_DEFAULT_MAX",
    "SSLInfo", "ProxyHeader", "build_v1", "build_v2", "parse", "crc32c",
    "find_control_char", "cn_has_control_chars",
    "ProxyProtocolError", "InvalidProxyHeaderError", "ProxyHeaderTooLongError",
]

# ---- wire constants (doc/proxy-protocol.txt section 2.2) -----------------------------
PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_HEADER_LEN = 16
PP2_VERSION = 0x20
PP2_CMD_LOCAL = 0x00
PP2_CMD_PROXY = 0x01

PP2_FAM_UNSPEC = 0x00
PP2_FAM_INET = 0x10
PP2_FAM_INET6 = 0x20
PP2_FAM_UNIX = 0x30
PP2_TRANS_UNSPEC = 0x00
PP2_TRANS_STREAM = 0x01
PP2_TRANS_DGRAM = 0x02

PP2_ADDR_LEN_INET = 12
PP2_ADDR_LEN_INET6 = 36
PP2_ADDR_LEN_UNIX = 216

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

PP2_TYPE_MIN_CUSTOM = 0xE0
PP2_TYPE_MAX_CUSTOM = 0xEF

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

#: `verify` we send without a client certificate (X509_V_ERR_APPLICATION_VERIFICATION).
#: The spec says verify is zero only when a certificate was presented and verified;
#: HAProxy 2.6 sends 0 without one. This is our deliberate difference.
PP2_VERIFY_NO_CERT = 50

PP1_MAX_LEN = 107            # longest v1 line including CRLF
PP2_DEFAULT_MAX_LEN = 500    # default cap on built headers (Mosquitto 2.1: PROXY_PACKET_LIMIT)
PP_PARSE_DEFAULT_MAX = 4096  # default cap on parsed v2 headers
PP2_AUTHORITY_MAX = 255
PP2_UNIQUE_ID_MAX = 128

COMMANDS = {PP2_CMD_LOCAL: "LOCAL", PP2_CMD_PROXY: "PROXY"}
FAMILIES = {PP2_FAM_UNSPEC: "UNSPEC", PP2_FAM_INET: "INET", PP2_FAM_INET6: "INET6",
            PP2_FAM_UNIX: "UNIX"}
TRANSPORTS = {PP2_TRANS_UNSPEC: "UNSPEC", PP2_TRANS_STREAM: "STREAM", PP2_TRANS_DGRAM: "DGRAM"}


@dataclass(frozen=True)
class SSLInfo:
    """The PP2_TYPE_SSL TLV: client flags, verify result and the string sub-TLVs.

    Strings may be given as str (encoded UTF-8) or bytes (sent as given); parsed values
    are str decoded as UTF-8 with "surrogateescape", so ``cn.encode("utf-8",
    "surrogateescape")`` gives back the exact wire bytes. A sub-TLV is sent only when its
    field is not None, in HAProxy 2.6's order: VERSION, CN, KEY_ALG, SIG_ALG, CIPHER.
    key_alg and sig_alg describe the certificate the proxy presented (not the client's).
    """

    client: int = PP2_CLIENT_SSL
    verify: int = PP2_VERIFY_NO_CERT
    version: str | bytes | None = None
    cn: str | bytes | None = None
    cipher: str | bytes | None = None
    sig_alg: str | bytes | None = None
    key_alg: str | bytes | None = None
    #: raw sub-TLVs in wire order, as parsed (not used by the builder)
    tlvs: tuple[tuple[int, bytes], ...] = field(default=(), compare=False)

    @property
    def is_ssl(self) -> bool:
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def cert_conn(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_CONN)

    @property
    def cert_sess(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_SESS)

    @property
    def verified(self) -> bool:
        """A client certificate was presented and verified (verify == 0)."""
        return self.verify == 0 and bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY protocol header.

    Addresses are text ("192.0.2.1", "2001:db8::1", as inet_ntop writes them) for INET and
    INET6, the path (trailing NULs removed, os.fsdecode'd) for UNIX, None for UNSPEC. v1
    lines give family INET/INET6 with transport STREAM, or UNSPEC for "PROXY UNKNOWN".
    Typed TLV fields hold the first TLV of their type; ``tlvs`` keeps all of them raw.
    """

    version: int
    command: str
    family: str
    transport: str
    src_addr: str | None
    dst_addr: str | None
    src_port: int | None
    dst_port: int | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()
    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    crc32c: int | None = None
    netns: str | None = None
    ssl: SSLInfo | None = None

    @property
    def is_local(self) -> bool:
        return self.command == "LOCAL"

    @property
    def src(self) -> tuple[str, int] | str | None:
        if self.src_addr is None:
            return None
        return self.src_addr if self.src_port is None else (self.src_addr, self.src_port)

    @property
    def dst(self) -> tuple[str, int] | str | None:
        if self.dst_addr is None:
            return None
        return self.dst_addr if self.dst_port is None else (self.dst_addr, self.dst_port)

    def tlv(self, type_: int) -> bytes | None:
        """Value of the first top-level TLV of `type_`, or None."""
        for t, v in self.tlvs:
            if t == type_:
                return v
        return None


def cn_has_control_chars(cn: str | bytes) -> bool:
    """True when the CN holds a control character (0x00-0x1F or 0x7F).

    The builder sends the CN bytes as given. Receivers treat it as a C string or a user
    name (Mosquitto strndup()s it, so an embedded NUL truncates it; EMQX refuses control
    characters): callers should refuse or log such certificates before building.
    """
    return find_control_char(cn) >= 0


try:
    from fastproxy._proxyproto import (  # noqa: E402  (types above must exist first)
        build_v1,
        build_v2,
        crc32c,
        find_control_char,
        parse,
    )
except ImportError as _exc:  # pragma: no cover - only without a build
    _import_error = _exc

    def _missing(*_args: Any, **_kwargs: Any) -> Any:
        raise EngineNotBuiltError(
            "fastproxy._proxyproto is not built: run `python setup.py build_ext --inplace` "
            f"or `pip install .` ({_import_error})"
        )

    build_v1 = build_v2 = crc32c = find_control_char = parse = _missing  # type: ignore[assignment]
