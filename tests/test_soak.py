"""Soak (issue 13 part 7): thousands of TLS sessions with keepalive pings, publishes and churn
for a long time; the proxy's memory and descriptors must stay flat. Marked slow (`pytest -m slow`).

FASTPROXY_SOAK_SECONDS (default 1800), FASTPROXY_SOAK_SESSIONS (5000), FASTPROXY_SOAK_CHURN
(sessions closed and reopened per second, 20) size it; a short try: FASTPROXY_SOAK_SECONDS=120.
Loopback only, real Mosquitto, real TLS; every wait is bounded.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest

import faultutil as F
import proxyutil as U

HOST = U.HOST
SOAK_SECONDS = float(os.environ.get("FASTPROXY_SOAK_SECONDS", "1800"))
SESSIONS = int(os.environ.get("FASTPROXY_SOAK_SESSIONS", "5000"))
CHURN_PER_S = int(os.environ.get("FASTPROXY_SOAK_CHURN", "20"))
TOLERANCE = 0.05


def _schedule(total: float) -> tuple[float, float]:
    """(warm-up, sample interval): 10 % of the run (30 s to 5 min) to warm up, then a sample every
    30 s, or 10 samples when the run is short."""
    warm = min(300.0, max(30.0, total * 0.1))
    return warm, min(30.0, max(1.0, (total - warm) / 10))


@pytest.mark.slow
def test_soak_sessions_with_churn_keep_rss_and_descriptors_flat(mosquitto, run_fastproxy, certs):
    """5000 TLS sessions (MQTT keepalive 30 s with a PINGREQ every ~15 s, a QoS 0 PUBLISH every
    ~60 s each) through one proxy process to Mosquitto; every second 20 of them say DISCONNECT,
    close and connect again. After the warm-up the proxy's RSS and descriptor count are sampled
    every 30 s; every sample, the last included, is within ±5 % of the median of the samples.
    Also: every reconnect gets CONNACK 0 (no refusal, no failed attempt), sessions only end when
    the test ends them (no idle-timeout, no broker keepalive cut), the proxy never exits or prints
    a traceback, and once the devices leave its descriptors return to the idle count."""
    n = SESSIONS
    limit = U.raise_nofile(n + 2000)
    if limit < n + 500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {limit} is too low for {n} sessions")
    warm, every = _schedule(SOAK_SECONDS)
    port = U.free_port()
    fp = run_fastproxy("--listen", f"{HOST}:{port}", "--upstream", mosquitto.upstream, "--tls-cert",
                       certs.server_cert, "--tls-key", certs.server_key, "--access-log", "off")
    time.sleep(0.5)
    idle_fds = F.fd_count(fp.pid)
    fleet = F.Fleet(port, n, ctx=U.client_context(certs), prefix="soak", keepalive=30, concurrency=200,
                    backoff=(0.05, 0.5), attempt_timeout=30, ping_every=15, publish_every=60).start()
    samples: list[tuple[float, int, int, int]] = []   # (t, rss KiB, fds, held)
    try:
        fleet.wait_held(n, 300)
        t_start = time.monotonic()
        t_end = t_start + SOAK_SECONDS
        next_churn = t_start + 1
        next_sample = t_start + warm
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if now >= next_churn:
                fleet.churn(CHURN_PER_S)
                next_churn += 1
            if now >= next_sample:
                samples.append((round(now - t_start, 1), U.rss_kib(fp.pid), F.fd_count(fp.pid), fleet.held))
                next_sample += every
            assert fp.proc.poll() is None, f"the proxy exited during the soak:\n{fp.stderr()[-3000:]}"
            assert fleet.loop_error is None, f"fleet loop died: {fleet.loop_error!r}"
            time.sleep(max(0.0, min(next_churn, next_sample, t_end) - time.monotonic()))
        samples.append((round(time.monotonic() - t_start, 1), U.rss_kib(fp.pid), F.fd_count(fp.pid), fleet.held))
        churned = sum(d.churned for d in fleet.devices)
        summary = fleet.summary()
        eofs = sum(d.eofs for d in fleet.devices)
        pongs = sum(d.pongs for d in fleet.devices)
    finally:
        fleet.close(disconnect=True)

    print(f"soak: {SOAK_SECONDS:.0f}s, {n} sessions, churn {CHURN_PER_S}/s, warm-up {warm:.0f}s, every {every:.0f}s")
    print(f"soak: {summary}; churned {churned}; pings answered {pongs}; idle fds {idle_fds}")
    print("soak: t_s rss_kib fds held")
    for s in samples:
        print("soak:", *s)
    assert len(samples) >= 3, samples
    rss_med = statistics.median(s[1] for s in samples)
    fds_med = statistics.median(s[2] for s in samples)
    print(f"soak: median rss {rss_med} KiB, median fds {fds_med}")
    bad_rss = [s for s in samples if abs(s[1] - rss_med) > TOLERANCE * rss_med]
    bad_fds = [s for s in samples if abs(s[2] - fds_med) > TOLERANCE * fds_med]
    assert not bad_rss, f"RSS off its median {rss_med} KiB by more than 5 %: {bad_rss}"
    assert not bad_fds, f"descriptors off their median {fds_med} by more than 5 %: {bad_fds}"
    assert fds_med >= 2 * n * (1 - TOLERANCE), f"only {fds_med} descriptors for {n} sessions"
    assert churned >= CHURN_PER_S * SOAK_SECONDS * 0.5, f"only {churned} sessions churned"
    assert not fleet.errors, f"failed attempts or refusals: {dict(fleet.errors)}"
    assert eofs == 0, f"{eofs} sessions were ended by the proxy or the broker"
    assert pongs > 0
    U.wait_until(lambda: F.fd_count(fp.pid) <= idle_fds, 60,
                 what=f"the proxy's descriptors back to {idle_fds} (now {F.fd_count(fp.pid)})")
    assert fp.proc.poll() is None
    assert F.no_traceback(fp.stderr()), fp.stderr()[-3000:]
