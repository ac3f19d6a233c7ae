"""The Python API the CLI is built on: Proxy in a background thread, records, counters.

Also checks the engine gives back every pooled buffer and pipe once sessions end (the
resource counters the engine keeps for exactly this check).
"""
from __future__ import annotations

import socket
import threading

import pytest

import proxyutil as U
import fastproxy


def _cfg(**kw) -> fastproxy.Config:
    raw = {"listen": "127.0.0.1:0", "access_log": "off", **kw}
    return fastproxy.build_config(raw)


def _roundtrip(port: int, tls_ctx=None, payload: bytes = b"x" * 1000, n: int = 20) -> None:
    sub = U.open_socket(port, tls_ctx=tls_ctx)
    pub = U.open_socket(port, tls_ctx=tls_ctx)
    try:
        assert U.mqtt_handshake(sub, "api-sub") == 0
        sub.sendall(U.subscribe_packet(1, "api/t"))
        assert U.read_packet(sub)[0] == 9  # SUBACK
        assert U.mqtt_handshake(pub, "api-pub") == 0
        for i in range(n):
            pub.sendall(U.publish_packet("api/t", payload + str(i).encode()))
        for i in range(n):
            ptype, _, body = U.read_packet(sub)
            assert ptype == 3 and body.endswith(payload + str(i).encode())
    finally:
        pub.close()
        sub.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain-splice", "tls"])
def test_proxy_thread_records_and_counters(mosquitto, certs, tls):
    records: list[dict] = []
    kw = {"upstream": mosquitto.upstream}
    if tls:
        kw.update(tls_cert=certs.server_cert, tls_key=certs.server_key)
    proxy = fastproxy.Proxy(_cfg(**kw), on_record=records.append)
    (host, port), = proxy.addresses[0]
    assert host == "127.0.0.1" and port > 0
    proxy.start()
    try:
        _roundtrip(port, U.client_context(certs) if tls else None)
        U.wait_until(lambda: len(records) == 2, 10, what="two session records")
        st = proxy.stats()
        assert [r["reason"] for r in records] == ["ok", "ok"], records
        assert st["accepted"] == 2 and st["closed_ok"] == 2 and st["active"] == 0
        assert st["handshakes"] == (2 if tls else 0)
        # Every buffer and pipe lent to a session came back to the pool.
        assert st["live_buffers"] == 0 and st["live_pipes"] == 0
        assert st["bytes_from_clients"] == sum(r["bytes_received"] for r in records)
        assert st["bytes_to_clients"] == sum(r["bytes_sent"] for r in records)
        assert all(r["reason"] == "ok" and r["status"] == 200 for r in records)
        assert {r["protocol"] for r in records} == ({"TLSv1.3"} if tls else {"TCP"})
        # the subscriber received 20 publishes of ~1 KiB through the proxy
        assert max(r["bytes_sent"] for r in records) > 20 * 1000
    finally:
        proxy.stop()
    assert proxy.stats()["active"] == 0


def test_stop_cuts_sessions_after_drain_and_reports_them(mosquitto):
    records: list[dict] = []
    proxy = fastproxy.Proxy(_cfg(upstream=mosquitto.upstream), on_record=records.append).start()
    (_, port), = proxy.addresses[0]
    s = U.open_socket(port)
    try:
        assert U.mqtt_handshake(s, "held") == 0
        proxy.stop(drain_timeout=0.3)
        closed, _, _ = U.wait_closed(s, 5)
        assert closed
    finally:
        s.close()
    assert [r["reason"] for r in records] == ["shutdown"]
    assert records[0]["status"] == 503
    # the listener is gone
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError, match="upstream"):
        fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": "127.0.0.1:99999"})
    with pytest.raises(fastproxy.ConfigError, match="unknown key"):
        fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": "127.0.0.1:1", "tls_certt": "x"})
