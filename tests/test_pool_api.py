"""Upstream pools through the Python API (Proxy in a thread): the record names the server, the
engine's per-server state and the shutdown-sessions command, Proxy.status()."""
from __future__ import annotations

import socket

import proxyutil as U
import fastproxy


def _proxy(brokers, records, **kw):
    raw = {"listen": "127.0.0.1:0", "access_log": "off", "upstream": [b.upstream for b in brokers],
           "health_interval": 0, **kw}
    proxy = fastproxy.Proxy(fastproxy.build_config(raw), on_record=records.append)
    return proxy, proxy.addresses[0][0][1]


def _session(port: int, client_id: str) -> socket.socket:
    s = U.open_socket(port)
    assert U.mqtt_handshake(s, client_id) == 0
    return s


def test_records_and_status_name_the_server(mosquitto_factory):
    a, b = mosquitto_factory(), mosquitto_factory()
    records: list[dict] = []
    proxy, port = _proxy([a, b], records, balance="round-robin")
    with proxy:
        for i in range(4):
            _session(port, f"api-pool-{i}").close()
        U.wait_until(lambda: len(records) == 4, 10, what="4 records")
        assert sorted(r["upstream"] for r in records) == sorted([a.upstream, b.upstream] * 2)
        st = proxy.status()
        servers = {s["server"]: s for s in st["servers"]}
        assert set(servers) == {a.upstream, b.upstream}
        for s in servers.values():
            assert (s["total"], s["sessions"], s["fails"], s["up"], s["pool"]) == (2, 0, 0, True, "listener0")
            assert s["check"] is None           # health checks off
        assert st["counters"]["closed_ok"] == 4 and st["listeners"][0]["balance"] == "round-robin"


def test_down_server_gets_no_sessions_and_shutdown_closes_its_own(mosquitto_factory):
    a, b = mosquitto_factory(), mosquitto_factory()
    records: list[dict] = []
    proxy, port = _proxy([a, b], records, balance="least-conn")
    with proxy:
        held = [_session(port, f"api-held-{i}") for i in range(4)]
        ups = proxy.engine.upstream_stats()
        assert [u["sessions"] for u in ups] == [2, 2]
        idx_a = next(i for i, (lc, sv) in proxy._servers.items() if str(sv) == a.upstream)
        proxy.engine.set_upstream_state(idx_a, False)
        extra = [_session(port, f"api-new-{i}") for i in range(3)]
        assert proxy.engine.upstream_stats()[idx_a]["sessions"] == 2      # none of the new ones
        proxy.engine.shutdown_sessions(idx_a)
        U.wait_until(lambda: sum(r["reason"] == "upstream-down" for r in records) == 2, 10,
                     what="the two sessions on the down server closed")
        assert {r["upstream"] for r in records if r["reason"] == "upstream-down"} == {a.upstream}
        assert proxy.engine.upstream_stats()[idx_a]["sessions"] == 0
        # the sessions on the other server are untouched: a PINGREQ still gets its PINGRESP
        alive = 0
        for s in held + extra:
            closed, _, _ = U.wait_closed(s, 0.2)
            if not closed:
                s.sendall(b"\xc0\x00")
                assert U.read_packet(s)[0] == 13
                alive += 1
        assert alive == 5
        # up again: least-conn sends the next client to A (0 sessions against 5)
        proxy.engine.set_upstream_state(idx_a, True)
        after = _session(port, "api-after")
        assert proxy.engine.upstream_stats()[idx_a]["total"] == 3
        for s in held + extra + [after]:
            s.close()


# ----------------------------------------------------------------------------- the choice itself
from hypothesis import given, settings, strategies as st  # noqa: E402

from fastproxy import _sim as _engine  # noqa: E402

_servers = st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.booleans()), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(_servers, st.lists(st.binary(max_size=40), min_size=1, max_size=20), st.integers(0, 3))
def test_pick_respects_up_and_backup(servers, ids, balance):
    keys = [f"10.0.0.{i}:1883".encode() for i in range(len(servers))]
    weights, up, backup = zip(*servers)
    picks = _engine.pick_many(ids, keys, weights=list(weights), up=list(up), backup=list(backup), balance=balance)
    primaries_up = [i for i in range(len(keys)) if up[i] and not backup[i]]
    any_up = [i for i in range(len(keys)) if up[i]]
    for p in picks:
        if not any_up:
            assert p == -1
        else:
            assert p in any_up
            if primaries_up:
                assert p in primaries_up          # a backup only when no primary is up


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 10), st.lists(st.binary(min_size=1, max_size=23), min_size=1, max_size=50),
       st.randoms(use_true_random=False))
def test_clientid_choice_ignores_server_order(n, ids, rnd):
    """Proxies listing the same servers in another order send a ClientId to the same server."""
    keys = [f"192.0.2.{i}:1883".encode() for i in range(n)]
    shuffled = keys[:]
    rnd.shuffle(shuffled)
    a = [keys[p] for p in _engine.pick_many(ids, keys)]
    b = [shuffled[p] for p in _engine.pick_many(ids, shuffled)]
    assert a == b
    weights = [1 + i % 3 for i in range(n)]
    wmap = dict(zip(keys, weights))
    a = [keys[p] for p in _engine.pick_many(ids, keys, weights=weights)]
    b = [shuffled[p] for p in _engine.pick_many(ids, shuffled, weights=[wmap[k] for k in shuffled])]
    assert a == b
