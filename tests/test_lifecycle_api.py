"""Lifecycle a library user can trust (issue 10): a Proxy runs once, gives its port back when
closed (started or not) and says at once when its engine thread fails; the CLI prints no
traceback; `serve` survives SIGHUP/SIGUSR1/SIGUSR2 and its workers follow their master; the
engine's table sizes are configuration errors, and their Python mirrors match the engine."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import fastproxy
import proxyutil as U
from fastproxy import cli
from fastproxy import constants as C

ERR_PREFIX = U.CONFIG_ERROR


def _cfg(**kw) -> fastproxy.Config:
    # The upstream is never dialled in the tests that use this default.
    raw = {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{U.free_port()}", "access_log": "off", **kw}
    return fastproxy.build_config(raw)


def _ports(proxy) -> list[int]:
    return [port for bound in proxy.addresses for _, port in bound]


def _bind_again(port: int) -> None:
    """Listen on port with a plain socket: fails (OSError) while anything else holds it."""
    with socket.socket() as s:
        s.bind((U.HOST, port))
        s.listen(1)


# ----------------------------------------------------------------------------- Proxy


def test_start_twice_raises_at_once(mosquitto):
    """A second start() raises RuntimeError at once and leaves the running proxy serving (and
    stop() quiet); start() after stop() or close() raises too."""
    proxy = fastproxy.Proxy(_cfg(upstream=mosquitto.upstream))
    (port,) = _ports(proxy)
    assert proxy.state == "created"
    proxy.start()
    try:
        assert proxy.state == "running"
        with pytest.raises(RuntimeError, match="already started"):
            proxy.start()
        s = U.open_socket(port)
        try:
            assert U.mqtt_handshake(s, "after-second-start") == 0
        finally:
            s.close()
    finally:
        proxy.stop()          # nothing stored from the refused start() is raised here
    assert (proxy.state, proxy.error) == ("stopped", None)
    with pytest.raises(RuntimeError, match="already stopped"):
        proxy.start()
    proxy.close()
    with pytest.raises(RuntimeError, match="closed"):
        proxy.start()


@pytest.mark.parametrize("how", ["close", "stop", "started-then-close"])
def test_listening_sockets_released(how):
    """close() or stop() of a Proxy that was never started gives its ports back at once (and a
    started one's too): a plain socket can listen on them right after."""
    proxy = fastproxy.Proxy(_cfg(listen=["127.0.0.1:0", "127.0.0.1:0"]))
    ports = _ports(proxy)
    assert len(ports) == 2 and all(U.port_is_listening(p) for p in ports)
    if how == "started-then-close":
        proxy.start()
    if how == "stop":
        proxy.stop()
    else:
        proxy.close()
    for p in ports:
        assert not U.port_is_listening(p), f"port {p} still listening after {how}"
        _bind_again(p)
    assert proxy.state == "stopped"
    with pytest.raises(RuntimeError):
        proxy.start()
    proxy.close()             # idempotent


class _EngineThatFails:
    """Stands in for the compiled engine: run() raises, everything else is the real engine's
    (this tests Proxy's own reporting of a failed engine thread, not the engine)."""

    def __init__(self, real) -> None:
        self.real = real

    def run(self) -> None:
        raise RuntimeError("engine broke")

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_engine_thread_failure_is_reported_at_once():
    """The engine thread raises: state becomes "failed" and error holds the exception without
    waiting for stop(), an ERROR line with the traceback goes to fastproxy.server, stop()
    raises it once, and close() still frees the port."""
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record)

    log = logging.getLogger("fastproxy.server")
    handler = Catch(logging.ERROR)
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    proxy = fastproxy.Proxy(_cfg())
    (port,) = _ports(proxy)
    try:
        proxy.engine = _EngineThatFails(proxy.engine)
        proxy.start()
        U.wait_until(lambda: proxy.state == "failed", 10, what='state "failed"')
        assert isinstance(proxy.error, RuntimeError) and str(proxy.error) == "engine broke"
        U.wait_until(lambda: caught, 5, what="an error log line")
        (rec,) = caught
        assert "engine broke" in rec.getMessage() and rec.exc_info and rec.exc_info[1] is proxy.error
        with pytest.raises(RuntimeError, match="engine broke"):
            proxy.stop()
        proxy.stop()                  # raised once
        assert proxy.state == "failed" and proxy.error is not None
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        proxy.close()
    _bind_again(port)


# ----------------------------------------------------------------------------- the CLI


def test_version_into_a_closed_pipe():
    """`fastproxy version | head -1`: one line out, nothing on stderr, status 0 or 141 (what a
    process killed by SIGPIPE reports); the same with a reader that is gone before the start."""
    env = U.proxy_env({"PYTHONUNBUFFERED": "1"})   # one write per line: head leaves mid-output
    r = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$0" -m fastproxy version | head -1', sys.executable],
        cwd=str(U.REPO), env=env, capture_output=True, text=True, timeout=30,
    )
    assert r.stderr == "", r.stderr
    assert re.fullmatch(r"fastproxy \d+\.\d+\S*\n", r.stdout), r.stdout
    assert r.returncode in (0, 141), r.returncode

    rfd, wfd = os.pipe()
    os.close(rfd)
    try:
        r = subprocess.run([sys.executable, "-m", "fastproxy", "version"], cwd=str(U.REPO), env=env,
                           stdout=wfd, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(wfd)
    assert r.stderr == "", r.stderr
    assert r.returncode == 141


def test_unexpected_error_is_one_line(monkeypatch, capsys):
    """A bug inside `serve` gives one line naming the exception; the traceback only at
    --log-level debug."""
    import fastproxy.server

    def broken_serve(cfg, loader=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(fastproxy.server, "serve", broken_serve)
    args = ["serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1883", "--access-log", "off"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "fastproxy: unexpected error: ZeroDivisionError: a bug (--log-level debug shows the traceback)"]
    assert cli.main(args + ["--log-level", "debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastproxy: unexpected error: ZeroDivisionError: a bug\n")
    assert "Traceback (most recent call last)" in err and "broken_serve" in err


# ----------------------------------------------------------------------------- signals and workers


@pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers2"])
def test_hup_usr1_usr2_are_logged_and_ignored(certs, mosquitto, start_proxy, paho_client, workers):
    """SIGUSR2 to `serve` (and, with workers, to each worker) is logged and ignored; SIGUSR1
    reopens the log files (tests/test_access_log.py) and SIGHUP reloads (tests/test_reload.py),
    each saying so: every process keeps running, MQTT still flows, SIGTERM still exits 0."""
    extra = ["--log-level", "debug"]          # workers log these at debug
    if workers > 1:
        extra += ["--workers", str(workers)]
    fp = start_proxy(mosquitto, *extra)
    worker_pids: set[int] = set()
    if workers > 1:
        U.wait_until(lambda: len(U.listening_pids(fp.port)) >= workers, 10, what="the workers listening")
        worker_pids = U.descendants(fp.pid)
        assert len(worker_pids) == workers, worker_pids
    sigs = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
    for sig in sigs:
        fp.signal(sig)
        for pid in worker_pids:
            os.kill(pid, sig)
    for sig in sigs:
        line = {signal.SIGUSR1: "SIGUSR1: reopened", signal.SIGHUP: "reloaded: listening on",
                signal.SIGUSR2: "SIGUSR2 received: ignored"}[sig]
        U.wait_until(lambda: fp.stderr().count(line) >= 1 + len(worker_pids), 10,
                     what=f"{1 + len(worker_pids)} log line(s) '{line}'")
    assert fp.proc.poll() is None, f"serve exited with {fp.proc.returncode}\n{fp.stderr()[-3000:]}"
    assert all(U.pid_alive(p) for p in worker_pids), "a worker died"
    assert "exited with status" not in fp.stderr()     # the master replaced no worker
    sub = paho_client(fp.port, client_id="sig-sub")
    sub.subscribe("sig/t", 1)
    pub = paho_client(fp.port, client_id="sig-pub")
    pub.publish("sig/t", b"still serving", qos=1)
    assert [m.payload for m in sub.collect(1, 10)] == [b"still serving"]
    sub.close()
    pub.close()
    assert fp.stop() == 0


def test_kill_9_of_the_master_takes_the_workers_down(certs, mosquitto, start_proxy):
    """`kill -9` of the master of `serve --workers 2`: every worker exits (no drain: with
    --drain-timeout 30 and a session open, a draining worker would still be there), and the
    port is free again."""
    fp = start_proxy(mosquitto, "--workers", "2", "--drain-timeout", "30")
    U.wait_until(lambda: len(U.listening_pids(fp.port)) >= 2, 10, what="two workers listening")
    workers = U.descendants(fp.pid)
    assert len(workers) == 2, workers
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs))
    try:
        assert U.mqtt_handshake(s, "orphan-test") == 0
        fp.proc.kill()
        fp.proc.wait(10)
        U.wait_until(lambda: not any(U.pid_alive(p) for p in workers), 5,
                     what=f"workers {sorted(workers)} to exit after the master was killed")
        closed, _, _ = U.wait_closed(s, 5)
        assert closed, "the held session outlived its worker"
    finally:
        s.close()
        for pid in workers:   # orphans of a failed run must not outlive the test
            if U.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "the master process" in fp.stderr() and "is gone; stopping now" in fp.stderr()
    assert not U.port_is_listening(fp.port)
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # the closed session's TIME_WAIT
        again.bind((U.HOST, fp.port))
        again.listen(1)


# ----------------------------------------------------------------------------- the engine's limits


def _addresses(n: int) -> list[str]:
    return [f"127.0.0.1:{20000 + i}" for i in range(n)]


@pytest.mark.parametrize("command", ["check", "serve"])
def test_too_many_listen_addresses_is_a_configuration_error(tmp_path, command):
    """More listen addresses than the engine's table holds: exit 2, one line naming `listen`,
    from a file (one listener or several) and from flags."""
    n = C.MAX_LISTENERS + 1
    one = tmp_path / "one.toml"
    one.write_text(f"listen = {_addresses(n)!r}\nupstream = \"127.0.0.1:1883\"\n".replace("'", '"'))
    line = U.one_error_line(U.run_cli(command, "-c", str(one)))
    assert line == f"{ERR_PREFIX}{one}: listen: {n} listen addresses in all; at most {C.MAX_LISTENERS} are supported"
    several = tmp_path / "several.toml"
    addrs = _addresses(n)
    half = n // 2
    several.write_text(
        'upstream = "127.0.0.1:1883"\n'
        + f"[[listener]]\nlisten = {addrs[:half]!r}\n".replace("'", '"')
        + f"[[listener]]\nlisten = {addrs[half:]!r}\n".replace("'", '"')
    )
    line = U.one_error_line(U.run_cli(command, "-c", str(several)))
    assert line.startswith(f"{ERR_PREFIX}{several}: listen: {n} listen addresses"), line
    flags = [a for addr in addrs for a in ("--listen", addr)]
    line = U.one_error_line(U.run_cli(command, *flags, "--upstream", "127.0.0.1:1883"))
    assert line.startswith(f"{ERR_PREFIX}command line: --listen: {n} listen addresses"), line


def test_other_engine_limits_are_configuration_errors():
    """Upstream servers over all listeners and trusted networks per listener, like listen."""
    servers = _addresses(C.MAX_POOL)
    tables = [{"listen": f"127.0.0.1:{30000 + i}"} for i in range(C.MAX_UPSTREAMS // C.MAX_POOL + 1)]
    with pytest.raises(fastproxy.ConfigError, match=rf"^t\.toml: upstream: .*at most {C.MAX_UPSTREAMS}"):
        fastproxy.build_config({"upstream": servers, "listener": tables}, source="t.toml")
    nets = [f"10.{i}.0.0/16" for i in range(C.MAX_TRUSTED + 1)]
    with pytest.raises(fastproxy.ConfigError, match=rf"--trusted-proxies: at most {C.MAX_TRUSTED} networks"):
        _cfg(accept_proxy_protocol=True, trusted_proxies=nets)
    _cfg(accept_proxy_protocol=True, trusted_proxies=nets[:-1])


def _engine_source_values() -> dict[str, set[int]]:
    """NAME -> values given to it in the engine's .pxd sources (enum members NAME = 123)."""
    found: dict[str, set[int]] = {}
    for root, _, files in os.walk(U.REPO / "ext"):
        for f in files:
            if f.endswith(".pxd"):
                text = open(os.path.join(root, f)).read()
                for name, value in re.findall(r"^\s*([A-Z][A-Z0-9_]+)\s*=\s*(\d+)\b", text, re.M):
                    found.setdefault(name, set()).add(int(value))
    return found


MIRRORED = ("MAX_LISTENERS", "MAX_UPSTREAMS", "MAX_POOL", "MAX_SOURCES", "MAX_TRUSTED", "PP_HEADER_MAX",
            "MIN_CONNECT_SIZE")


@pytest.mark.parametrize("name", MIRRORED)
def test_engine_limits_mirror_the_engine(name):
    """Each Python mirror in fastproxy.constants equals the engine's C value: in the sources,
    and in the built engine when it exports them."""
    assert _engine_source_values().get(name) == {getattr(C, name)}, f"{name}: ext/ says otherwise"
    from fastproxy import _engine

    limits = getattr(_engine, "LIMITS", None)
    if limits is not None:
        assert limits[name] == getattr(C, name)


def test_mode_names_mirror_the_engine():
    from fastproxy import _engine, config

    if hasattr(_engine, "BALANCE_MODES"):
        assert tuple(_engine.BALANCE_MODES) == C.BALANCE_MODES
    limits = getattr(_engine, "LIMITS", None)
    if limits is not None:
        assert limits["BAL_SOURCE"] == len(C.BALANCE_MODES) - 1
        assert limits["PP_V2_SSL_CN"] == len(C.PROXY_PROTOCOL_MODES) - 1
    # one home: config re-exports the same objects
    assert config.BALANCE_MODES is C.BALANCE_MODES and config.PROXY_PROTOCOL_MODES is C.PROXY_PROTOCOL_MODES
    assert (config.MAX_POOL, config.MAX_SOURCES) == (C.MAX_POOL, C.MAX_SOURCES)


# ----------------------------------------------------------------------------- configuration keys


def test_boundary_keys_defaults_flags_and_file(tmp_path):
    """policy_threads, policy_timeout, record_queue: defaults, flags, file keys."""
    cfg = _cfg()
    assert (cfg.policy_threads, cfg.policy_timeout, cfg.record_queue) == (
        C.POLICY_THREADS, C.POLICY_TIMEOUT_S, C.RECORD_QUEUE) == (4, 5.0, 65536)
    ns = cli._parser().parse_args(["serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1883",
                                   "--policy-threads", "8", "--policy-timeout", "250ms", "--record-queue", "16"])
    cfg = cli.config_from_args(ns)
    assert (cfg.policy_threads, cfg.policy_timeout, cfg.record_queue) == (8, 0.25, 16)
    f = tmp_path / "b.toml"
    f.write_text('listen = "127.0.0.1:0"\nupstream = "127.0.0.1:1883"\n'
                 'policy_threads = 2\npolicy_timeout = "2s"\nrecord_queue = 1024\n')
    cfg = fastproxy.load_config(str(f))
    assert (cfg.policy_threads, cfg.policy_timeout, cfg.record_queue) == (2, 2.0, 1024)


@pytest.mark.parametrize("key, value, problem", [
    ("policy_threads", 0, "positive integer"),
    ("policy_timeout", "0s", "greater than 0"),
    ("policy_timeout", -1, "negative"),
    ("record_queue", 15, "at least 16"),
])
def test_boundary_keys_errors(key, value, problem):
    with pytest.raises(fastproxy.ConfigError, match=rf"^f\.toml: {key}: .*{problem}"):
        fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": "127.0.0.1:1883", key: value},
                               source="f.toml")


def test_every_key_has_a_flag():
    """Flags and file keys map one to one: every key of config.py has its --flag in `serve`
    (and `check`), named after it; `upstreams` is --named-upstream."""
    from fastproxy.config import config_keys, flag_for

    for command in ("serve", "check"):
        sub = cli._parser()._subparsers._group_actions[0].choices[command]   # type: ignore[union-attr]
        flags = {s for a in sub._actions for s in a.option_strings}
        missing = [k for k in config_keys() if k != "upstreams" and flag_for(k) not in flags]
        assert not missing, f"{command}: keys without a flag: {missing}"
        assert "--named-upstream" in flags
