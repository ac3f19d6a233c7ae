"""The boundary between user Python and the engine: policy hooks run on their own threads (or
an asyncio loop) while the loop keeps relaying; a slow, raising or async hook and a raising
on_record cost their own connection at most. Real Mosquitto, real sockets, loopback only.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import proxyutil as U
import fastproxy
from fastproxy.policy import Allow, Deny

pytest.importorskip("fastproxy._engine", reason="compiled engine not built")


def _cfg(upstream: str, **kw) -> fastproxy.Config:
    return fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": upstream, "access_log": "off", **kw})


def _port(proxy: fastproxy.Proxy) -> int:
    (_, port), = proxy.addresses[0]
    return port


def _session(port: int, name: str):
    """A subscriber and a publisher through the proxy on topic rt/<name>."""
    sub = U.open_socket(port)
    pub = U.open_socket(port)
    assert U.mqtt_handshake(sub, f"{name}-sub") == 0
    sub.sendall(U.subscribe_packet(1, f"rt/{name}"))
    assert U.read_packet(sub)[0] == 9
    assert U.mqtt_handshake(pub, f"{name}-pub") == 0
    return sub, pub


def _round_trip(sub, pub, topic: str, i: int) -> float:
    t0 = time.monotonic()
    pub.sendall(U.publish_packet(topic, b"ping%d" % i))
    ptype, _, body = U.read_packet(sub)
    assert ptype == 3 and body.endswith(b"ping%d" % i)
    return time.monotonic() - t0


def test_slow_hook_does_not_freeze_established_sessions(mosquitto):
    """A hook that sleeps 2 s for one client: an unrelated established session keeps relaying
    meanwhile (bound generous: it asserts the session is not frozen, not a speed)."""
    entered = threading.Event()

    def hook(info, cert, client):
        if info.client_id == "slow":
            entered.set()
            time.sleep(2.0)
        return None

    proxy = fastproxy.Proxy(_cfg(mosquitto.upstream), policy=hook).start()
    port = _port(proxy)
    sub, pub = _session(port, "fast")
    slow = U.open_socket(port, timeout=10)
    try:
        answer: list[int] = []
        t = threading.Thread(target=lambda: answer.append(U.mqtt_handshake(slow, "slow")))
        t.start()
        assert entered.wait(5), "the hook was not called"
        worst = max(_round_trip(sub, pub, "rt/fast", i) for i in range(10))
        assert entered.is_set() and t.is_alive(), "the slow hook should still be running"
        assert worst < 1.0, f"an established session waited {worst:.2f}s behind a sleeping hook"
        t.join(10)
        assert answer == [0], "the slow client is let in once its hook answers"
    finally:
        for s in (sub, pub, slow):
            s.close()
        proxy.stop()


@pytest.mark.parametrize("version,deny_code", [(5, 0x87), (4, 0x05)], ids=["mqtt5", "mqtt311"])
def test_async_hook_allows_and_denies(mosquitto, version, deny_code):
    seen_threads: list[str] = []

    async def hook(info, cert, client):
        seen_threads.append(threading.current_thread().name)
        await asyncio.sleep(0.05)
        if info.client_id.startswith("bad"):
            return Deny(0x87, "async says no")
        return Allow()

    proxy = fastproxy.Proxy(_cfg(mosquitto.upstream), policy=hook).start()
    port = _port(proxy)
    try:
        good = U.open_socket(port)
        bad = U.open_socket(port)
        assert U.mqtt_handshake(good, "good1", version=version) == 0
        assert U.mqtt_handshake(bad, "bad1", version=version) == deny_code
        closed, _, _ = U.wait_closed(bad, 5)
        assert closed
        good.close()
        bad.close()
        assert seen_threads and all(n == "fastproxy-asyncio" for n in seen_threads), seen_threads
        assert proxy.refusals["async says no"] == 1
    finally:
        proxy.stop()


def test_async_hook_on_the_embedding_applications_loop(mosquitto):
    loop = asyncio.new_event_loop()
    lt = threading.Thread(target=loop.run_forever, name="app-loop", daemon=True)
    lt.start()
    seen: list[object] = []

    async def hook(info, cert, client):
        seen.append(asyncio.get_running_loop())
        return None

    proxy = fastproxy.Proxy(_cfg(mosquitto.upstream), policy=hook, loop=loop).start()
    try:
        s = U.open_socket(_port(proxy))
        assert U.mqtt_handshake(s, "app-loop-client") == 0
        s.close()
        assert seen == [loop]
    finally:
        proxy.stop()
        loop.call_soon_threadsafe(loop.stop)
        lt.join(5)


def test_raising_hook_refuses_only_its_client(mosquitto, caplog):
    def hook(info, cert, client):
        if info.client_id == "boom":
            raise RuntimeError("hook exploded")
        return None

    proxy = fastproxy.Proxy(_cfg(mosquitto.upstream), policy=hook).start()
    port = _port(proxy)
    try:
        with caplog.at_level(logging.ERROR, logger="fastproxy.policy"):
            s = U.open_socket(port)
            assert U.mqtt_handshake(s, "boom", version=5) == 0x88
            s.close()
            s = U.open_socket(port)
            assert U.mqtt_handshake(s, "boom") == 0x03          # 3.1.1: Server unavailable
            s.close()
        assert any("hook exploded" in (r.exc_text or "") or (r.exc_info and "hook exploded" in str(r.exc_info[1]))
                   for r in caplog.records), "the hook's traceback is logged"
        ok = U.open_socket(port)
        assert U.mqtt_handshake(ok, "fine") == 0
        ok.close()
        assert proxy.refusals["policy-error"] == 2
        assert proxy.stats()["callback_errors"] == 2
    finally:
        proxy.stop()


def test_raising_on_record_is_logged_and_counted_and_the_engine_goes_on(mosquitto, caplog):
    calls = []

    def boom(rec):
        calls.append(rec["client_id"])
        raise RuntimeError("record hook failed")

    proxy = fastproxy.Proxy(_cfg(mosquitto.upstream), on_record=boom).start()
    port = _port(proxy)
    try:
        with caplog.at_level(logging.ERROR, logger="fastproxy.server"):
            for i in range(3):
                s = U.open_socket(port)
                assert U.mqtt_handshake(s, f"rec{i}") == 0, "the next client is served"
                s.close()
                U.wait_until(lambda: len(calls) == i + 1, 10, what=f"record {i}")
            U.wait_until(lambda: proxy.stats()["callback_errors"] == 3, 10, what="three counted errors")
        assert proxy.state == "running" if hasattr(proxy, "state") else True
        assert sum("record hook failed" in (r.exc_text or "") for r in caplog.records) == 3
    finally:
        proxy.stop()       # does not re-raise: the failures were the callback's, not the engine's


@pytest.mark.parametrize("version,code", [(5, 0x88), (4, 0x03)], ids=["mqtt5", "mqtt311"])
def test_policy_timeout_answers_server_unavailable(mosquitto, version, code):
    release = threading.Event()
    records: list[dict] = []

    def hook(info, cert, client):
        if info.client_id == "stuck":
            release.wait(10)
        return None

    proxy = fastproxy.Proxy(_cfg(mosquitto.upstream, policy_timeout="500ms", policy_threads=2),
                            policy=hook, on_record=records.append).start()
    port = _port(proxy)
    try:
        s = U.open_socket(port, timeout=10)
        assert U.mqtt_handshake(s, "stuck", version=version) == code
        closed, _, _ = U.wait_closed(s, 5)
        assert closed
        s.close()
        # The stuck thread still holds one of the two policy threads; the other serves.
        ok = U.open_socket(port)
        assert U.mqtt_handshake(ok, "quick", version=version) == 0
        ok.close()
        U.wait_until(lambda: any(r["client_id"] == "stuck" for r in records), 10, what="the stuck record")
        rec = next(r for r in records if r["client_id"] == "stuck")
        assert rec["reason"] == "policy-timeout" and rec["status"] == 504
        assert proxy.stats()["closed_policy_timeout"] == 1
        # Nothing of the refused client reached the broker.
        assert "stuck" not in U.broker_client_ids(mosquitto.log())
    finally:
        release.set()
        proxy.stop()
    # The late answer for the refused client was dropped, not applied.
    assert proxy.stats()["active"] == 0


def test_client_gone_while_its_hook_runs(mosquitto):
    """The connection ends while its CONNECT is being decided: the answer that comes later
    is dropped (no use of freed memory: this runs under the ASan build too)."""
    gate = threading.Event()
    answered = threading.Event()

    def hook(info, cert, client):
        gate.wait(5)
        answered.set()
        return None

    proxy = fastproxy.Proxy(_cfg(mosquitto.upstream), policy=hook).start()
    port = _port(proxy)
    try:
        s = U.open_socket(port)
        s.sendall(U.connect_packet("leaver"))
        U.wait_until(lambda: proxy.stats()["policy_pending"] == 1, 5, what="a pending decision")
        s.close()
        U.wait_until(lambda: proxy.stats()["active"] == 0, 5, what="the connection to end")
        gate.set()
        assert answered.wait(5)
        ok = U.open_socket(port)
        assert U.mqtt_handshake(ok, "after") == 0
        ok.close()
        assert proxy.stats()["policy_pending"] == 0
    finally:
        gate.set()
        proxy.stop()
