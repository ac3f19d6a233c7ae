#!/usr/bin/env python3
"""CPU cost of upstream health checks: fastproxy with N servers checked every second, no clients.

    python3 benchmarks/bench_health.py                     # 10 servers, 1 s interval, 30 s window
    python3 benchmarks/bench_health.py --seconds 60 --json health.json
    python3 benchmarks/bench_health.py --servers 64 --interval 0.5 --check tcp

One Mosquitto with --servers listeners (`listener P 127.0.0.1`, one port per server) stands for
the pool. Two fastproxy processes are started side by side with the same --servers `--upstream`s, plain
TCP, MQTT on, `--workers 1`, access log off, an `--admin` endpoint each, and no client traffic:

  checks    `--health-interval <interval>` (`--health-check mqtt` by default: TCP connect, MQTT
            CONNECT, CONNACK, DISCONNECT per server per interval)
  baseline  `--health-interval 0` (no checks: the idle proxy's own CPU)

Both run at the same time, so both see the same machine load. After --warmup seconds the CPU time of
each proxy process (utime+stime of all its threads from /proc/<pid>/stat; schedstat for ns
resolution when the two agree, see common.best_cpu_s) is read, again after --seconds, and
`fastproxy status --admin` is read just before and after the window for the per-server `check`
counters. Printed: CPU in % of one core for both, their difference (the cost of the checks; target
< 1 % of a core for 10 servers at 1 s), checks/s and CPU per check, failed checks (must be 0),
the broker's CPU for answering the checks (informational) and the machine's load: the share of the
CPUs busy just before the window and the share other processes (not these three) used during it.
Exit status 0, or 2 when a warning was printed (failed checks, servers down, too few checks).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    REPO,
    Procs,
    best_cpu_s,
    cpu_busy_fraction,
    cpu_delta_s,
    environment,
    file_tail,
    free_port,
    group_cpu,
    log,
    sigterm_as_interrupt,
    stop_and_clean,
    system_busy_s,
    wait_port,
)

PY = sys.executable
TARGET_PCT = 1.0  # the target for 10 servers at a 1 s interval: < 1 % of a core


class BenchError(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=10, help="servers in the pool (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="--health-interval in seconds (default 1)")
    p.add_argument("--check", choices=("mqtt", "tcp"), default="mqtt", help="--health-check (default mqtt)")
    p.add_argument("--seconds", type=float, default=30.0, help="measurement window (default 30)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="seconds after start-up before the window opens (default 3)")
    p.add_argument("--fastproxy-cmd", help="command that runs fastproxy (default: python3 -m fastproxy from the repo)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = p.parse_args(argv)
    if not 1 <= a.servers <= 64:
        p.error("--servers: 1..64")
    if a.interval <= 0 or a.seconds <= 0 or a.warmup < 0:
        p.error("--interval and --seconds must be positive, --warmup >= 0")
    return a


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="fastproxy-health-")
        self.cmd = shlex.split(a.fastproxy_cmd) if a.fastproxy_cmd else [PY, "-m", "fastproxy"]
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = REPO + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def start_broker(self) -> list[int]:
        ports = _free_ports(self.a.servers)
        conf = self.path("mosquitto.conf")
        with open(conf, "w") as f:
            for port in ports:
                f.write(f"listener {port} 127.0.0.1\n")
            f.write("allow_anonymous true\n"
                    "persistence false\n"
                    "max_connections -1\n"
                    "log_dest stderr\n"
                    "log_type error\nlog_type warning\n")
            if os.geteuid() == 0:
                f.write("user root\n")
        p = self.procs.start("mosquitto", ["mosquitto", "-c", conf], log_path=self.path("mosquitto.log"))
        for port in ports:
            wait_port("127.0.0.1", port, 10, p)
        self.broker = p
        log(f"mosquitto with {len(ports)} listeners on 127.0.0.1:{ports[0]}..{ports[-1]} (pid {p.pid})")
        return ports

    def start_proxy(self, name: str, ports: list[int], interval: float) -> tuple[subprocess.Popen, str]:
        listen = free_port()
        admin = f"127.0.0.1:{free_port()}"
        argv = self.cmd + ["serve", "--listen", f"127.0.0.1:{listen}"]
        for port in ports:
            argv += ["--upstream", f"127.0.0.1:{port}"]
        argv += ["--health-interval", f"{interval:g}", "--health-check", self.a.check, "--admin", admin,
                 "--access-log", "off", "--workers", "1", "--drain-timeout", "0"]
        logp = self.path(f"{name}.log")
        p = self.procs.start(name, argv, log_path=logp, env=self.env, cwd=self.tmp)
        try:
            wait_port("127.0.0.1", listen, 20, p)
            host, aport = admin.rsplit(":", 1)
            wait_port(host, int(aport), 10, p)
        except (RuntimeError, TimeoutError) as e:
            raise BenchError(f"{name} did not start: {e}; log {logp}: {file_tail(logp)}") from None
        log(f"{name}: fastproxy pid {p.pid}, {len(ports)} servers, --health-interval {interval:g}, admin {admin}")
        return p, admin

    def status(self, admin: str) -> dict:
        r = subprocess.run(self.cmd + ["status", "--admin", admin], capture_output=True, text=True, timeout=30,
                           env=self.env, cwd=self.tmp)
        if r.returncode != 0:
            raise BenchError(f"fastproxy status --admin {admin} failed ({r.returncode}): {r.stderr.strip()[-300:]}")
        return json.loads(r.stdout)


def _checks(st: dict) -> tuple[int, int, int, int]:
    """(checks, failed_checks, servers up, servers) summed over the status's servers."""
    checks = failed = up = 0
    servers = st.get("servers", [])
    for s in servers:
        c = s.get("check") or {}
        checks += c.get("checks", 0)
        failed += c.get("failed_checks", 0)
        up += 1 if s.get("up") else 0
    return checks, failed, up, len(servers)


def run(a: argparse.Namespace) -> dict:
    b = Bench(a)
    try:
        ports = b.start_broker()
        # same start-up moment for both: they see the same load during the window
        px_chk, adm_chk = b.start_proxy("checks", ports, a.interval)
        px_base, adm_base = b.start_proxy("baseline", ports, 0)
        time.sleep(a.warmup)
        busy_before = cpu_busy_fraction(1.0)
        load_before = open("/proc/loadavg").read().split()[:3]
        st0 = {"checks": b.status(adm_chk), "baseline": b.status(adm_base)}
        c0 = {"checks": group_cpu(px_chk.pid), "baseline": group_cpu(px_base.pid), "broker": group_cpu(b.broker.pid)}
        bg0 = system_busy_s()
        t0 = time.monotonic()
        log(f"measuring for {a.seconds:g} s (no client traffic)")
        time.sleep(a.seconds)
        c1 = {"checks": group_cpu(px_chk.pid), "baseline": group_cpu(px_base.pid), "broker": group_cpu(b.broker.pid)}
        wall = time.monotonic() - t0
        bg1 = system_busy_s()
        st1 = {"checks": b.status(adm_chk), "baseline": b.status(adm_base)}
        load_after = open("/proc/loadavg").read().split()[:3]
        for name, p in (("checks", px_chk), ("baseline", px_base)):
            if p.poll() is not None:
                raise BenchError(f"{name} proxy exited during the run with status {p.returncode}")
        out: dict = {"servers": a.servers, "interval_s": a.interval, "check": a.check, "window_s": round(wall, 3),
                     "loadavg_before": load_before, "loadavg_after": load_after,
                     "cpus_busy_before": round(busy_before, 3)}
        for name in ("checks", "baseline", "broker"):
            cpu = best_cpu_s(c0[name], c1[name])
            ticks_s, sched_s = cpu_delta_s(c0[name], c1[name])
            out[name] = {"cpu_s": cpu, "cpu_ticks_s": ticks_s, "cpu_sched_s": sched_s,
                         "pct_of_core": cpu / wall * 100}
        for name in ("checks", "baseline"):
            k0, f0, _, _ = _checks(st0[name])
            k1, f1, up, n = _checks(st1[name])
            out[name].update(checks=k1 - k0, failed_checks=f1 - f0, checks_per_s=(k1 - k0) / wall,
                             servers_up=up, servers=n, pid=st1[name].get("pid"))
        chk, base = out["checks"], out["baseline"]
        ours = sum(out[k]["cpu_ticks_s"] for k in ("checks", "baseline", "broker"))
        # CPU used by everything else on the machine during the window (other people's jobs)
        out["other_cpu_frac"] = max(0.0, (bg1 - bg0) - ours) / wall / (os.cpu_count() or 1)
        out["cost_pct_of_core"] = chk["pct_of_core"] - base["pct_of_core"]
        out["cpu_us_per_check"] = ((chk["cpu_s"] - base["cpu_s"]) / chk["checks"] * 1e6) if chk["checks"] else None
        out["broker_cpu_us_per_check"] = (out["broker"]["cpu_s"] / chk["checks"] * 1e6) if chk["checks"] else None
        out["expected_checks_per_s"] = a.servers / a.interval
        out["target"] = f"< {TARGET_PCT:g} % of a core"
        out["meets_target"] = chk["pct_of_core"] < TARGET_PCT if a.servers == 10 and a.interval == 1.0 else None
        warn = []
        if chk["failed_checks"]:
            warn.append(f"{chk['failed_checks']} checks failed")
        if chk["servers_up"] != a.servers:
            warn.append(f"only {chk['servers_up']} of {a.servers} servers up at the end")
        if base["checks"]:
            warn.append(f"the baseline proxy ran {base['checks']} checks")
        if chk["checks_per_s"] < 0.8 * out["expected_checks_per_s"]:
            warn.append(f"{chk['checks_per_s']:.1f} checks/s, expected about {out['expected_checks_per_s']:.1f}")
        out["warnings"] = warn
        return out
    finally:
        stop_and_clean(b.procs, b.tmp, a.keep_tmp)


def print_result(r: dict) -> None:
    chk, base, brk = r["checks"], r["baseline"], r["broker"]
    print()
    print(f"{r['servers']} servers, --health-interval {r['interval_s']:g}s, --health-check {r['check']}, "
          f"no client traffic, {r['window_s']:.1f} s window")
    hdr = f"{'process':<34}{'CPU [s]':>10}{'% of a core':>14}{'checks/s':>11}{'failed':>8}{'up':>7}"
    print(hdr)
    print("-" * len(hdr))
    for label, x in ((f"fastproxy, checks every {r['interval_s']:g}s", chk), ("fastproxy, --health-interval 0", base)):
        print(f"{label:<34}{x['cpu_s']:>10.4f}{x['pct_of_core']:>13.3f}%{x['checks_per_s']:>11.2f}"
              f"{x['failed_checks']:>8}{str(x['servers_up']) + '/' + str(x['servers']):>7}")
    print(f"{'mosquitto (answering the checks)':<34}{brk['cpu_s']:>10.4f}{brk['pct_of_core']:>13.3f}%")
    print()
    per = f"{r['cpu_us_per_check']:.0f} µs" if r["cpu_us_per_check"] is not None else "-"
    print(f"cost of the checks (checks - baseline): {r['cost_pct_of_core']:.3f} % of a core, {per} CPU per check "
          f"(proxy); broker {r['broker_cpu_us_per_check'] or 0:.0f} µs per check")
    if r["meets_target"] is not None:
        print(f"target {r['target']} (fastproxy with checks, total): {chk['pct_of_core']:.3f} %  "
              f"{'PASS' if r['meets_target'] else 'FAIL'}")
    print(f"load average {' '.join(r['loadavg_before'])} before, {' '.join(r['loadavg_after'])} after; "
          f"CPUs busy {r['cpus_busy_before']:.0%} just before the window; other processes used "
          f"{r['other_cpu_frac']:.0%} of the {os.cpu_count()} CPU(s) during it")
    for w in r["warnings"]:
        print(f"WARNING: {w}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    sigterm_as_interrupt()
    if not shutil.which("mosquitto"):
        log("error: mosquitto not installed")
        return 1
    try:
        r = run(a)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (BenchError, RuntimeError, TimeoutError) as e:
        log(f"error: {e}")
        return 1
    print_result(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": environment(), "args": vars(a), **r}, f, indent=2, default=str)
        log(f"wrote {a.json}")
    return 0 if not r["warnings"] else 2


if __name__ == "__main__":
    sys.exit(main())
