"""Hold N idle mTLS MQTT sessions (default 100 000) through a proxy on this machine and report the
proxy's memory: total RSS and PSS of its processes at two fill levels, KiB per session (the slope
between them) — for fastproxy, and optionally HAProxy and nginx (--peers haproxy,nginx).

It stays inside the machine's per-process descriptor limit (RLIMIT_NOFILE, hard):
  - fastproxy gets enough --workers that none holds more than (limit - 200) / 2 sessions (2
    descriptors each, SO_REUSEPORT spreads unevenly: 10 % headroom);
  - the broker is a pool of Mosquitto instances on different loopback ports (one --upstream per
    instance, ClientId hashing), each holding at most --per-broker sessions;
  - the load comes from several generator processes (fastproxy._loadgen), each with at most
    --per-gen connections and its own 127.0.x.y source address (ephemeral ports are per source
    and destination).
nginx gets the same worker count (`listen ... reuseport`); HAProxy 2.6 is one process (no nbproc),
so it is measured at the sessions one process can hold, (limit - 200) / 2, and says so (it can
only go further where it may raise its own hard limit).

Every wait is bounded by --timeout; every process started is stopped at the end.

    python3 benchmarks/idle_scale.py --conns 20000
    python3 benchmarks/idle_scale.py --conns 100000 --peers haproxy,nginx --json idle100k.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTLE_S = 8.0   # quiet time before memory is read at a fill level
sys.path.insert(0, REPO)

from fastproxy.benchrig import (  # noqa: E402
    FD_RESERVE,
    HOST,
    Gen,
    Mosquitto,
    can_connect,
    find_mosquitto,
    free_port,
    machine_info,
    make_pki,
    memory_kib,
    process_tree,
    raise_nofile,
    stop,
    tls_library_name,
)
from fastproxy.errors import BenchError  # noqa: E402

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def log(msg: str) -> None:
    sys.stderr.write(f"[idle_scale {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def fd_count(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


class Run:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.nofile = raise_nofile()
        self.tmp = tempfile.mkdtemp(prefix="idle-scale-")
        self.pki = make_pki(self.tmp)
        self.brokers: list[Mosquitto] = []
        self.gens: list[Gen] = []
        self.proc: subprocess.Popen | None = None
        self.deadline = time.monotonic() + a.timeout
        self.per_worker = (self.nofile - FD_RESERVE) // 2
        self.workers = a.workers or max(1, math.ceil(a.conns * 1.1 / self.per_worker))
        self.n_brokers = a.brokers or max(1, math.ceil(a.conns / a.per_broker))
        with open(self.pki.server_cert) as c, open(self.pki.server_key) as k:
            self.combined = os.path.join(self.tmp, "server.pem")
            with open(self.combined, "w") as f:
                f.write(c.read() + k.read())

    def left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    # -- brokers

    def start_brokers(self) -> None:
        exe = find_mosquitto(False)
        for i in range(self.n_brokers):
            b = Mosquitto(exe, self.tmp, name=f"mosquitto{i}")
            b.start()
            self.brokers.append(b)
        log(f"{self.n_brokers} Mosquitto instance(s) on {', '.join(str(b.port) for b in self.brokers)}")

    # -- proxies

    def start_proxy(self, name: str) -> tuple[int, int]:
        """Starts one proxy in its own session; returns (port, processes expected)."""
        port = free_port()
        ups = [f"{HOST}:{b.port}" for b in self.brokers]
        out = open(os.path.join(self.tmp, f"{name}.out"), "wb")
        p = self.pki
        if name == "fastproxy":
            argv = [sys.executable, "-m", "fastproxy", "serve", "--listen", f"{HOST}:{port}"]
            for u in ups:
                argv += ["--upstream", u]
            argv += ["--tls-cert", p.server_cert, "--tls-key", p.server_key, "--client-ca", p.ca_cert,
                     "--verify", "required", "--access-log", "off", "--idle-timeout", "1h", "--workers",
                     str(self.workers), "--health-interval", "0", "--drain-timeout", "0",
                     "--error-log", os.path.join(self.tmp, "fastproxy.err")]
            env = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                                      if os.environ.get("PYTHONPATH") else ""))
            expect = 1 + (self.workers if self.workers > 1 else 0)
        elif name == "haproxy":
            maxconn = self.target(name) + 50
            cfg = os.path.join(self.tmp, "haproxy.cfg")
            with open(cfg, "w") as f:
                f.write("global\n    nbthread 1\n" f"    maxconn {maxconn}\n"
                        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n"
                        f"    timeout server 1h\n    maxconn {maxconn}\n"
                        f"frontend fe\n    bind {HOST}:{port} ssl crt {self.combined} verify required ca-file {p.ca_cert}\n"
                        "    default_backend be\nbackend be\n    balance roundrobin\n"
                        + "".join(f"    server b{i} {u}\n" for i, u in enumerate(ups)))
            argv = ["haproxy", "-db", "-f", cfg]
            env = dict(os.environ)
            expect = 1
        elif name == "nginx":
            prefix = os.path.join(self.tmp, "nginx")
            os.makedirs(prefix, exist_ok=True)
            cfg = os.path.join(prefix, "nginx.conf")
            load = f"load_module {NGINX_STREAM_MODULE};\n" if os.path.exists(NGINX_STREAM_MODULE) else ""
            with open(cfg, "w") as f:
                f.write(f"{load}daemon off;\nworker_processes {self.workers};\n"
                        f"worker_rlimit_nofile {self.nofile};\npid {prefix}/nginx.pid;\n"
                        f"error_log {prefix}/error.log warn;\n"
                        f"events {{ worker_connections {self.nofile - 100}; }}\n"
                        "stream {\n    upstream brokers {\n"
                        + "".join(f"        server {u};\n" for u in ups)
                        + "    }\n    server {\n"
                        f"        listen {HOST}:{port} ssl reuseport;\n"
                        f"        ssl_certificate {p.server_cert};\n        ssl_certificate_key {p.server_key};\n"
                        f"        ssl_verify_client on;\n        ssl_client_certificate {p.ca_cert};\n"
                        "        proxy_connect_timeout 5s;\n        proxy_timeout 1h;\n"
                        "        proxy_pass brokers;\n    }\n}\n")
            argv = ["nginx", "-p", prefix, "-c", cfg, "-e", f"{prefix}/error.log"]
            env = dict(os.environ)
            expect = 1 + self.workers
        else:
            raise BenchError(f"unknown peer {name!r} (haproxy, nginx)")
        if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
            raise BenchError(f"{name} is not installed (scripts/install-deps)")
        self.proc = subprocess.Popen(argv, cwd=self.tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True)
        out.close()
        deadline = time.monotonic() + 30
        while not can_connect(HOST, port) or len(process_tree(self.proc.pid)) < expect:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop(self.proc, twice=True)
                with open(os.path.join(self.tmp, f"{name}.out"), errors="replace") as f:
                    raise BenchError(f"{name} did not start: {f.read()[-800:]}")
            time.sleep(0.1)
        time.sleep(1.0)
        return port, expect

    def fill(self, name: str, port: int, target: int, live: int) -> int:
        """Opens sessions in generator processes until `target` are held; returns the count held."""
        while live < target:
            size = min(self.a.per_gen, target - live)
            idx = len(self.gens)
            params = dict(scenario="idle", host=HOST, port=port, conns=size, concurrency=self.a.concurrency,
                          tls=True, ca=self.pki.ca_cert, cert=self.pki.ca_cert, ca_key=self.pki.ca_key,
                          key=self.pki.device_key, prefix=f"i{idx}", keepalive=0, timeout=self.left(), hold=True,
                          sources=[f"127.0.{10 + idx // 250}.{2 + idx % 250}"], conn_timeout=60)
            g = Gen(params)
            self.gens.append(g)
            t0 = time.monotonic()
            base = live

            def tick(s: dict[str, int]) -> None:
                if time.monotonic() - tick.last > 5:  # type: ignore[attr-defined]
                    tick.last = time.monotonic()  # type: ignore[attr-defined]
                    log(f"{name}: {base + s.get('live', 0)}/{target} held (generator {idx}: failed {s.get('failed', 0)})")

            tick.last = 0.0  # type: ignore[attr-defined]
            if not g.wait("ready", self.left(), tick):
                r = g.finish(10)
                raise BenchError(f"{name}: generator {idx} opened {r['connack_ok']} of {size} "
                                 f"(first error: {r['first_error'] or '-'})")
            got = g.last.get("live", 0)
            if got < size:
                log(f"{name}: generator {idx} holds {got} of {size} (failed {g.last.get('failed', 0)})")
            live += got
            log(f"{name}: {live}/{target} held ({got} in {time.monotonic() - t0:.0f}s)")
            if got == 0:
                raise BenchError(f"{name}: a generator opened no session")
        return live

    def target(self, name: str) -> int:
        """Sessions to hold: all, but for a single-process proxy what its descriptors allow."""
        return min(self.a.conns, self.per_worker) if name == "haproxy" else self.a.conns

    def measure(self, name: str) -> dict:
        n = self.target(name)
        if n < self.a.conns:
            log(f"{name}: one process, descriptor limit {self.nofile}: measured at {n} sessions")
        port, _ = self.start_proxy(name)
        assert self.proc is not None
        pids = process_tree(self.proc.pid)
        base_rss, base_pss = memory_kib(pids)
        levels = []
        live = 0
        t0 = time.monotonic()
        for target in (n // 2, n):
            live = self.fill(name, port, target, live)
            # Idle means quiet for a while: fastproxy gives a quiet session's buffers back after 1 s
            # and trims the heap at most every 5 s; every proxy gets the same wait.
            time.sleep(SETTLE_S)
            pids = process_tree(self.proc.pid)
            rss, pss = memory_kib(pids)
            levels.append({"sessions": live, "rss_kib": rss, "pss_kib": pss, "processes": len(pids),
                           "fds": fd_count(pids), "per_process_rss_kib": [memory_kib([p])[0] for p in pids]})
            log(f"{name}: {live} sessions: RSS {rss / 1024:.0f} MiB, PSS {pss / 1024:.0f} MiB in {len(pids)} processes")
        fill_s = time.monotonic() - t0
        results = [g.finish(60) for g in self.gens]
        closed = sum(r["closed_by_peer"] for r in results)
        self.gens = []
        stop(self.proc, twice=True, timeout=30)
        self.proc = None
        (l1, l2) = levels
        dn = l2["sessions"] - l1["sessions"]
        return {
            "proxy": name,
            "sessions": l2["sessions"],
            "baseline_rss_kib": base_rss,
            "baseline_pss_kib": base_pss,
            "levels": levels,
            "kib_per_session_rss": (l2["rss_kib"] - l1["rss_kib"]) / dn if dn > 0 else None,
            "kib_per_session_pss": (l2["pss_kib"] - l1["pss_kib"]) / dn if dn > 0 else None,
            "kib_per_session_rss_total": (l2["rss_kib"] - base_rss) / l2["sessions"] if l2["sessions"] else None,
            "kib_per_session_pss_total": (l2["pss_kib"] - base_pss) / l2["sessions"] if l2["sessions"] else None,
            "closed_while_held": closed,
            "fill_s": fill_s,
            "workers": self.workers if name != "haproxy" else 1,
        }

    def cleanup(self) -> None:
        for g in self.gens:
            g.kill()
        stop(self.proc, twice=True)
        for b in self.brokers:
            b.stop()
        if self.a.keep_tmp:
            log(f"files kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=100_000, help="idle sessions to hold (default 100000)")
    p.add_argument("--workers", type=int, default=0, help="fastproxy/nginx workers (default: from the descriptor limit)")
    p.add_argument("--brokers", type=int, default=0, help="Mosquitto instances (default: conns / --per-broker)")
    p.add_argument("--per-broker", type=int, default=15_000, help="sessions per Mosquitto instance (default 15000)")
    p.add_argument("--per-gen", type=int, default=19_000, help="connections per generator process (default 19000)")
    p.add_argument("--concurrency", type=int, default=64, help="handshakes in flight per generator (default 64)")
    p.add_argument("--peers", default="", help="also measure these: haproxy,nginx")
    p.add_argument("--timeout", type=float, default=3600, help="bound of the whole run in seconds (default 3600)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--keep-tmp", action="store_true")
    a = p.parse_args(argv)
    peers = [x for x in a.peers.split(",") if x]
    if a.conns < 2 or a.per_gen < 1 or a.per_broker < 1:
        p.error("--conns must be >= 2, --per-gen and --per-broker >= 1")
    run = Run(a)
    if a.per_gen > run.nofile - 100:
        p.error(f"--per-gen {a.per_gen} does not fit the descriptor limit {run.nofile}")
    if a.per_broker > run.nofile - 100:
        p.error(f"--per-broker {a.per_broker} does not fit the descriptor limit {run.nofile}")
    m = machine_info()
    log(f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB; {tls_library_name()}; descriptor limit "
        f"{run.nofile}; {a.conns} sessions: fastproxy --workers {run.workers}, {run.n_brokers} broker(s), "
        f"{math.ceil(a.conns / a.per_gen)} generator process(es)")
    out: dict = {"machine": m, "tls_library": tls_library_name(), "conns": a.conns, "workers": run.workers,
                 "brokers": run.n_brokers, "per_gen": a.per_gen, "results": [], "errors": {}}
    try:
        run.start_brokers()
        for name in ["fastproxy"] + peers:
            try:
                out["results"].append(run.measure(name))
            except BenchError as e:
                log(f"{name}: {e}")
                out["errors"][name] = str(e)
                for g in run.gens:
                    g.kill()
                run.gens = []
                stop(run.proc, twice=True)
                run.proc = None
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BenchError as e:
        log(str(e))
        return 1
    finally:
        run.cleanup()
    print(f"{'proxy':<10} {'sessions':>9} {'procs':>5} {'RSS MiB':>9} {'PSS MiB':>9} {'KiB/session RSS':>16} "
          f"{'KiB/session PSS':>16} {'baseline MiB':>12} {'fill s':>7}")
    for r in out["results"]:
        last = r["levels"][-1]
        print(f"{r['proxy']:<10} {r['sessions']:>9} {last['processes']:>5} {last['rss_kib'] / 1024:>9.0f} "
              f"{last['pss_kib'] / 1024:>9.0f} {r['kib_per_session_rss'] or 0:>16.2f} {r['kib_per_session_pss'] or 0:>16.2f} "
              f"{r['baseline_rss_kib'] / 1024:>12.0f} {r['fill_s']:>7.0f}")
    for name, err in out["errors"].items():
        print(f"{name}: not measured: {err}")
    print("KiB/session: the slope between the half and the full fill level (RSS of all the proxy's processes; "
          "PSS counts pages shared by forked workers once)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if out["results"] and not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
