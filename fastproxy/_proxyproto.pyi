"""Stub for the compiled PROXY protocol module (ext/_proxyproto.pyx over ext/src/proxy_v2.c).

Use it through fastproxy.proxy_protocol, which re-exports these functions.
"""
from collections.abc import Iterable
from os import PathLike

from fastproxy.proxy_protocol import ProxyHeader, SSLInfo

_Host = str | bytes | object            # text, packed 4/16 bytes, or an ipaddress object
_Inet = tuple[_Host, int]
_Addr = _Inet | str | bytes | PathLike[str] | None   # (host, port), a UNIX path, or None
_Buffer = bytes | bytearray | memoryview

def build_v2(
    src: _Addr = None,
    dst: _Addr = None,
    *,
    command: str | int | None = None,
    transport: str | None = "stream",
    alpn: str | bytes | None = None,
    authority: str | bytes | None = None,
    unique_id: str | bytes | None = None,
    ssl: SSLInfo | None = None,
    crc32c: bool = False,
    netns: str | bytes | None = None,
    tlvs: Iterable[tuple[int, str | bytes]] = (),
    noop: int | None = None,
    max_length: int = 500,
) -> bytes: ...
def build_v1(src: _Inet | None = None, dst: _Inet | None = None, *, max_length: int = 107) -> bytes: ...
def parse(data: _Buffer, *, max_length: int = 4096) -> ProxyHeader | None: ...
def crc32c(data: _Buffer) -> int: ...
def find_control_char(data: str | bytes) -> int: ...
def _bench_c(what: str, n: int) -> float: ...
