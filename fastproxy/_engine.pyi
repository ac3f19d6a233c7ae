"""Typed interface of the compiled engine (ext/fastproxy/_engine.pyx): the loop and its Python boundary."""
from typing import Callable, Sequence

from ._tls import TLSContext
from .config import ListenerConfig

# (name, access-log status) per end reason, in the engine's enum order.
REASONS: tuple[tuple[str, int], ...]
# The engine's table sizes and mode bounds, mirrored in fastproxy.constants (a test ties them).
LIMITS: dict[str, int]
# Kinds of the conditions reported to on_notice (rate-limited warnings), in enum order.
NOTICES: tuple[str, ...]
IDENTITY_CLIENTID_CN: int
IDENTITY_USERNAME_CN: int

# listener, addr, port, protocol, reason index, bytes_sent, bytes_received, start_wall, duration,
# detail, verified client certificate CN, MQTT ClientId, MQTT 5 reason code of an engine refusal (0: none),
# upstream index of the session's server (-1: none was chosen), TLS cipher, OpenSSL reason of a failed
# handshake, WebSocket client, MQTT user name
EngineRecord = tuple[int, str, int, str, int, int, int, float, float, str | None, str | None, str | None, int, int,
                     str | None, str | None, bool, str | None]
# listener, addr, port, CONNECT packet, client certificate DER or None, certificate verified
PolicyRequest = tuple[int, str, int, bytes, bytes | None, bool]
# action (0 allow), MQTT 5 reason code of a refusal, upstream index or None, new ClientId or None
PolicyAnswer = tuple[int, int, int | None, bytes | None]

class Engine:
    def __init__(
        self,
        *,
        on_close: Callable[[EngineRecord], None] | None = ...,
        on_connect: Callable[[int, PolicyRequest], None] | None = ...,
        on_notice: Callable[[str, int], None] | None = ...,
        max_connections: int = ...,
        policy_timeout: float = ...,
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
        lc: ListenerConfig,
        pool: Sequence[int],
        *,
        tls: TLSContext | None = ...,
        gate: bool = ...,
        identity: int = ...,
    ) -> int: ...
    def policy_answer(self, token: int, answer: PolicyAnswer) -> None: ...
    def stats(self) -> dict[str, int]: ...
    # (listener, addr, port, state, client_id, cn, upstream, age_s, idle_s, bytes_in, bytes_out, websocket)
    def sessions(self, limit: int = ..., client_id: str | bytes | None = ..., timeout: float = ...) -> list[
        tuple[int, str, int, str, str | None, str | None, int, float, float, int, int, bool]]: ...
    def disconnect(self, client_id: str | bytes | None = ..., addr: tuple[str, int] | None = ...,
                   timeout: float = ...) -> int: ...
    def upstream_stats(self) -> list[dict[str, int | bool]]: ...
    def consecutive_failures(self, index: int) -> int: ...
    def set_upstream_state(self, index: int, up: bool) -> None: ...
    def shutdown_sessions(self, index: int) -> None: ...
    def stop(self, drain_timeout: float = ...) -> None: ...
    def run(self) -> None: ...
    def close(self) -> None: ...
