#!/usr/bin/env python3
"""ns per balancing decision: the engine's server choice for a pool of upstream servers.

    python3 benchmarks/bench_balancer.py                   # table, ~10 seconds
    python3 benchmarks/bench_balancer.py --json bal.json   # also write the raw figures
    python3 benchmarks/bench_balancer.py --modes clientid,source --servers 3,10 --repeat 9

Each figure comes from fastproxy._engine.bench_balancer(mode, n_servers, n_iter, weighted): a C
loop (no Python, no GIL) that calls the engine's pick_server() -- the function the event loop
runs for every new session -- n_iter times, each time with a different 19-byte ClientId
(`device-` + 12 varying digits) and a different client IPv4 address, over a pool keyed like the
proxy's (`10.0.0.<i>:1883`), all servers up, no maxconn, no backups. The result is the wall time
of the loop divided by n_iter, so it includes the loop's own work of writing the next ClientId
(a few ns). Modes:

  clientid     weighted rendezvous hash of the ClientId (hash once, one draw per server)
  round-robin  nginx's smooth weighted round-robin
  least-conn   fewest sessions per weight (no sessions here: ties, which rotate)
  source       the rendezvous hash over the client address

`--weights equal` gives every server weight 1 (the hash modes then compare raw draws);
`unequal` gives weights 1, 2, 3, 1, 2, 3, ... (the hash modes then compute a weighted score per
server: weight / -ln(u), a log() per server). Every cell is measured --repeat times (interleaved: all
cells once, then all again) and the median is reported, with the min..max spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import comma_choices, environment, log  # noqa: E402

MODES = ("clientid", "round-robin", "least-conn", "source")
SERVERS = (1, 3, 10, 64)
WEIGHTS = ("equal", "unequal")


def _engine():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from fastproxy import _sim as _engine

    return _engine


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ",".join(MODES))
    p.add_argument("--servers", default=",".join(map(str, SERVERS)), help="comma list of pool sizes (1..64)")
    p.add_argument("--weights", default=",".join(WEIGHTS), help="comma list of: equal,unequal")
    p.add_argument("--iterations", type=int, default=1_000_000, help="decisions per measurement (default 1000000)")
    p.add_argument("--repeat", type=int, default=5, help="measurements per cell; the median is reported (default 5)")
    p.add_argument("--json", metavar="FILE", help="write the raw figures and medians as JSON")
    a = p.parse_args(argv)
    a.modes = comma_choices(p, "--modes", a.modes, MODES, "mode")
    a.weights = comma_choices(p, "--weights", a.weights, WEIGHTS, "weights")
    try:
        a.servers = [int(x) for x in a.servers.split(",") if x.strip()]
    except ValueError:
        p.error("--servers: a comma list of integers")
    if any(not 1 <= n <= 64 for n in a.servers):
        p.error("--servers: pool sizes are 1..64")
    if a.iterations < 1000 or a.repeat < 1:
        p.error("--iterations must be >= 1000 and --repeat >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    eng = _engine()
    modes = list(getattr(eng, "BALANCE_MODES", MODES))  # position = the engine's BAL_* value
    cells = [(m, n, w) for m in a.modes for n in a.servers for w in a.weights]
    raw: dict[tuple[str, int, str], list[float]] = {c: [] for c in cells}
    load0 = open("/proc/loadavg").read().split()[:3]
    t0 = time.monotonic()
    eng.bench_balancer(0, 3, 100_000, False)  # warm-up (page faults, frequency)
    for r in range(a.repeat):
        for m, n, w in cells:
            raw[(m, n, w)].append(eng.bench_balancer(modes.index(m), n, a.iterations, w == "unequal"))
        log(f"repetition {r + 1}/{a.repeat} done")
    wall = time.monotonic() - t0
    load1 = open("/proc/loadavg").read().split()[:3]

    med = {c: statistics.median(v) for c, v in raw.items()}
    print()
    print(f"ns per decision (C loop, {a.iterations:,} distinct 19-byte ClientIds per measurement, "
          f"median of {a.repeat}; min..max)")
    w0 = 14
    wc = 22
    hdr = f"{'mode':<{w0}}{'weights':<10}" + "".join(f"{str(n) + (' server' if n == 1 else ' servers'):>{wc}}"
                                                        for n in a.servers)
    print(hdr)
    print("-" * len(hdr))
    for m in a.modes:
        for w in a.weights:
            cols = []
            for n in a.servers:
                v = raw[(m, n, w)]
                cols.append(f"{med[(m, n, w)]:.1f} ({min(v):.1f}..{max(v):.1f})".rjust(wc))
            print(f"{m:<{w0}}{w:<10}" + "".join(cols))
    print()
    print(f"load average {' '.join(load0)} before, {' '.join(load1)} after; {wall:.1f} s; "
          f"{os.cpu_count()} CPU(s)")
    if a.json:
        env = environment()
        out = {
            "env": env,
            "args": {k: v for k, v in vars(a).items()},
            "loadavg_before": load0,
            "loadavg_after": load1,
            "wall_s": round(wall, 2),
            "results": [{"mode": m, "servers": n, "weights": w, "ns_per_decision": med[(m, n, w)],
                         "min": min(raw[(m, n, w)]), "max": max(raw[(m, n, w)]), "runs": raw[(m, n, w)]}
                        for m, n, w in cells],
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
