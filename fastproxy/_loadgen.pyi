"""The compiled load generator of `fastproxy bench` (ext/fastproxy/_loadgen.pyx, ext/src/loadgen.c)."""
from typing import Any, Iterable

SCENARIOS: dict[str, int]
MAX_SOURCES: int
MAX_CONNS: int
STOPPED: dict[int, str]

def run(
    scenario: str,
    *,
    host: str,
    port: int,
    conns: int,
    concurrency: int = ...,
    tls: bool = ...,
    ca: str = ...,
    cert: str = ...,
    key: str = ...,
    ca_key: str = ...,
    sources: Iterable[str] = ...,
    prefix: str = ...,
    keepalive: int = ...,
    qos: int = ...,
    payload: int = ...,
    batch: int = ...,
    rate: float = ...,
    messages: int = ...,
    duration: float = ...,
    timeout: float = ...,
    conn_timeout: float = ...,
    reconnect: bool = ...,
    retry: float = ...,
    stop_fd: int = ...,
    notify_fd: int = ...,
    sub_host: str = ...,
    sub_port: int = ...,
) -> dict[str, Any]: ...
