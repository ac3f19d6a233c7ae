"""Prometheus metrics (issue 12): GET /metrics on --admin, fastproxy.metrics.

Real traffic through `fastproxy serve` (real TLS, real Mosquitto): good mTLS sessions, a
handshake with a rogue certificate, an identity refusal, a policy refusal whose free text
names the ClientId. The exposition text is parsed here and checked for format (TYPE before
samples, cumulative buckets ending in +Inf == _count) and for values; no ClientId or free text
may ever be a label value. Also summed over --workers 2, and bounded under 200 ClientIds.
"""
from __future__ import annotations

import http.client
import json
import math
import re
import ssl
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

import proxyutil as U
from fastproxy import metrics as M
from fastproxy.admin import merge_worker_status, metrics_text

HOST = U.HOST

POLICY_MODULE = '''
from fastproxy.mqtt import ReasonCode
from fastproxy.policy import Deny


def deny_some(connect, cert, client):
    """thing002, and ClientIds starting with dev-, are refused with a text naming the ClientId."""
    if connect.client_id == "thing002" or connect.client_id.startswith("dev-"):
        return Deny(ReasonCode.NOT_AUTHORIZED, f"device {connect.client_id} is not on the allow list")
    return None
'''


# ----------------------------------------------------------------------------- the exposition parser


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def get(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels` (0 if none)."""
        return sum(v for n, ls, v in self.samples if n == name and all(ls.get(k) == x for k, x in labels.items()))

    def series(self, name: str) -> list[dict[str, str]]:
        return [ls for n, ls, _ in self.samples if n == name]

    def label_values(self) -> set[str]:
        return {v for _, ls, _ in self.samples for v in ls.values()}


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad label set {text!r} at {pos}"
        assert m.group(1) not in out, f"label {m.group(1)} twice in {text!r}"
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return out


def _family_of(name: str, types: dict[str, str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name


def parse_exposition(text: str) -> Exposition:
    """Text format 0.0.4, strictly: every sample's family has a TYPE line before it, each
    family's lines are together, values are numbers, no series twice; histograms are checked."""
    assert text.endswith("\n")
    e = Exposition()
    done: set[str] = set()
    current = None
    seen: set[tuple[str, tuple]] = set()
    for line in text.splitlines():
        assert line.strip(), "blank line"
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert name not in e.helps, f"HELP twice for {name}"
            e.helps[name] = help_
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in e.types, f"TYPE twice for {name}"
            if current is not None:
                done.add(current)
            e.types[name] = kind
            current = name
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), _labels(m.group(3) or ""), m.group(4)
        fam = _family_of(name, e.types)
        assert fam in e.types, f"sample {name} has no TYPE line before it"
        assert fam == current and fam not in done, f"sample {name} is not with its family's other lines"
        v = float(value)  # "+Inf", "NaN" and numbers parse; anything else raises
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"series twice: {line}"
        seen.add(key)
        e.samples.append((name, labels, v))
    for name, kind in e.types.items():
        assert name.startswith("fastproxy_"), name
        assert name in e.helps, f"no HELP for {name}"
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            _check_histogram(e, name)
    return e


def _check_histogram(e: Exposition, name: str) -> None:
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for n, ls, v in e.samples:
        if n == name + "_bucket":
            rest = tuple(sorted((k, x) for k, x in ls.items() if k != "le"))
            groups[rest].append((float(ls["le"]), v))
    counts = {tuple(sorted(ls.items())): v for n, ls, v in e.samples if n == name + "_count"}
    sums = {tuple(sorted(ls.items())): v for n, ls, v in e.samples if n == name + "_sum"}
    assert set(groups) == set(counts) == set(sums), name
    for key, buckets in groups.items():
        les = [b for b, _ in buckets]
        assert les == sorted(les) and les[-1] == math.inf, (name, key, les)
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{name}{key}: buckets not cumulative: {values}"
        assert values[-1] == counts[key], f"{name}{key}: +Inf bucket {values[-1]} != _count {counts[key]}"


# ----------------------------------------------------------------------------- helpers


def get(admin: int, path: str = "/metrics") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(HOST, admin, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        conn.close()


def scrape(admin: int) -> tuple[Exposition, str]:
    status, ctype, body = get(admin)
    assert status == 200, body
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    return parse_exposition(body), body


def wait_scrape(admin: int, pred, what: str, timeout: float = 15.0) -> tuple[Exposition, str]:
    last: list = [None]

    def attempt():
        try:
            e, body = scrape(admin)
        except OSError:
            return None
        last[0] = body
        return (e, body) if pred(e) else None

    try:
        return U.wait_until(attempt, timeout, interval=0.1, what=what)
    except AssertionError:
        raise AssertionError(f"{what}; last /metrics:\n{last[0]}") from None


def ctx(certs, cert=None, key=None) -> ssl.SSLContext:
    return U.client_context(certs, cert=cert, key=key)


@pytest.fixture
def policy_env(tmp_path):
    (tmp_path / "metrics_policy.py").write_text(textwrap.dedent(POLICY_MODULE))
    return {"PYTHONPATH": f"{U.REPO}:{tmp_path}"}


# ----------------------------------------------------------------------------- end to end


def test_metrics_from_real_traffic(certs, identity_certs, mosquitto, start_proxy, policy_env):
    admin = U.free_port()
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--verify", "required", "--require-clientid-cn",
                     "--policy", "metrics_policy:deny_some", "--admin", f"{HOST}:{admin}", env=policy_env)
    good = ctx(certs, certs.client_cert, certs.client_key)             # CN=thing001
    for version in (4, 5, 4):
        o = U.try_connect(fp.port, U.connect_packet("thing001", keepalive=30, version=version), tls_ctx=good)
        assert o.code == 0, o
    # a certificate from an untrusted CA: the handshake fails
    o = U.try_connect(fp.port, U.connect_packet("thing001"),
                      tls_ctx=ctx(certs, certs.rogue_client_cert, certs.rogue_client_key))
    assert o.code is None, o
    # identity: ClientId != CN, refused by the engine (MQTT 5: 0x85)
    o = U.try_connect(fp.port, U.connect_packet("BADTHING", version=5), tls_ctx=good)
    assert o.code == 0x85, o
    # policy: Deny whose free text names the ClientId (3.1.1: 0x05 = MQTT 5 0x87)
    o = U.try_connect(fp.port, U.connect_packet("thing002"),
                      tls_ctx=ctx(certs, identity_certs.thing002_cert, identity_certs.thing002_key))
    assert o.code == 0x05, o
    entries = fp.wait_access(n=6)

    e, body = wait_scrape(admin, lambda e: e.get("fastproxy_sessions_total") == 6, "6 sessions in /metrics")
    # what must never be there: ClientIds, the policy's free text, addresses, CNs
    assert "thing002" not in body and "BADTHING" not in body and "allow list" not in body
    assert "thing001" not in body
    for n, ls, _ in e.samples:
        for k, v in ls.items():
            assert "thing00" not in v and "BADTHING" not in v, (n, ls)
            assert k == "server" or HOST not in v, (n, ls)          # no client address

    assert e.get("fastproxy_connections_accepted_total") == 6
    assert e.get("fastproxy_connections_active") == 0
    assert e.get("fastproxy_workers") == 1 and e.get("fastproxy_workers_missing") == 0
    assert e.get("fastproxy_sessions_total", listener="listener0", status="200") == 3
    assert e.get("fastproxy_sessions_total", reason="tls-handshake-failed", status="400") == 1
    assert e.get("fastproxy_sessions_total", reason="denied", status="403") == 2
    # TLS: 5 completed handshakes (3 good, 2 refused after it), 1 failed with OpenSSL's reason
    assert e.get("fastproxy_tls_handshakes_total", result="ok") == 5
    failed = [ls for ls in e.series("fastproxy_tls_handshakes_total") if ls["result"] == "failed"]
    assert len(failed) == 1 and e.get("fastproxy_tls_handshakes_total", result="failed") == 1
    assert failed[0]["reason"] not in ("", "none", "unknown"), failed
    assert e.get("fastproxy_tls_handshakes_total", result="timeout") == 0
    tls = e.series("fastproxy_tls_sessions_total")
    assert tls and all(ls["version"] in ("TLSv1.2", "TLSv1.3") and ls["cipher"].isupper() for ls in tls), tls
    assert e.get("fastproxy_tls_sessions_total") == 5
    # refusals: bounded causes, MQTT 5 codes
    assert e.get("fastproxy_connect_refusals_total", code="0x85", cause="clientid-cn-mismatch") == 1
    assert e.get("fastproxy_connect_refusals_total", code="0x87", cause="policy-deny") == 1
    assert e.get("fastproxy_connect_refusals_total") == 2
    # the gate ran for the 4 clients past the engine's CN check: 3 allowed, 1 denied
    assert e.get("fastproxy_policy_decisions_total", listener="listener0", outcome="allow") == 3
    assert e.get("fastproxy_policy_decisions_total", outcome="deny") == 1
    assert e.get("fastproxy_policy_duration_seconds_count", listener="listener0") == 4
    assert 0 < e.get("fastproxy_policy_duration_seconds_sum") < 4 * 5
    # bytes per listener: what the access log says
    assert e.get("fastproxy_session_received_bytes_total", listener="listener0") == sum(
        x.received for x in entries)
    assert e.get("fastproxy_session_sent_bytes_total", listener="listener0") == sum(x.sent for x in entries)
    assert e.get("fastproxy_received_bytes_total") == sum(x.received for x in entries)
    # session durations: the 3 established sessions, all short
    assert e.get("fastproxy_session_duration_seconds_count", listener="listener0") == 3
    assert e.get("fastproxy_session_duration_seconds_bucket", listener="listener0", le="5.0") == 3
    # the upstream: up, 3 sessions went to it, none open, no failures
    lab = {"pool": "listener0", "server": mosquitto.upstream}
    assert e.get("fastproxy_upstream_up", **lab) == 1
    assert e.get("fastproxy_upstream_sessions_total", **lab) == 3
    assert e.get("fastproxy_upstream_sessions", **lab) == 0
    assert e.get("fastproxy_upstream_connect_failures_total", **lab) == 0
    assert e.get("fastproxy_callback_errors_total") == 0 and e.get("fastproxy_records_dropped_total") == 0
    assert {ls["kind"] for ls in e.series("fastproxy_notices_total")} >= {"fd-exhausted", "connection-cap"}
    # every documented family is there (HELP and TYPE), and nothing else
    assert set(e.types) == set(M.FAMILIES)
    # /status is unchanged JSON
    status, ctype, text = get(admin, "/status")
    assert status == 200 and ctype == "application/json" and json.loads(text)["counters"]["accepted"] == 6


def test_upstream_health_metrics(mosquitto, start_proxy):
    admin = U.free_port()
    dead = U.free_port()
    start_proxy(mosquitto, "--upstream", f"{HOST}:{dead}", "--health-interval", "200ms", "--health-rise", "1",
                "--health-fall", "1", "--admin", f"{HOST}:{admin}", tls=False)
    up = {"pool": "listener0", "server": mosquitto.upstream}
    down = {"pool": "listener0", "server": f"{HOST}:{dead}"}

    def ready(e: Exposition) -> bool:
        return (e.get("fastproxy_upstream_health_checks_total", **up) >= 2
                and e.get("fastproxy_upstream_health_check_failures_total", **down) >= 2
                and e.get("fastproxy_upstream_up", **down) == 0)

    e, _ = wait_scrape(admin, ready, "health checks in /metrics")
    assert e.get("fastproxy_upstream_up", **up) == 1 and e.get("fastproxy_upstream_up_workers", **up) == 1
    assert e.get("fastproxy_upstream_health_check_failures_total", **up) == 0
    assert 0 < e.get("fastproxy_upstream_health_check_duration_seconds", **up) < 2.5


def test_metrics_summed_over_workers(certs, mosquitto, start_proxy):
    admin = U.free_port()
    fp = start_proxy(mosquitto, "--workers", "2", "--admin", f"{HOST}:{admin}")
    wait_scrape(admin, lambda e: e.get("fastproxy_workers") == 2, "both workers answering")
    n = 12
    tls = U.client_context(certs)
    for i in range(n):
        o = U.try_connect(fp.port, U.connect_packet(f"w-{i}", keepalive=30), tls_ctx=tls)
        assert o.code == 0, o
    fp.wait_access(n=n)
    e, body = wait_scrape(admin, lambda e: e.get("fastproxy_sessions_total") == n, f"{n} sessions over 2 workers")
    assert "w-1" not in body
    assert e.get("fastproxy_workers") == 2 and e.get("fastproxy_workers_missing") == 0
    assert e.get("fastproxy_connections_accepted_total") == n
    assert e.get("fastproxy_sessions_total", reason="ok") + e.get("fastproxy_sessions_total", reason="client-reset") \
        + e.get("fastproxy_sessions_total", reason="upstream-reset") == n
    assert e.get("fastproxy_tls_handshakes_total", result="ok") == n
    assert e.get("fastproxy_session_duration_seconds_count") == n
    assert e.get("fastproxy_upstream_sessions_total", pool="listener0") == n
    assert e.get("fastproxy_upstream_up", pool="listener0") == 1
    assert e.get("fastproxy_upstream_up_workers", pool="listener0") == 2
    # the sum is of the workers' own numbers, as /status has them
    _, _, text = get(admin, "/status")
    workers = json.loads(text)["workers"]
    assert len(workers) == 2
    per = [sum(v for _, v in w["metrics"]["counters"]["fastproxy_sessions_total"]) for w in workers]
    assert sum(per) == n, per


def test_label_cardinality_bounded_with_200_clientids(mosquitto, start_proxy, policy_env):
    admin = U.free_port()
    fp = start_proxy(mosquitto, "--policy", "metrics_policy:deny_some", "--admin", f"{HOST}:{admin}",
                     tls=False, env=policy_env)
    n = 200
    for i in range(n):
        o = U.try_connect(fp.port, U.connect_packet(f"dev-{i:04d}", version=5))
        assert o.code == 0x87, (i, o)
    fp.wait_access(n=n, timeout=30)
    e, body = wait_scrape(admin, lambda e: e.get("fastproxy_sessions_total") == n, f"{n} sessions")
    assert "dev-" not in body and "allow list" not in body
    assert e.get("fastproxy_connect_refusals_total", code="0x87", cause="policy-deny") == n
    assert len(e.series("fastproxy_connect_refusals_total")) == 1
    assert e.get("fastproxy_policy_decisions_total", outcome="deny") == n
    assert len(e.series("fastproxy_sessions_total")) == 1
    assert len(e.samples) < 200 and len(body) < 20000, len(body)


# ----------------------------------------------------------------------------- unit


def record(**kw) -> dict:
    r = {"listener": "l0", "addr": "192.0.2.1", "port": 1, "protocol": "TLSv1.3", "reason": "ok", "status": 200,
         "bytes_sent": 4, "bytes_received": 20, "start": 0.0, "duration": 2.0, "detail": None, "cn": "thing001",
         "client_id": "thing001", "upstream": "127.0.0.1:1883", "cipher": "TLS_AES_256_GCM_SHA384",
         "tls_reason": None, "websocket": False, "refuse_code": None}
    r.update(kw)
    return r


def test_label_values_capped_per_label():
    m = M.Metrics()
    for i in range(200):
        m.observe(record(protocol="TLS", reason="tls-handshake-failed", status=400, tls_reason=f"reason {i}"))
    text = M.render([m.snapshot()], [])
    e = parse_exposition(text)
    failed = e.series("fastproxy_tls_handshakes_total")
    assert len(failed) == M.MAX_LABEL_VALUES + 1
    assert e.get("fastproxy_tls_handshakes_total", reason="other") == 200 - M.MAX_LABEL_VALUES
    assert e.get("fastproxy_tls_handshakes_total") == 200
    # an unexpected refusal detail is never a label
    m.observe(record(reason="denied", status=403, refuse_code=0x87, detail="something about thing001"))
    e = parse_exposition(M.render([m.snapshot()], []))
    assert e.get("fastproxy_connect_refusals_total", code="0x87", cause="other") == 1
    assert "thing001" not in M.render([m.snapshot()], [])


def test_escaping_and_odd_values():
    m = M.Metrics()
    m.observe(record(listener='a"b\\c\nd', duration=0.5))
    m.observe(record(listener='a"b\\c\nd', duration=90000.0))
    text = M.render([m.snapshot()], [])
    assert 'listener="a\\"b\\\\c\\nd"' in text
    e = parse_exposition(text)
    assert e.get("fastproxy_sessions_total", listener='a"b\\c\nd') == 2
    assert e.get("fastproxy_session_duration_seconds_bucket", le="1.0") == 1
    assert e.get("fastproxy_session_duration_seconds_bucket", le="86400.0") == 1
    assert e.get("fastproxy_session_duration_seconds_bucket", le="+Inf") == 2


def test_policy_outcomes_and_thread_safety():
    import threading

    m = M.Metrics()

    def work() -> None:
        for _ in range(1000):
            m.observe_policy(0.0007, "allow", listener="l0")
            m.observe_policy(0.003, "deny", listener="l0", code=0x87)
            m.observe_policy(0.003, "identity", listener="l0", code=0x85,
                             rule="ClientId does not match certificate CN")
            m.observe_policy(20.0, "error", listener="l0", code=0x88)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    e = parse_exposition(M.render([m.snapshot()], []))
    assert e.get("fastproxy_policy_decisions_total") == 16000
    assert e.get("fastproxy_policy_duration_seconds_count") == 16000
    assert e.get("fastproxy_policy_duration_seconds_bucket", le="0.001") == 4000
    assert e.get("fastproxy_policy_duration_seconds_bucket", le="10.0") == 12000
    assert e.get("fastproxy_connect_refusals_total", code="0x87", cause="policy-deny") == 4000
    assert e.get("fastproxy_connect_refusals_total", code="0x85", cause="clientid-cn-mismatch") == 4000
    assert e.get("fastproxy_connect_refusals_total", code="0x88", cause="policy-error") == 4000


def test_render_sums_workers_and_combines_gauges():
    a, b = M.Metrics(), M.Metrics()
    a.observe(record())
    b.observe(record())
    b.observe(record(reason="reconnect-too-fast", status=429))

    def st(metrics, up, sessions, last_ms):
        return {"pid": 1, "counters": {"accepted": 2, "active": 1, "notice_fd_exhausted": 1, "refused: x y": 9},
                "servers": [{"pool": "l0", "server": "127.0.0.1:1883", "up": up, "sessions": sessions, "total": 5,
                             "fails": 1, "check": {"checks": 3, "failed_checks": 1, "last_duration_ms": last_ms}}],
                "listeners": [], "metrics": metrics.snapshot()}

    merged = merge_worker_status([(1, st(a, True, 2, 1.5)), (2, None), (3, st(b, False, 1, 4.0))])
    text = metrics_text(json.loads(json.dumps(merged)))       # as it crosses the worker link
    e = parse_exposition(text)
    assert "x y" not in text and "refused:" not in text
    assert e.get("fastproxy_workers") == 2 and e.get("fastproxy_workers_missing") == 1
    assert e.get("fastproxy_connections_accepted_total") == 4 and e.get("fastproxy_connections_active") == 2
    assert e.get("fastproxy_notices_total", kind="fd-exhausted") == 2
    assert e.get("fastproxy_sessions_total") == 3
    assert e.get("fastproxy_session_duration_seconds_count") == 2
    assert e.get("fastproxy_connect_refusals_total", code="0x89", cause="reconnect-too-fast") == 1
    lab = {"pool": "l0", "server": "127.0.0.1:1883"}
    assert e.get("fastproxy_upstream_up", **lab) == 0 and e.get("fastproxy_upstream_up_workers", **lab) == 1
    assert e.get("fastproxy_upstream_sessions", **lab) == 3
    assert e.get("fastproxy_upstream_sessions_total", **lab) == 10
    assert e.get("fastproxy_upstream_health_checks_total", **lab) == 6
    assert e.get("fastproxy_upstream_health_check_duration_seconds", **lab) == 0.004
    # a single process's status renders the same way
    single = parse_exposition(metrics_text(st(a, True, 2, 1.5)))
    assert single.get("fastproxy_workers") == 1 and single.get("fastproxy_sessions_total") == 1
