"""The balancer outside any engine (ext/fastproxy/_sim.pyx): the same C choice the loop makes,
for tests, simulations and the balancer benchmark."""
from typing import Sequence

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
