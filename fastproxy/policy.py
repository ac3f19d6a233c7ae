"""Who may connect: the CONNECT checks and the user's policy hook, once per connection.

The engine reads and validates the CONNECT in C, then (when a listener has a check or a hook)
calls the listener's `ConnectGate` with the raw packet, the client certificate and the client
address. The gate runs the built-in identity checks, then the user's hook, and answers with a
decision the engine applies: forward to an upstream (possibly with a rewritten ClientId), or
refuse with a CONNACK reason code. Nothing reaches the broker before this answer.

A policy hook is any callable::

    def policy(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
        return Allow() | Deny(ReasonCode.NOT_AUTHORIZED, "why") | Route("eu-brokers") | None

`None` means allow. Reason codes are MQTT 5.0 codes; a 3.1/3.1.1 client gets the CONNACK return
code with the same meaning (0x85 -> 0x02 identifier rejected, 0x87 -> 0x05 not authorized, ...).
"""
from __future__ import annotations

import importlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Optional, Union

from .config import ListenerConfig
from .errors import ConfigError
from .mqtt import ConnectInfo, ReasonCode, parse_connect
from .templates import TEMPLATE_FIELDS, template_fields  # noqa: F401 - TEMPLATE_FIELDS re-exported

from .log import policy_log as log

# MQTT 3.x return codes -> the MQTT 5.0 reason code of the same meaning.
_V3_TO_V5 = {0x01: 0x84, 0x02: 0x85, 0x03: 0x88, 0x04: 0x86, 0x05: 0x87}


@dataclass(frozen=True)
class PeerCertificate:
    """The client certificate, as policy sees it. `verified` is False for a certificate that
    failed verification under `verify optional`: it is then no proof of identity."""

    verified: bool
    subject: str
    issuer: str
    cn: str | None              # None without a CN, or with several (ambiguous: no identity)
    san_dns: tuple[str, ...] = ()
    san_email: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    san_ip: tuple[str, ...] = ()
    serial: str | None = None
    fingerprint_sha256: str | None = None
    not_before: int | None = None
    not_after: int | None = None
    der: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Allow:
    """Let the client through, to `upstream` (a name from [upstreams]) or the listener's;
    `client_id` replaces the CONNECT's ClientId on the way."""

    upstream: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class Deny:
    reason_code: int = ReasonCode.NOT_AUTHORIZED
    reason: str = "denied by policy"


def Route(upstream: str) -> Allow:
    """Allow, to the named upstream."""
    return Allow(upstream=upstream)


Decision = Union[Allow, Deny, None]
PolicyHook = Callable[[ConnectInfo, Optional[PeerCertificate], "tuple[str, int]"], Union[Decision, Awaitable[Decision]]]


def load_hook(spec: str, *, source: str, key: str) -> PolicyHook:
    """'package.module:function' -> the callable. Raises ConfigError naming the key."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"expected module:function, got {spec!r}", source=source, key=key)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or the module failing at import
        raise ConfigError(f"cannot import {mod_name!r}: {e}", source=source, key=key) from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"{mod_name!r} has no callable {attr!r}", source=source, key=key)
    return fn


def certificate(der: bytes | None, verified: bool) -> PeerCertificate | None:
    if not der:
        return None
    from ._tls import certificate_info

    i = certificate_info(der)
    return PeerCertificate(
        verified=verified,
        subject=i["subject"],
        issuer=i["issuer"],
        cn=i["cn"],
        san_dns=tuple(i["san_dns"]),
        san_email=tuple(i["san_email"]),
        san_uri=tuple(i["san_uri"]),
        san_ip=tuple(i["san_ip"]),
        serial=i["serial"],
        fingerprint_sha256=i["fingerprint_sha256"],
        not_before=i["not_before"],
        not_after=i["not_after"],
        der=der,
    )


def _expand(template: str, cert: PeerCertificate) -> set[str]:
    """Every ClientId the template allows for this certificate (one per SAN value)."""
    multi = {"san_dns": cert.san_dns, "san_email": cert.san_email, "san_uri": cert.san_uri}
    single: dict[str, str | None] = {"cn": cert.cn, "serial": cert.serial, "fingerprint": cert.fingerprint_sha256}
    used = template_fields(template)
    choices: list[dict[str, str]] = [{}]
    for f in used:
        one = single.get(f)
        values: list[str] = list(multi[f]) if f in multi else ([one] if one else [])
        choices = [{**c, f: v} for c in choices for v in values]
    return {template.format(**c) for c in choices}


class ConnectGate:
    """One listener's decision function. Called off the loop thread (fastproxy.boundary) with
    (listener, addr, port, connect_bytes, cert_der, cert_verified) and answering
    (action, reason_code_v5, upstream_index | None, new_client_id_bytes | None).
    A plain hook is called by `gate(request)` on a policy thread; an `async def` hook
    (`is_async`) by `await gate.decide_async(request)` on an asyncio loop."""

    def __init__(
        self,
        lc: ListenerConfig,
        *,
        hook: PolicyHook | None,
        upstreams: Mapping[str, int],
        counters: Counter,
        cn_checks_done: bool = False,
        metrics: Any = None,
    ) -> None:
        self.lc = lc
        self.hook = hook
        self.upstreams = upstreams
        self.counters = counters
        self.cn_checks_done = cn_checks_done  # the engine already applied require_*_cn
        self.errors = 0                       # hooks that raised (or answered nonsense)
        self.metrics = metrics                # fastproxy.metrics.Metrics: observe_policy() per decision
        self.is_async = hook is not None and (_is_coroutine_function(hook)
                                              or _is_coroutine_function(getattr(hook, "__call__", None)))

    def __call__(self, rec: tuple) -> tuple[int, int, int | None, bytes | None]:
        t0 = time.perf_counter()
        ctx = _Ctx(rec)
        try:
            decision = ctx.builtin = self._before_hook(ctx)
            if decision is None and self.hook is not None:
                got = self.hook(ctx.hook_info, ctx.cert, ctx.client)
                if hasattr(got, "__await__"):
                    _close_awaitable(got)
                    raise TypeError("the policy hook returned an awaitable; declare it `async def`")
                decision = got
            ans = self._answer(ctx, decision)
        except Exception:
            ans = self._failed(ctx)
        self._observe(ctx, ans, t0)
        return ans

    async def decide_async(self, rec: tuple) -> tuple[int, int, int | None, bytes | None]:
        t0 = time.perf_counter()
        ctx = _Ctx(rec)
        try:
            decision = ctx.builtin = self._before_hook(ctx)
            if decision is None and self.hook is not None:
                decision = await self.hook(ctx.hook_info, ctx.cert, ctx.client)  # type: ignore[misc]
            ans = self._answer(ctx, decision)
        except Exception:
            ans = self._failed(ctx)
        self._observe(ctx, ans, t0)
        return ans

    def _observe(self, ctx: "_Ctx", ans: tuple[int, int, int | None, bytes | None], t0: float) -> None:
        """Metrics: the decision's latency and outcome category (never the hook's reason text)."""
        if self.metrics is None:
            return
        builtin = ctx.builtin.reason if isinstance(ctx.builtin, Deny) else None
        if ctx.failed:
            outcome = "error"
        elif ans[0]:
            outcome = "identity" if builtin is not None else "deny"
        else:
            outcome = "route" if ans[2] is not None else "allow"
        try:
            self.metrics.observe_policy(time.perf_counter() - t0, outcome, listener=self.lc.name, code=ans[1],
                                        rule=builtin)
        except Exception:
            log.exception("%s: policy metrics failed", self.lc.name)

    def _failed(self, ctx: "_Ctx") -> tuple[int, int, int | None, bytes | None]:
        host, port = ctx.client
        log.exception("%s: policy failed for client %s:%d (ClientId %r); refusing", self.lc.name, host, port,
                      ctx.info.client_id)
        self.counters["policy-error"] += 1
        self.errors += 1
        ctx.failed = True
        return (1, ReasonCode.SERVER_UNAVAILABLE, None, None)

    def _answer(self, ctx: "_Ctx", decision: Decision) -> tuple[int, int, int | None, bytes | None]:
        if decision is not None and not isinstance(decision, (Allow, Deny)):
            raise TypeError(f"policy returned {decision!r}; expected Allow, Deny, Route(...) or None")
        if ctx.rewrite is not None and not isinstance(decision, Deny):
            d = decision if isinstance(decision, Allow) else Allow()
            if d.client_id is None:
                decision = Allow(upstream=d.upstream, client_id=ctx.rewrite)
        _check_decision(decision)
        host, port = ctx.client
        info, cert = ctx.info, ctx.cert
        if isinstance(decision, Deny):
            code = _V3_TO_V5.get(decision.reason_code, decision.reason_code)
            self.counters[decision.reason] += 1
            log.warning(
                "%s: refused client %s:%d ClientId %r CN %r: %s (reason code 0x%02x)",
                self.lc.name, host, port, info.client_id, cert.cn if cert else None, decision.reason, code,
            )
            return (1, code, None, None)
        upstream = None
        new_id = None
        if decision is not None:
            if decision.upstream is not None:
                try:
                    upstream = self.upstreams[decision.upstream]
                except KeyError:
                    log.error("%s: policy routed to unknown upstream %r; refusing", self.lc.name, decision.upstream)
                    self.counters["policy-error"] += 1
                    ctx.failed = True
                    return (1, ReasonCode.SERVER_UNAVAILABLE, None, None)
            if decision.client_id is not None and decision.client_id != info.client_id:
                new_id = decision.client_id.encode("utf-8")
        return (0, 0, upstream, new_id)

    def _before_hook(self, ctx: "_Ctx") -> Decision:
        """The built-in rules; a Deny, or None to ask the hook (ctx.hook_info is what it sees)."""
        lc = self.lc
        info, cert = ctx.info, ctx.cert
        identity = cert.cn if cert is not None and cert.verified else None
        if lc.clientid_from_cn and info.client_id == "" and identity:
            ctx.rewrite = identity  # EMQX's peer_cert_as_clientid
        client_id = ctx.rewrite if ctx.rewrite is not None else info.client_id
        if lc.require_clientid_cn and not self.cn_checks_done:
            if identity is None:
                return Deny(ReasonCode.NOT_AUTHORIZED, "no verified client certificate")
            if client_id != identity:
                return Deny(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "ClientId does not match certificate CN")
        if lc.require_username_cn and not self.cn_checks_done:
            if identity is None:
                return Deny(ReasonCode.NOT_AUTHORIZED, "no verified client certificate")
            if info.username != identity:
                return Deny(ReasonCode.NOT_AUTHORIZED, "username does not match certificate CN")
        if lc.clientid_template:
            if cert is None or not cert.verified:
                return Deny(ReasonCode.NOT_AUTHORIZED, "no verified client certificate")
            if client_id not in _expand(lc.clientid_template, cert):
                return Deny(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "ClientId does not match the certificate template")
        ctx.hook_info = _with_client_id(info, ctx.rewrite) if ctx.rewrite is not None else info
        return None


class _Ctx:
    """One CONNECT on its way through a gate."""

    __slots__ = ("info", "cert", "client", "rewrite", "hook_info", "builtin", "failed")

    def __init__(self, rec: tuple) -> None:
        _, host, port, pkt, der, verified = rec
        info = parse_connect(pkt, max_size=None)
        assert info is not None  # the engine only asks with a whole, valid CONNECT
        self.info: ConnectInfo = info
        self.cert = certificate(der, verified)
        self.client: tuple[str, int] = (host, port)
        self.rewrite: str | None = None
        self.hook_info: ConnectInfo = info
        self.builtin: Decision = None       # the built-in rules' Deny, if they refused
        self.failed = False                 # the hook raised or answered nonsense


_CO_COROUTINE = 0x80     # inspect.CO_COROUTINE, without importing inspect (a few MiB per worker)


def _is_coroutine_function(fn: object) -> bool:
    """An `async def` function or method (what inspect.iscoroutinefunction says, for these)."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


def _close_awaitable(obj: object) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        close()


def _check_decision(decision: object) -> None:
    """Raise TypeError/ValueError for a decision the engine could not apply faithfully."""
    if decision is None:
        return
    if isinstance(decision, Deny):
        rc = decision.reason_code
        if isinstance(rc, bool) or not isinstance(rc, int):
            raise TypeError(f"Deny reason_code must be an int, got {rc!r}")
        if not (rc in _V3_TO_V5 or 0x80 <= rc <= 0xFF):
            raise ValueError(f"Deny reason_code 0x{rc:02x} is not a refusal (MQTT 5: 0x80-0xFF, or 3.x: 1-5)")
        if not isinstance(decision.reason, str):
            raise TypeError(f"Deny reason must be a str, got {decision.reason!r}")
        return
    if isinstance(decision, Allow):
        if decision.upstream is not None and not isinstance(decision.upstream, str):
            raise TypeError(f"Allow upstream must be a name (str), got {decision.upstream!r}")
        cid = decision.client_id
        if cid is not None:
            if not isinstance(cid, str):
                raise TypeError(f"Allow client_id must be a str, got {cid!r}")
            if "\x00" in cid:
                raise ValueError("Allow client_id contains U+0000, which MQTT forbids")
            if len(cid.encode("utf-8")) > 65535:  # UnicodeEncodeError (a ValueError) for surrogates
                raise ValueError("Allow client_id is longer than 65535 bytes")
        return
    raise TypeError(f"policy returned {decision!r}; expected Allow, Deny, Route(...) or None")


def _with_client_id(info: ConnectInfo, client_id: str) -> ConnectInfo:
    from dataclasses import replace

    return replace(info, client_id=client_id)


def engine_identity_checks(lc: ListenerConfig) -> tuple[bool, bool]:
    """Which of require_clientid_cn / require_username_cn the engine checks itself (in C, no
    Python call per connection). With clientid_from_cn the ClientId is only known after the
    rewrite, so Python keeps them."""
    if lc.clientid_from_cn:
        return (False, False)
    return (lc.require_clientid_cn, lc.require_username_cn)


def needs_gate(lc: ListenerConfig, hook: PolicyHook | None) -> bool:
    """Whether a connection on this listener must be decided in Python."""
    in_c = any(engine_identity_checks(lc))
    return bool(
        hook is not None
        or lc.policy
        or lc.clientid_template
        or lc.clientid_from_cn
        or ((lc.require_clientid_cn or lc.require_username_cn) and not in_c)
    )
