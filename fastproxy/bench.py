"""`fastproxy bench`: size a machine for a fleet of devices, on the machine itself.

It starts a Mosquitto on loopback (or uses --broker), a `fastproxy serve` in front of it (a
throw-away PKI, or the user's own configuration with -c), drives it with the compiled load
generator (fastproxy._loadgen, in separate processes so that its CPU is not the proxy's), and
measures the proxy processes' own CPU (master and workers, /proc/PID/task/*/schedstat) per
handshake, per message and per GB, and their memory (RSS, PSS) per idle connection. From those it
answers in a user's terms: handshakes/s and messages/s per core, devices per GiB, the largest
fleet the machine holds at a per-device message rate and which limit bounds it, and how long
the fleet takes to reconnect after a broker restart.

The processes, the PKI, the broker and the generator processes are fastproxy/benchrig.py's.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from .benchrig import (
    FD_RESERVE,
    FDS_PER_SESSION,
    HOST,
    MOSQUITTO_HINT,
    Gen,
    Mosquitto,
    Proxy,
    _gen_main,
    _tail,
    default_setup,
    find_mosquitto,
    machine_info,
    make_pki,
    mosquitto_version,
    raise_nofile,
    tls_library_name,
    user_setup,
)
from .errors import BenchError, ConfigError


# Counts of each step: --quick must end within two minutes on a Raspberry Pi class machine.
FULL: dict[str, int] = dict(handshakes=3000, msg64=200_000, msg1k=100_000, pub_conns=4, paced_conns=500,
                            paced_rate=10, paced_s=10, bulk_mib=512, idle=10_000, storm=2000)
QUICK: dict[str, int] = dict(handshakes=300, msg64=40_000, msg1k=20_000, pub_conns=4, paced_conns=100,
                             paced_rate=10, paced_s=3, bulk_mib=64, idle=1000, storm=300)
DEFAULT_RATE = 1 / 60          # messages per second per device for the largest-fleet answer
CPU_SHARE = 0.7                # of all cores for the proxy: the broker and the system need the rest
MEM_SHARE = 0.9                # of the available memory (MemAvailable at the start)
RETRY_S = 1.0                  # devices reconnect after a random delay below this
PER_GEN_MAX = 19_000           # connections per generator process (within a 20000 descriptor limit)


# ----------------------------------------------------------------------------- the bench


class Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.step, self.quiet = total, 0, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.label = ""

    def begin(self, label: str) -> None:
        self.step += 1
        self.label = label
        self.show("")

    def show(self, detail: str) -> None:
        if self.quiet:
            return
        line = f"[{self.step}/{self.total} {time.monotonic() - self.t0:5.1f}s] {self.label}" + (f": {detail}" if detail else "")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        elif not detail:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self, detail: str) -> None:
        if self.quiet:
            return
        line = f"[{self.step}/{self.total} {time.monotonic() - self.t0:5.1f}s] {self.label}: {detail}"
        sys.stderr.write(("\r\033[K" if self.tty else "") + line + "\n")
        sys.stderr.flush()


class Bench:
    """The steps of one `fastproxy bench` run and the answers computed from their figures."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.n = dict(QUICK if a.quick else FULL)
        self.machine = machine_info()  # MemAvailable before anything of the bench runs
        self.nofile = raise_nofile()
        self.tmp = tempfile.mkdtemp(prefix="fastproxy-bench-")
        try:
            self.pki = make_pki(self.tmp)
            self.setup = user_setup(a.config, self.pki) if a.config else default_setup(self.pki)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.broker: Mosquitto | None = None
        self.broker_addr = a.broker
        self.proxy: Proxy | None = None
        self.gens: list[Gen] = []
        self.runs: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.prog = Progress(10, quiet=a.no_progress)
        self.prefix_n = 0
        self.per_gen = max(100, min(PER_GEN_MAX, self.nofile - FD_RESERVE))

    # -- processes

    def start_broker(self) -> None:
        if self.a.broker:
            return
        exe = find_mosquitto(self.setup.proxy_protocol != "none")
        self.broker = Mosquitto(exe, self.tmp, proxy_protocol=self.setup.proxy_protocol)
        self.broker.start()
        self.broker_addr = f"{HOST}:{self.broker.port}"

    def workers_for(self, sessions: int) -> int:
        per_worker = max(1, (self.nofile - FD_RESERVE) // FDS_PER_SESSION)
        return max(1, math.ceil(sessions * 1.25 / per_worker))  # SO_REUSEPORT spreads unevenly

    def start_proxy(self, workers: int) -> Proxy:
        self.stop_proxy()
        assert self.broker_addr is not None
        self.proxy = Proxy(self.setup, self.tmp, self.broker_addr, workers)
        self.proxy.start()
        return self.proxy

    def stop_proxy(self) -> None:
        if self.proxy:
            self.proxy.stop()
            self.proxy = None

    def gen(self, scenario: str, conns: int, *, hold: bool = False, timeout: float = 120.0, source: int = 0,
            **kw: Any) -> Gen:
        assert self.proxy is not None
        self.prefix_n += 1
        p: dict[str, Any] = dict(scenario=scenario, host=HOST, port=self.proxy.port, conns=conns, tls=self.setup.tls,
                                 prefix=f"b{os.getpid() % 10000}g{self.prefix_n}", keepalive=self.setup.keepalive,
                                 timeout=timeout, hold=hold, sources=[f"127.0.{1 + source // 250}.{2 + source % 250}"])
        if self.setup.tls and self.setup.verify_server:
            p["ca"] = self.pki.ca_cert
        if self.setup.mtls:
            p.update(cert=self.pki.ca_cert, ca_key=self.pki.ca_key, key=self.pki.device_key)
        p.update(kw)
        g = Gen(p)
        self.gens.append(g)
        return g

    def cleanup(self) -> None:
        for g in self.gens:
            g.kill()
        self.stop_proxy()
        if self.broker:
            self.broker.stop()
        if self.a.keep_tmp:
            sys.stderr.write(f"fastproxy bench: files kept in {self.tmp}\n")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- checks

    def check(self, r: dict[str, Any], what: str, want: int) -> None:
        """Every session of a step must have got through; otherwise say why, in the user's terms."""
        ok = r["connack_ok"]
        if ok == 0:
            why = r["first_error"] or "no session was set up"
            if r["refused"]:
                why = f"CONNACK return code {r['last_refusal']} ({why})"
            raise BenchError(f"{what}: no session got through the proxy: {why}. "
                             f"{'Your configuration refuses the bench devices (ClientId = CN = b...-N, username = ClientId).' if self.a.config else ''}"
                             f" Proxy log: {_tail(self.proxy.err, 3) if self.proxy else ''}")
        if ok < want:
            self.warnings.append(f"{what}: {ok} of {want} sessions got through (failed {r['failed']}, refused "
                                 f"{r['refused']}; first error: {r['first_error'] or '-'})")

    # -- steps

    def step_handshakes(self) -> None:
        n = self.n["handshakes"]
        kind = "mTLS" if self.setup.mtls else "TLS" if self.setup.tls else "TCP (no TLS)"
        self.prog.begin(f"handshakes ({n} x {kind} + CONNECT + CONNACK + DISCONNECT)")
        px = self.start_proxy(1)
        c0 = px.cpu()
        g = self.gen("handshake", n, concurrency=2 * self.machine["cores"] + 2, timeout=60 + n * 0.2)
        g.wait("end", 60 + n * 0.2, lambda s: self.prog.show(f"{s.get('ok', 0)}/{n}"))
        r = g.finish(timeout=30)
        cpu = px.cpu() - c0
        self.check(r, "handshakes", n)
        ok = r["connack_ok"]
        r["proxy_cpu_s"] = cpu
        self.runs["handshakes"] = r
        self.cpu_hs = cpu / ok
        self.hs_rate = ok / max(1e-6, r["t_end"] - r["t_start"])
        self.prog.done(f"{ok} in {r['t_end'] - r['t_start']:.1f}s, proxy CPU {self.cpu_hs * 1e3:.2f} ms each")

    def _publish(self, key: str, label: str, conns: int, per_conn: int, payload: int, qos: int, *,
                 rate: float = 0.0, duration: float = 0.0, sub: bool = True) -> tuple[float, dict[str, Any]]:
        """One publish run; returns (proxy CPU seconds per message, result)."""
        assert self.proxy is not None
        self.prog.begin(label)
        bhost, bport = self.broker_addr.rsplit(":", 1) if self.broker_addr else (HOST, "0")
        kw: dict[str, Any] = dict(qos=qos, payload=payload, messages=per_conn, rate=rate, duration=duration,
                                  concurrency=64)
        if sub and not self.setup.proxy_protocol.startswith("v") and _is_ip(bhost.strip("[]")):
            kw.update(sub_host=bhost.strip("[]"), sub_port=int(bport))
        budget = 60 + (duration or 0) + conns * 0.05
        g = self.gen("publish", conns, timeout=budget, **kw)
        if not g.wait("ready", budget):
            r = g.finish(5)
            self.check(r, label, conns)
            raise BenchError(f"{label}: the publishers did not get ready: {r['first_error']}")
        c0 = self.proxy.cpu()  # the generator waits a moment before it sends
        total = conns * per_conn
        g.wait("end", budget, lambda s: self.prog.show(f"{s.get('published', 0)}/{total or '?'} published"))
        c1 = self.proxy.cpu()
        r = g.finish(timeout=15)
        self.check(r, label, conns)
        if r["published"] == 0:
            raise BenchError(f"{label}: nothing was published ({r['first_error'] or 'no error reported'})")
        if qos and r["acked"] < r["published"]:
            self.warnings.append(f"{label}: {r['published'] - r['acked']} of {r['published']} PUBLISHes not acknowledged")
        if kw.get("sub_port") and r["delivered"] < r["published"] * 0.99:
            self.warnings.append(f"{label}: the subscriber got {r['delivered']} of {r['published']} messages")
        r["proxy_cpu_s"] = c1 - c0
        self.runs[key] = r
        per = (c1 - c0) / r["published"]
        secs = (r["t_send_end"] or r["t_end"]) - (r["t_send_start"] or r["t_start"])
        self.prog.done(f"{r['published']} in {secs:.1f}s, proxy CPU {per * 1e6:.2f} µs each")
        return per, r

    def step_messages(self) -> None:
        self.start_proxy(1)
        c = self.n["pub_conns"]
        self.cpu_msg: dict[str, float] = {}
        for size, label, total in ((64, "64", self.n["msg64"]), (1024, "1k", self.n["msg1k"])):
            for qos in (0, 1):
                per, _ = self._publish(f"msg_{label}_qos{qos}", f"messages {size} B QoS {qos} ({total}, {c} connections, "
                                       f"as fast as they go)", c, total // c, size, qos)
                self.cpu_msg[f"{label}_qos{qos}"] = per
        pc, rate, secs = self.n["paced_conns"], self.n["paced_rate"], self.n["paced_s"]
        per, _ = self._publish("msg_paced", f"messages paced ({pc} devices x {rate:g} msg/s, 64 B QoS 1, "
                               f"one per TLS record and wake-up)", pc, 0, 64, 1, rate=rate, duration=secs)
        self.cpu_msg["paced"] = per
        mib = self.n["bulk_mib"]
        per, r = self._publish("bulk", f"bulk ({mib} MiB in 16 KiB PUBLISHes)", 1, mib * 64, 16384, 0, sub=False)
        self.cpu_per_gb = r["proxy_cpu_s"] / (r["bytes_sent"] / 1e9)

    def step_idle(self) -> None:
        n = self.n["idle"]
        self.prog.begin(f"idle sessions ({n}, memory at {n // 2} and {n})")
        workers = self.workers_for(n)
        px = self.start_proxy(workers)
        time.sleep(0.3)
        base_rss, base_pss = px.memory()
        half = n // 2
        levels: list[tuple[int, int, int]] = []
        live = 0
        for target in (half, n):
            want = target - live
            chunks = [min(self.per_gen, want - i) for i in range(0, want, self.per_gen)]
            for size in chunks:
                g = self.gen("idle", size, hold=True, concurrency=64, timeout=600, source=len(self.gens))
                if not g.wait("ready", 60 + size * 0.05, lambda s: self.prog.show(f"{live + s.get('live', 0)}/{n} open")):
                    r = g.finish(10)
                    self.check(r, "idle sessions", size)
                    raise BenchError(f"idle sessions: {r['connack_ok']} of {size} opened ({r['first_error']})")
                live += g.last.get("live", 0)
            time.sleep(0.5)
            rss, pss = px.memory()
            levels.append((live, rss, pss))
        (n1, r1, p1), (n2, r2, p2) = levels
        if n2 <= n1:
            raise BenchError("idle sessions: the second fill level added no session")
        self.kib_idle = (r2 - r1) / (n2 - n1)
        self.pss_idle = (p2 - p1) / (n2 - n1)
        self.idle_workers = workers
        self.baseline = (base_rss, base_pss)
        results = [g.finish(30) for g in self.gens if g.params["scenario"] == "idle" and g.result is None]
        closed = sum(r["closed_by_peer"] for r in results)
        if closed:
            self.warnings.append(f"idle sessions: {closed} closed by the proxy while held")
        self.runs["idle"] = {"levels": [{"sessions": a, "rss_kib": b, "pss_kib": c} for a, b, c in levels],
                             "baseline_rss_kib": base_rss, "baseline_pss_kib": base_pss, "workers": workers,
                             "closed_while_held": closed}
        self.prog.done(f"{self.kib_idle:.1f} KiB RSS ({self.pss_idle:.1f} KiB PSS) per session, {workers} worker(s)")

    def step_storm(self) -> None:
        n = self.n["storm"]
        what = "broker restart" if self.broker else "proxy restart (--broker: the bench cannot restart yours)"
        self.prog.begin(f"reconnect storm ({n} devices, {what})")
        self.start_proxy(self.workers_for(n))
        g = self.gen("idle", n, hold=True, concurrency=n, reconnect=True, retry=RETRY_S, timeout=300,
                     source=len(self.gens))
        if not g.wait("ready", 120, lambda s: self.prog.show(f"{s.get('live', 0)}/{n} connected")):
            r = g.finish(10)
            self.check(r, "reconnect storm", n)
            raise BenchError(f"reconnect storm: only {r['live_max']} of {n} devices connected ({r['first_error']})")
        t_kill = time.monotonic()
        if self.broker:
            self.broker.stop()
            self.broker.start()
        else:
            assert self.proxy is not None
            self.proxy.stop()
            self.proxy.start()
        t_back = time.monotonic()
        deadline = t_back + 120
        # all n back: the generator's live count comes back to n after the drop
        while time.monotonic() < deadline:
            if not g.wait("progress", 1.0, lambda s: self.prog.show(f"{s.get('live', 0)}/{n} reconnected")):
                if g.proc.poll() is not None:
                    break
            if g.last.get("live", 0) >= n and g.last.get("closed", 0) >= n:
                break
        r = g.finish(30)
        self.runs["storm"] = dict(r, t_restart=t_kill, t_service_back=t_back)
        if not r["t_all_back"] or r["t_all_back"] < t_back - 5:
            raise BenchError(f"reconnect storm: {r['live_end']} of {n} devices came back within 120 s "
                             f"({r['first_error'] or 'no error reported'})")
        self.storm_s = max(1e-3, r["t_all_back"] - t_back)
        self.storm_total_s = r["t_all_back"] - t_kill
        self.storm_n = n
        self.prog.done(f"all {n} back {self.storm_s:.2f}s after the {'broker' if self.broker else 'proxy'} was up "
                       f"({self.storm_total_s:.2f}s after it went down)")

    # -- answers

    def answers(self) -> dict[str, Any]:
        m = self.machine
        cores = m["cores"]
        rate = self.a.rate if self.a.rate is not None else DEFAULT_RATE
        us = {k: v * 1e6 for k, v in self.cpu_msg.items()}
        kib = max(self.kib_idle, 0.1)
        base_kib = self.baseline[0]
        mem_kib = m["mem_available_kib"] * MEM_SHARE - base_kib
        per_worker = max(1, (self.nofile - FD_RESERVE) // FDS_PER_SESSION)
        fd_system = ((m["file_max"] or 1 << 31) - m["files_open"]) // FDS_PER_SESSION if m["file_max"] else None
        lo, hi = m["port_range"]
        ports = hi - lo + 1
        limits: dict[str, int] = {
            "memory": int(mem_kib / kib),
            # a PINGREQ per keepalive costs about what a message does
            "cpu": int(cores * CPU_SHARE / ((rate + 1 / self.setup.keepalive) * self.cpu_msg["paced"])),
        }
        if self.setup.upstream_paths:
            limits["ports"] = ports * self.setup.upstream_paths
        if fd_system:
            limits["descriptors"] = fd_system
        fleet_limit = min(limits, key=lambda k: limits[k])
        fleet = limits[fleet_limit]
        storm_rate = self.storm_n / self.storm_s if self.storm_s > 0 else None

        def reconnect_s(devices: int) -> float:
            # After the devices' own retry delay, the larger of: every handshake on all cores (the
            # proxy alone), and the measured storm's pace beyond that delay (the broker and, here,
            # the generator share the machine). A small storm is bound by the delay: the first
            # term then rules.
            by_cpu = devices * self.cpu_hs / cores
            by_pace = devices * max(0.0, self.storm_s - RETRY_S) / self.storm_n
            return RETRY_S + max(by_cpu, by_pace)

        out: dict[str, Any] = {
            "handshakes_per_s_per_core": 1 / self.cpu_hs,
            "messages_per_s_per_core": 1 / self.cpu_msg["paced"],
            "kib_per_idle_connection": self.kib_idle,
            "devices_per_gib": 2**20 / kib,
            "cpu_us_per_handshake": self.cpu_hs * 1e6,
            "handshakes_per_s_measured": self.hs_rate,
            "cpu_us_per_msg_64_qos0": us["64_qos0"],
            "cpu_us_per_msg_64_qos1": us["64_qos1"],
            "cpu_us_per_msg_1k_qos0": us["1k_qos0"],
            "cpu_us_per_msg_1k_qos1": us["1k_qos1"],
            "cpu_us_per_msg_paced": us["paced"],
            "messages_per_s_per_core_burst_64_qos0": 1e6 / us["64_qos0"],
            "cpu_s_per_gb": self.cpu_per_gb,
            "pss_kib_per_idle_connection": self.pss_idle,
            "baseline_rss_kib": self.baseline[0],
            "baseline_pss_kib": self.baseline[1],
            "reconnect_storm_devices": self.storm_n,
            "reconnect_storm_s": self.storm_s,
            "reconnect_storm_s_from_restart": self.storm_total_s,
            "reconnect_devices_per_s": storm_rate,
            "rate_per_device": rate,
            "fleet_limits": limits,
            "largest_fleet": fleet,
            "limiting_factor": fleet_limit,
            "reconnect_storm_s_largest_fleet": reconnect_s(fleet),
            "workers_needed_largest_fleet": math.ceil(fleet / per_worker),
        }
        if self.a.devices is not None:
            n = self.a.devices
            by = dict(limits)
            short = [k for k, v in by.items() if v < n]
            out["verdict"] = {
                "devices": n,
                "rate_per_device": rate,
                "carries": not short,
                "limiting_factor": min(by, key=lambda k: by[k]) if not short else min(short, key=lambda k: by[k]),
                "failing_limits": short,
                "headroom": min(by.values()) / n if n else None,
                "workers_needed": math.ceil(n / per_worker),
                "reconnect_storm_s": reconnect_s(n),
            }
        return out

    def run(self) -> dict[str, Any]:
        a = self.a
        tls = tls_library_name()
        from . import __version__

        self.prog.begin("Mosquitto on loopback" if not a.broker else f"broker {a.broker}")
        self.start_broker()
        self.prog.done(f"{self.broker_addr}" + (f" ({self.broker.exe})" if self.broker else ""))
        self.step_handshakes()
        self.step_messages()
        self.step_idle()
        self.step_storm()
        self.stop_proxy()
        out: dict[str, Any] = {
            "fastproxy_version": __version__,
            "tls_library": tls,
            "machine": self.machine,
            "quick": bool(a.quick),
            "configuration": self.setup.source,
            "settings": dict(self.setup.summary, workers_for_cpu_figures=1, idle_workers=self.idle_workers,
                             broker=("Mosquitto " + ".".join(map(str, mosquitto_version(self.broker.exe)))
                                     if self.broker else a.broker)),
            "notes": self.setup.notes,
            "counts": self.n,
        }
        out.update(self.answers())
        out["warnings"] = self.warnings
        out["runs"] = self.runs
        return out


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the report


def _n(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


LIMIT_WORDS = {
    "memory": "memory",
    "cpu": "CPU",
    "descriptors": "file descriptors (system-wide fs.file-max)",
    "ports": "ephemeral ports toward one broker address (add --upstream-source addresses or a unix socket)",
}


def report(out: dict[str, Any]) -> str:
    m = out["machine"]
    s = out["settings"]
    rate = out["rate_per_device"]
    rate_txt = f"{rate:.3g} msg/s" + (f" (one every {1 / rate:.0f} s)" if 0 < rate < 1 else "")
    lines = [
        f"fastproxy bench{' --quick' if out['quick'] else ''}: fastproxy {out['fastproxy_version']}, {out['tls_library']}",
        f"machine: {m['cpu_model']}, {m['cores']} core(s), {m['ram_gib']:.1f} GiB RAM, {m['arch']}, Linux {m['kernel']}, "
        f"descriptor limit {m['nofile_hard']} per process",
        f"configuration: {out['configuration']}",
        "settings: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.items()),
    ]
    if out["notes"]:
        lines.append("changed for the bench: " + "; ".join(out["notes"]))
    lines += [
        "",
        f"  handshakes per second per core   {_n(out['handshakes_per_s_per_core'])}   "
        f"({out['cpu_us_per_handshake'] / 1e3:.2f} ms proxy CPU per handshake)",
        f"  messages per second per core     {_n(out['messages_per_s_per_core'])}   "
        f"(devices sending one message at a time; {_n(out['cpu_us_per_msg_paced'], 2)} µs each)",
        f"    bursts, µs per message         64 B QoS 0 {_n(out['cpu_us_per_msg_64_qos0'], 2)}, QoS 1 "
        f"{_n(out['cpu_us_per_msg_64_qos1'], 2)}; 1 KiB QoS 0 {_n(out['cpu_us_per_msg_1k_qos0'], 2)}, QoS 1 "
        f"{_n(out['cpu_us_per_msg_1k_qos1'], 2)}",
        f"  CPU per GB relayed               {out['cpu_s_per_gb']:.2f} s",
        f"  memory per idle device           {out['kib_per_idle_connection']:.1f} KiB RSS "
        f"({out['pss_kib_per_idle_connection']:.1f} KiB PSS), baseline {out['baseline_rss_kib'] / 1024:.0f} MiB",
        f"  devices per GiB of RAM           {_n(out['devices_per_gib'])}",
        f"  reconnect storm                  {out['reconnect_storm_devices']} devices back in "
        f"{out['reconnect_storm_s']:.2f} s ({_n(out['reconnect_devices_per_s'])} devices/s)",
        "",
        f"largest fleet at {rate_txt} per device: {_n(out['largest_fleet'])} devices, bound by "
        f"{LIMIT_WORDS.get(out['limiting_factor'], out['limiting_factor'])}",
        "  limits: " + ", ".join(f"{k} {_n(v)}" for k, v in sorted(out["fleet_limits"].items(), key=lambda kv: kv[1])),
        f"  it needs {out['workers_needed_largest_fleet']} worker(s) (--workers) at this descriptor limit; "
        + (f"all reconnect in about {out['reconnect_storm_s_largest_fleet']:.0f} s after a broker restart"
           if out.get("reconnect_storm_s_largest_fleet") else ""),
    ]
    v = out.get("verdict")
    if v:
        lines += ["", f"will it carry {_n(v['devices'])} devices at {v['rate_per_device']:g} msg/s each? "
                  + ("YES" if v["carries"] else "NO")
                  + (f" (headroom {v['headroom']:.1f}x, closest limit: {v['limiting_factor']})" if v["carries"]
                     else f": {', '.join(LIMIT_WORDS.get(k, k) for k in v['failing_limits'])} too small")
                  + (f"; {v['workers_needed']} worker(s); reconnect after a broker restart about "
                     f"{v['reconnect_storm_s']:.0f} s" if v.get("reconnect_storm_s") else "")]
    if out["warnings"]:
        lines += ["", "warnings:"] + [f"  {w}" for w in out["warnings"]]
    if out["quick"]:
        lines += ["", "(--quick: small counts, figures are rough; run without --quick for sizing)"]
    return "\n".join(lines)


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    limits = out["fleet_limits"]
    names = sorted(limits, key=lambda k: limits[k])
    values = [limits[k] for k in names]
    ax1.barh(names, values, color=["tab:red" if k == out["limiting_factor"] else "tab:blue" for k in names])
    ax1.set_xscale("log")
    ax1.set_xlim(left=max(1, min(values) / 10), right=max(values) * 3)
    for i, v in enumerate(values):
        ax1.text(v, i, f" {v:,}", va="center")
    verdict = out.get("verdict")
    if verdict:
        ax1.axvline(verdict["devices"], color="black", linestyle="--")
        ax1.text(verdict["devices"], -0.6, f" {verdict['devices']:,} asked", va="bottom")
    ax1.set_xlabel("devices (log scale)")
    ax1.set_title(f"largest fleet at {out['rate_per_device']:g} msg/s per device: {out['largest_fleet']:,}")
    keys = ["cpu_us_per_msg_64_qos0", "cpu_us_per_msg_64_qos1", "cpu_us_per_msg_1k_qos0", "cpu_us_per_msg_1k_qos1",
            "cpu_us_per_msg_paced"]
    ax2.bar(["64B q0", "64B q1", "1K q0", "1K q1", "paced"], [out[k] for k in keys], color="tab:green")
    ax2.set_ylabel("proxy CPU µs per message")
    ax2.set_title(f"{out['machine']['cpu_model'][:40]}, {out['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Measure this machine with a Mosquitto on loopback, a fastproxy in front of it and the "
                     "compiled load generator; report handshakes/s and messages/s per core, devices per GiB, "
                     "the largest fleet it holds and which limit bounds it (docs/sizing.md).")
    p.add_argument("--quick", action="store_true", help="small counts: done within two minutes on a Raspberry Pi class "
                                                        "machine (rough figures, for checking)")
    p.add_argument("--json", metavar="FILE", help="write every figure, the machine and the raw runs as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the fleet limits and per-message costs (needs matplotlib: "
                                                      "pip install 'fastproxy[plot]')")
    p.add_argument("--devices", metavar="N", type=int, help="answer: will this machine carry N devices (with --rate)")
    p.add_argument("--rate", metavar="R", type=float, help=f"messages per second per device for the fleet answers "
                                                           f"(default {DEFAULT_RATE:.4g}: one a minute)")
    p.add_argument("--broker", metavar="HOST:PORT", help="use this MQTT broker (plain TCP) instead of starting a "
                                                         "Mosquitto on loopback")
    p.add_argument("-c", "--config", metavar="FILE", help="measure this fastproxy.toml (its TLS settings, identity "
                                                         "rules, PROXY header, policy hook)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (certificates, configs, logs)")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")


def _check_args(a: argparse.Namespace) -> None:
    if a.devices is not None and a.devices < 1:
        raise ConfigError("must be at least 1", source="command line", key="--devices")
    if a.rate is not None and not (0 <= a.rate <= 1e6) or (a.rate is not None and math.isnan(a.rate)):
        raise ConfigError("must be between 0 and 1000000 messages per second", source="command line", key="--rate")
    if a.broker:
        host, _, port = a.broker.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or not _is_ip(host):
            raise ConfigError(f"{a.broker!r}: expected IP:PORT (for example 127.0.0.1:1883)", source="command line",
                              key="--broker")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'fastproxy[plot]' (or pip install matplotlib)") from None
    if a.config and not os.path.exists(a.config):
        raise ConfigError("file not found", source=a.config)
    if not (shutil.which("mosquitto") or os.access("/usr/sbin/mosquitto", os.X_OK)) and not a.broker:
        raise BenchError(f"no mosquitto binary found: {MOSQUITTO_HINT}")


def run_command(a: argparse.Namespace) -> int:
    """`fastproxy bench`; the caller (cli) turns ConfigError/BenchError into one line."""
    _check_args(a)
    b = Bench(a)
    interrupted: list[int] = []

    def on_term(signum: int, frame: Any) -> None:  # noqa: ARG001
        interrupted.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        out = b.run()
    finally:
        signal.signal(signal.SIGTERM, old)
        b.cleanup()
    text = report(out)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
            f.write("\n")
    if a.plot:
        plot(out, a.plot)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_gen":
        sys.exit(_gen_main(sys.argv[2:]))
    sys.exit("usage: fastproxy bench [options] (python -m fastproxy.bench is the load generator's entry point)")
