"""Typed interface of the compiled engine (ext/_engine.pyx)."""
from typing import Callable

from ._tls import TLSContext

# (name, access-log status) per end reason, in the engine's enum order.
REASONS: tuple[tuple[str, int], ...]

# listener, addr, port, protocol, reason index, bytes_sent, bytes_received, start_wall, duration,
# detail, client certificate CN
Record = tuple[int, str, int, str, int, int, int, float, float, str | None, str | None]

class Engine:
    def __init__(self, *, on_close: Callable[[Record], None] | None = ..., max_connections: int = ...) -> None: ...
    @property
    def wakeup_fd(self) -> int: ...
    def add_upstream(self, family: int, host_or_path: str, port: int = ...) -> int: ...
    def add_listener(
        self,
        fd: int,
        upstream: int,
        *,
        tls: TLSContext | None = ...,
        handshake_timeout: float = ...,
        connect_timeout: float = ...,
        idle_timeout: float = ...,
    ) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def stop(self, drain_timeout: float = ...) -> None: ...
    def run(self) -> None: ...

def openssl_version() -> str: ...
