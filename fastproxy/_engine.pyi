"""Typed interface of the compiled engine (ext/_engine.pyx)."""
from typing import Callable, Sequence

from ._tls import TLSContext

# (name, access-log status) per end reason, in the engine's enum order.
REASONS: tuple[tuple[str, int], ...]

# listener, addr, port, protocol, reason index, bytes_sent, bytes_received, start_wall, duration,
# detail, verified client certificate CN, MQTT ClientId, MQTT 5 reason code of an engine refusal (0: none),
# upstream index of the session's server (-1: none was chosen)
Record = tuple[int, str, int, str, int, int, int, float, float, str | None, str | None, str | None, int, int]
# Pool balance modes by engine code: clientid, round-robin, least-conn, source.
BALANCE_MODES: tuple[str, ...]
IDENTITY_CLIENTID_CN: int
IDENTITY_USERNAME_CN: int

class Engine:
    def __init__(
        self,
        *,
        on_close: Callable[[Record], None] | None = ...,
        on_connect: Callable[[tuple], tuple[int, int, int | None, bytes | None]] | None = ...,
        max_connections: int = ...,
    ) -> None: ...
    @property
    def wakeup_fd(self) -> int: ...
    def add_upstream(
        self,
        family: int,
        host_or_path: str,
        port: int = ...,
        *,
        weight: int = ...,
        backup: bool = ...,
        maxconn: int = ...,
        proxy_protocol: int = ...,
        key: str | bytes | None = ...,
    ) -> int: ...
    def add_listener(
        self,
        fd: int,
        upstream: int | Sequence[int],
        *,
        tls: TLSContext | None = ...,
        handshake_timeout: float = ...,
        connect_timeout: float = ...,
        idle_timeout: float = ...,
        mqtt: bool = ...,
        idle_keepalive: bool = ...,
        policy: bool = ...,
        mqtt_connect_timeout: float = ...,
        max_connect_size: int = ...,
        proxy_protocol: int = ...,
        proxy_protocol_crc32c: bool = ...,
        proxy_protocol_max_len: int = ...,
        proxy_protocol_want: int = ...,
        accept_proxy_protocol: bool = ...,
        trusted_proxies: Sequence[tuple[int, bytes, int]] = ...,
        identity: int = ...,
        balance: int = ...,
        retries: int = ...,
        source_addresses: Sequence[tuple[int, bytes]] = ...,
    ) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def upstream_stats(self) -> list[dict[str, int | bool]]: ...
    def consecutive_failures(self, index: int) -> int: ...
    def set_upstream_state(self, index: int, up: bool) -> None: ...
    def shutdown_sessions(self, index: int) -> None: ...
    def stop(self, drain_timeout: float = ...) -> None: ...
    def run(self) -> None: ...


def pick_many(
    items: Sequence[bytes],
    server_keys: Sequence[bytes],
    *,
    weights: Sequence[int] | None = ...,
    up: Sequence[bool] | None = ...,
    backup: Sequence[bool] | None = ...,
    balance: int = ...,
) -> list[int]: ...
def bench_balancer(balance: int, n_servers: int, n_iter: int, weighted: bool = ...) -> float: ...
