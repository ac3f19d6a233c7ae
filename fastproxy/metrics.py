"""Prometheus metrics for `GET /metrics` on the admin endpoint (docs/metrics.md is the contract).

Two sources, rendered together by `render()`:

- `Metrics`, one per process (`Proxy.metrics`): counters and histograms kept from each finished
  connection's record (`observe()`, on the records thread, never on the loop) and from each
  policy-gate decision (`observe_policy()`, on the policy threads). `snapshot()` is plain JSON
  made only of sums (counters, per-bucket counts, sums of observations), so the master adds up
  its workers' snapshots without knowing what they mean.
- each process's `Proxy.status()`: the engine's live counters (`status["counters"]`) and the
  upstream servers with their health checks (`status["servers"]`).

Label values come from bounded sets: listener and pool names, server addresses from the
configuration, end reasons, TLS versions, cipher names, OpenSSL reason strings, MQTT reason
codes and fixed cause names. Never a ClientId, a client address, a certificate field or the
free text of a policy `Deny`. As a guard against a set that is larger than expected, every
label of every family keeps at most MAX_LABEL_VALUES distinct values per process; later new
values are counted under "other".
"""
from __future__ import annotations

import math
import threading
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .record import Record

__all__ = ["Metrics", "render", "FAMILIES", "SESSION_DURATION_BUCKETS", "POLICY_DURATION_BUCKETS",
           "MAX_LABEL_VALUES", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SNAPSHOT_VERSION = 1
MAX_LABEL_VALUES = 64   # distinct values per label per family per process; more become OTHER
OTHER = "other"

# Upper bounds (seconds). MQTT sessions live from a second (a publish-and-go device) to days
# (a device that stays connected); policy hooks from microseconds (a dict lookup) to the policy
# timeout (a remote call).
SESSION_DURATION_BUCKETS: tuple[float, ...] = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600, 43200, 86400)
POLICY_DURATION_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                              1, 2.5, 5, 10)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str                       # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


def _families(*fs: Family) -> dict[str, Family]:
    return {f.name: f for f in fs}


# Every family /metrics exposes, in output order. Names, kinds and labels are a stable contract.
FAMILIES: dict[str, Family] = _families(
    # --- from the engine's live counters (status["counters"])
    Family("fastproxy_connections_accepted_total", "counter", "Client connections accepted."),
    Family("fastproxy_connections_active", "gauge", "Client connections open now."),
    Family("fastproxy_connections_closed_total", "counter", "Client connections closed."),
    Family("fastproxy_accept_errors_total", "counter", "accept() calls that failed."),
    Family("fastproxy_received_bytes_total", "counter",
           "Application bytes received from clients, live (all listeners)."),
    Family("fastproxy_sent_bytes_total", "counter", "Application bytes sent to clients, live (all listeners)."),
    Family("fastproxy_policy_pending", "gauge", "CONNECTs waiting for a policy decision now."),
    Family("fastproxy_notices_total", "counter",
           "Conditions the engine reports as rate-limited warnings (fd exhaustion, connection cap, "
           "admission refusals), by kind.", ("kind",)),
    Family("fastproxy_callback_errors_total", "counter",
           "Exceptions raised by Python callbacks (policy hooks, record handlers, on_record)."),
    Family("fastproxy_records_dropped_total", "counter",
           "Connection records dropped because the record queue was full (not in the record-based metrics)."),
    # --- from the connection records (Metrics.observe)
    Family("fastproxy_sessions_total", "counter",
           "Finished client connections by listener, end reason and access-log status.",
           ("listener", "reason", "status")),
    Family("fastproxy_session_received_bytes_total", "counter",
           "Application bytes received from clients, counted when their connection ends.", ("listener",)),
    Family("fastproxy_session_sent_bytes_total", "counter",
           "Application bytes sent to clients, counted when their connection ends.", ("listener",)),
    Family("fastproxy_session_duration_seconds", "histogram",
           "Duration of established sessions (access-log status 200), from accept to close.",
           ("listener",), SESSION_DURATION_BUCKETS),
    Family("fastproxy_tls_handshakes_total", "counter",
           "TLS handshakes of finished connections by result (ok, failed, timeout) and, for failed "
           "ones, OpenSSL's reason.", ("listener", "result", "reason")),
    Family("fastproxy_tls_sessions_total", "counter",
           "Finished connections with a completed TLS handshake, by protocol version and cipher suite.",
           ("listener", "version", "cipher")),
    Family("fastproxy_connect_refusals_total", "counter",
           "CONNECTs refused with a CONNACK, by MQTT 5 reason code and cause.", ("listener", "code", "cause")),
    # --- from the policy gate (Metrics.observe_policy)
    Family("fastproxy_policy_decisions_total", "counter",
           "Policy gate decisions by outcome (allow, route, deny, identity, error).", ("listener", "outcome")),
    Family("fastproxy_policy_duration_seconds", "histogram",
           "Time the policy gate took to decide one CONNECT (built-in identity rules and the hook).",
           ("listener",), POLICY_DURATION_BUCKETS),
    # --- per upstream server (status["servers"])
    Family("fastproxy_upstream_up", "gauge",
           "1 if the server is up (in every process that reports it), else 0.", ("pool", "server")),
    Family("fastproxy_upstream_up_workers", "gauge", "Processes that see the server up.", ("pool", "server")),
    Family("fastproxy_upstream_sessions", "gauge", "Sessions open to the server now.", ("pool", "server")),
    Family("fastproxy_upstream_sessions_total", "counter", "Sessions sent to the server.", ("pool", "server")),
    Family("fastproxy_upstream_connect_failures_total", "counter",
           "Failed connection attempts to the server.", ("pool", "server")),
    Family("fastproxy_upstream_health_checks_total", "counter", "Health checks of the server.", ("pool", "server")),
    Family("fastproxy_upstream_health_check_failures_total", "counter",
           "Health checks of the server that failed.", ("pool", "server")),
    Family("fastproxy_upstream_health_check_duration_seconds", "gauge",
           "Duration of the last health check of the server (the longest over processes).", ("pool", "server")),
    # --- the scrape itself
    Family("fastproxy_workers", "gauge", "Processes whose numbers are in this scrape."),
    Family("fastproxy_workers_missing", "gauge", "Worker processes that did not answer for this scrape."),
)

_RECORD_COUNTERS = ("fastproxy_sessions_total", "fastproxy_session_received_bytes_total",
                    "fastproxy_session_sent_bytes_total", "fastproxy_tls_handshakes_total",
                    "fastproxy_tls_sessions_total", "fastproxy_connect_refusals_total",
                    "fastproxy_policy_decisions_total")
_HISTOGRAMS = ("fastproxy_session_duration_seconds", "fastproxy_policy_duration_seconds")

# status["counters"] key -> family, for the unlabelled engine counters.
_ENGINE_COUNTERS = {
    "accepted": "fastproxy_connections_accepted_total",
    "active": "fastproxy_connections_active",
    "closed": "fastproxy_connections_closed_total",
    "accept_errors": "fastproxy_accept_errors_total",
    "bytes_from_clients": "fastproxy_received_bytes_total",
    "bytes_to_clients": "fastproxy_sent_bytes_total",
    "policy_pending": "fastproxy_policy_pending",
    "callback_errors": "fastproxy_callback_errors_total",
    "records_dropped": "fastproxy_records_dropped_total",
}

# The fixed texts refusals carry (the engine's static details and the gate's built-in rules),
# as cause names. Anything else (never expected) is "other": a detail is never a label.
_CAUSES = {
    "ClientId does not match certificate CN": "clientid-cn-mismatch",
    "username does not match certificate CN": "username-cn-mismatch",
    "no verified client certificate": "no-verified-certificate",
    "client certificate has more than one CN": "multiple-cn",
    "client certificate CN contains control characters": "cn-control-characters",
    "ClientId does not match the certificate template": "clientid-template-mismatch",
    "policy gate unavailable": "policy-unavailable",
    "policy chose an unknown upstream": "policy-error",
    "cannot rewrite the ClientId": "clientid-rewrite-failed",
    "cannot rewrite the ClientId inside passthrough WebSocket frames": "clientid-rewrite-failed",
}
# Refusals whose end reason says it all: (MQTT 5 reason code, cause).
_REASON_REFUSALS = {
    "reconnect-too-fast": (0x89, "reconnect-too-fast"),
    "policy-timeout": (0x88, "policy-timeout"),
}
_POLICY_OUTCOMES = ("allow", "route", "deny", "identity", "error")
_SILENT_CLOSE = "closed before the TLS handshake"   # the engine's detail for a socket that sent nothing


def _code(rc: int) -> str:
    return f"0x{rc:02x}"


class _Hist:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * (n + 1)     # per bucket (not cumulative); the last one is +Inf
        self.sum = 0.0


class Metrics:
    """What one process observed. observe() and observe_policy() may run on different threads
    at once; snapshot() is JSON (for the admin endpoint and the master) and additive."""

    def __init__(self, max_label_values: int = MAX_LABEL_VALUES) -> None:
        self._lock = threading.Lock()
        self._max = max_label_values
        self._counters: dict[str, dict[tuple[str, ...], int | float]] = {n: {} for n in _RECORD_COUNTERS}
        self._hists: dict[str, dict[tuple[str, ...], _Hist]] = {n: {} for n in _HISTOGRAMS}
        self._seen: dict[tuple[str, int], set[str]] = {}

    # -- under self._lock
    def _labels(self, family: str, values: Sequence[Any]) -> tuple[str, ...]:
        out = []
        for i, v in enumerate(values):
            s = str(v)
            seen = self._seen.setdefault((family, i), set())
            if s not in seen:
                if len(seen) >= self._max:
                    s = OTHER
                else:
                    seen.add(s)
            out.append(s)
        return tuple(out)

    def _inc(self, family: str, labels: Sequence[Any], n: int | float = 1) -> None:
        key = self._labels(family, labels)
        c = self._counters[family]
        c[key] = c.get(key, 0) + n

    def _observe(self, family: str, labels: Sequence[Any], value: float) -> None:
        key = self._labels(family, labels)
        buckets = FAMILIES[family].buckets
        h = self._hists[family].get(key)
        if h is None:
            h = self._hists[family][key] = _Hist(len(buckets))
        h.counts[bisect_left(buckets, value)] += 1     # le: value <= bound
        h.sum += value

    # -- the records thread
    def observe(self, r: Record) -> None:
        """Count one finished connection (its record, as on_record gets it)."""
        li, reason, status = r["listener"], r["reason"], r["status"]
        protocol = r.get("protocol") or ""
        with self._lock:
            self._inc("fastproxy_sessions_total", (li, reason, status))
            self._inc("fastproxy_session_received_bytes_total", (li,), r["bytes_received"])
            self._inc("fastproxy_session_sent_bytes_total", (li,), r["bytes_sent"])
            if status == 200:
                self._observe("fastproxy_session_duration_seconds", (li,), max(0.0, float(r["duration"])))
            if protocol.startswith("TLSv"):
                self._inc("fastproxy_tls_handshakes_total", (li, "ok", "none"))
                self._inc("fastproxy_tls_sessions_total", (li, protocol, r.get("cipher") or "unknown"))
            elif reason == "tls-handshake-failed":
                why = r.get("tls_reason")
                if not why:
                    detail = r.get("detail")
                    why = "closed-before-handshake" if detail == _SILENT_CLOSE else (
                        "socket-error" if detail else "unknown")
                self._inc("fastproxy_tls_handshakes_total", (li, "failed", why))
            elif reason == "tls-handshake-timeout":
                self._inc("fastproxy_tls_handshakes_total", (li, "timeout", "none"))
            refusal = self._refusal(r)
            if refusal is not None:
                self._inc("fastproxy_connect_refusals_total", (li, _code(refusal[0]), refusal[1]))

    @staticmethod
    def _refusal(r: Record) -> tuple[int, str] | None:
        """(code, cause) of a refusal the engine decided; None for anything else, and for a
        refusal by the policy gate (counted by observe_policy, which knows its reason code)."""
        code = r.get("refuse_code")
        if code:
            return code, _CAUSES.get(r.get("detail") or "", OTHER)
        if r["reason"] in _REASON_REFUSALS:
            return _REASON_REFUSALS[r["reason"]]
        if r["reason"] == "denied" and r.get("detail"):
            # the engine could not apply the gate's answer (no gate thread, rewrite failed, ...)
            return 0x88, _CAUSES.get(r["detail"] or "", OTHER)
        return None

    # -- the policy threads (or the asyncio loop)
    def observe_policy(self, seconds: float, outcome: str, *, listener: str = "", code: int = 0,
                       rule: str | None = None) -> None:
        """Count one decision of a listener's policy gate, which took `seconds`.

        outcome: "allow", "route" (allowed to a named upstream), "deny" (the hook's Deny),
        "identity" (a built-in identity rule refused; `rule` is its fixed text) or "error" (the
        hook raised or answered nonsense). code: the MQTT 5 reason code of a refusal. The hook's
        own reason text is never passed here."""
        if outcome not in _POLICY_OUTCOMES:
            outcome = OTHER
        with self._lock:
            self._inc("fastproxy_policy_decisions_total", (listener, outcome))
            self._observe("fastproxy_policy_duration_seconds", (listener,), max(0.0, float(seconds)))
            if outcome in ("deny", "identity", "error"):
                cause = {"deny": "policy-deny", "error": "policy-error"}.get(outcome) or _CAUSES.get(rule or "", OTHER)
                self._inc("fastproxy_connect_refusals_total", (listener, _code(code or 0x88), cause))

    def snapshot(self) -> dict[str, Any]:
        """{"version", "counters": {family: [[labels, value], ...]}, "histograms": {family:
        [[labels, per-bucket counts (last: +Inf), sum], ...]}}: sums only, so snapshots of
        several processes add up (render does it)."""
        with self._lock:
            return {
                "version": SNAPSHOT_VERSION,
                "counters": {n: [[list(k), v] for k, v in c.items()] for n, c in self._counters.items()},
                "histograms": {n: [[list(k), list(h.counts), h.sum] for k, h in hs.items()]
                               for n, hs in self._hists.items()},
            }


# ----------------------------------------------------------------------------- rendering


def escape_label_value(v: str) -> str:
    """A label value as the text format 0.0.4 wants it inside double quotes."""
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _le(bound: float) -> str:
    return repr(float(bound))


def _labeltext(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values)) + "}"


def _num(v: Any) -> int | float | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    return None


class _Acc:
    """Samples of every family, summed (or combined) over processes."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], int | float]] = {n: {} for n in FAMILIES}
        self.hists: dict[str, dict[tuple[str, ...], tuple[list[int], float]]] = {n: {} for n in _HISTOGRAMS}

    def add(self, family: str, labels: Iterable[Any], v: int | float, how: str = "sum") -> None:
        key = tuple(str(x) for x in labels)
        d = self.values[family]
        if key not in d:
            d[key] = v
        elif how == "sum":
            d[key] += v
        elif how == "max":
            d[key] = max(d[key], v)
        elif how == "min":
            d[key] = min(d[key], v)

    def add_snapshot(self, snap: Mapping[str, Any]) -> None:
        if not isinstance(snap, Mapping) or snap.get("version") != SNAPSHOT_VERSION:
            return
        for name, samples in (snap.get("counters") or {}).items():
            f = FAMILIES.get(name)
            if f is None or f.kind != "counter":
                continue
            for labels, v in samples:
                if len(labels) == len(f.labels) and _num(v) is not None:
                    self.add(name, labels, v)
        for name, samples in (snap.get("histograms") or {}).items():
            f = FAMILIES.get(name)
            if f is None or f.kind != "histogram":
                continue
            for labels, counts, total in samples:
                if len(labels) != len(f.labels) or len(counts) != len(f.buckets) + 1:
                    continue   # another bucket layout (a worker of another version): not addable
                key = tuple(str(x) for x in labels)
                have = self.hists[name].get(key)
                if have is None:
                    self.hists[name][key] = (list(counts), float(total))
                else:
                    self.hists[name][key] = ([a + b for a, b in zip(have[0], counts)], have[1] + float(total))

    def add_status(self, st: Mapping[str, Any]) -> None:
        counters = st.get("counters")
        if isinstance(counters, Mapping):
            for key, family in _ENGINE_COUNTERS.items():
                v = _num(counters.get(key))
                if v is not None:
                    self.add(family, (), v)
            for key, v in counters.items():
                if isinstance(key, str) and key.startswith("notice_") and _num(v) is not None:
                    self.add("fastproxy_notices_total", (key[7:].replace("_", "-"),), _num(v))  # type: ignore[arg-type]
        servers = st.get("servers")
        for s in servers if isinstance(servers, list) else ():
            if not isinstance(s, Mapping):
                continue
            lab = (s.get("pool") or "", s.get("server") or "")
            up = 1 if s.get("up") else 0
            self.add("fastproxy_upstream_up", lab, up, "min")
            self.add("fastproxy_upstream_up_workers", lab, up)
            for key, family in (("sessions", "fastproxy_upstream_sessions"),
                                ("total", "fastproxy_upstream_sessions_total"),
                                ("fails", "fastproxy_upstream_connect_failures_total")):
                v = _num(s.get(key))
                if v is not None:
                    self.add(family, lab, v)
            check = s.get("check")
            if isinstance(check, Mapping):
                for key, family in (("checks", "fastproxy_upstream_health_checks_total"),
                                    ("failed_checks", "fastproxy_upstream_health_check_failures_total")):
                    v = _num(check.get(key))
                    if v is not None:
                        self.add(family, lab, v)
                ms = _num(check.get("last_duration_ms"))
                if ms is not None:
                    self.add("fastproxy_upstream_health_check_duration_seconds", lab, ms / 1000.0, "max")


def render(snapshots: Sequence[Mapping[str, Any] | None], statuses: Sequence[Mapping[str, Any]], *,
           missing_workers: int = 0) -> str:
    """The Prometheus text format (0.0.4) for the processes whose Metrics.snapshot() and
    Proxy.status() are given (one of each per process; a single process gives one of each).

    Counters and histograms are summed over processes, and so are the gauges of things that
    add up (open connections, open sessions per server, policy CONNECTs waiting).
    fastproxy_upstream_up is the least over processes (1 only if every process sees the
    server up, as "up" in /status), fastproxy_upstream_up_workers the number that do, and
    fastproxy_upstream_health_check_duration_seconds the longest last check."""
    acc = _Acc()
    for snap in snapshots:
        if snap:
            acc.add_snapshot(snap)
    for st in statuses:
        if isinstance(st, Mapping):
            acc.add_status(st)
    acc.add("fastproxy_workers", (), len(statuses))
    acc.add("fastproxy_workers_missing", (), missing_workers)

    out: list[str] = []
    for f in FAMILIES.values():
        out.append(f"# HELP {f.name} {_escape_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.kind}")
        if f.kind == "histogram":
            for key in sorted(acc.hists[f.name]):
                counts, total = acc.hists[f.name][key]
                cum = 0
                for bound, n in zip((*f.buckets, math.inf), counts):
                    cum += n
                    le = "+Inf" if math.isinf(bound) else _le(bound)
                    out.append(f"{f.name}_bucket{_labeltext((*f.labels, 'le'), (*key, le))} {cum}")
                out.append(f"{f.name}_sum{_labeltext(f.labels, key)} {_number(total)}")
                out.append(f"{f.name}_count{_labeltext(f.labels, key)} {cum}")
        else:
            for key in sorted(acc.values[f.name]):
                out.append(f"{f.name}{_labeltext(f.labels, key)} {_number(acc.values[f.name][key])}")
    return "\n".join(out) + "\n"
