"""HAProxy's `timeout client` / `timeout server` and `no-tls-tickets` (issue 12): per-side
inactivity beside the idle timeout, and TLS without resumption. Real Mosquitto, real TLS."""
from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

import proxyutil as U


def test_client_timeout_closes_a_client_that_only_listens(certs, mosquitto, start_proxy):
    """The broker sends (a publisher every 0.2 s), the client sends nothing: closed after
    --client-timeout as client-timeout, though --idle-timeout (either way) is far."""
    fp = start_proxy(mosquitto, "--client-timeout", "1", "--idle-timeout", "60")
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs))
    stop = threading.Event()
    try:
        assert U.mqtt_handshake(s, "listener-only", keepalive=0) == 0
        s.sendall(U.subscribe_packet(1, "ct/t"))
        assert U.read_packet(s)[0] == 9

        def publish():
            while not stop.wait(0.2):
                U.mosquitto_pub(mosquitto.port, None, "ct/t", messages=["tick"])

        threading.Thread(target=publish, daemon=True).start()
        closed, data, _ = U.wait_closed(s, 15)
        assert closed and b"tick" in data
    finally:
        stop.set()
        s.close()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid) == (200, "client-timeout", "listener-only"), e.raw
    assert 0.9 <= e.session_time < 10, e.raw


def test_server_timeout_closes_a_session_whose_broker_is_silent(certs, mosquitto, start_proxy):
    """The client publishes QoS 0 every 0.2 s to a topic nobody reads: the broker sends
    nothing back; closed after --server-timeout as 504 server-timeout."""
    fp = start_proxy(mosquitto, "--server-timeout", "1", "--idle-timeout", "60")
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs))
    try:
        assert U.mqtt_handshake(s, "talker", keepalive=0) == 0
        deadline = time.monotonic() + 15
        s.settimeout(0.2)
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                s.sendall(U.publish_packet("nobody/reads", b"x"))
                if s.recv(100) == b"":
                    closed = True
            except socket.timeout:
                pass
            except (OSError, ssl.SSLError):
                closed = True
        assert closed
    finally:
        s.close()
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid) == (504, "server-timeout", "talker"), e.raw


@pytest.mark.parametrize("tickets", ["on", "off"])
def test_tls_session_tickets(tickets, certs, mosquitto, start_proxy):
    """TLS 1.3: a ticket comes with the session unless --tls-session-tickets off (HAProxy's
    no-tls-tickets); then a second connection cannot resume."""
    fp = start_proxy(mosquitto, "--tls-session-tickets", tickets)
    ctx = U.client_context(certs, min_version=ssl.TLSVersion.TLSv1_3)
    s = U.open_socket(fp.port, tls_ctx=ctx)
    assert U.mqtt_handshake(s, f"tickets-{tickets}") == 0     # the ticket arrives with the data
    session = s.session
    s.close()
    assert session is not None and session.has_ticket == (tickets == "on")
    raw = socket.create_connection((U.HOST, fp.port), timeout=10)
    s2 = ctx.wrap_socket(raw, server_hostname=U.HOST, session=session)
    try:
        assert s2.session_reused == (tickets == "on")
    finally:
        s2.close()
