"""Upstream pools end to end: 2-3 real Mosquitto brokers behind `fastproxy serve`.

Which broker a client reached is read from the brokers' own logs ("New client connected ...
as <ClientId>"); the proxy's access log and `fastproxy status` (the admin endpoint) are read
where they say more. The balancer's arithmetic is also simulated with the engine's own C
choice (`_engine.pick_many`). Loopback only, real sockets, every wait bounded.
"""
from __future__ import annotations

import json
import socket
import ssl
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

import proxyutil as U

E = pytest.importorskip("fastproxy._sim", reason="compiled engine not built")

HOST = U.HOST
CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_OK5 = b"\x20\x03\x00\x00\x00"
REFUSED_311 = b"\x20\x02\x00\x03"          # 3.1.1: server unavailable
UNAVAILABLE_5 = b"\x20\x03\x00\x88\x00"    # 5.0: 0x88 Server unavailable
BUSY_5 = b"\x20\x03\x00\x89\x00"           # 5.0: 0x89 Server busy


# ----------------------------------------------------------------------------- helpers


def _open(port: int, *, src: str | None = None, tls_ctx: ssl.SSLContext | None = None,
          timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout,
                                 source_address=(src, 0) if src else None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls_ctx is not None:
        s = tls_ctx.wrap_socket(s, server_hostname=HOST)
    return s


def connack(port: int, client_id: str, *, version: int = 4, src: str | None = None,
            tls_ctx: ssl.SSLContext | None = None, timeout: float = 5.0) -> bytes | None:
    """One short MQTT session through the proxy: CONNECT, read the first packet (the CONNACK,
    returned raw; None if none came), DISCONNECT when accepted, close."""
    s = _open(port, src=src, tls_ctx=tls_ctx, timeout=timeout)
    try:
        s.sendall(U.connect_packet(client_id, version=version))
        pkt, _how = U._read_one_packet(s, timeout)
        if pkt is not None and pkt[0] == 0x20 and pkt[3] == 0:
            try:
                s.sendall(U.DISCONNECT)
            except OSError:
                pass
        return pkt
    finally:
        s.close()


def hold(port: int, client_id: str, track, *, version: int = 4, timeout: float = 5.0) -> socket.socket:
    """An MQTT session through the proxy that stays open (keepalive 0: the broker never times it
    out); asserts it was accepted."""
    s = track(_open(port, timeout=timeout))
    s.sendall(U.connect_packet(client_id, version=version))
    pkt, how = U._read_one_packet(s, timeout)
    assert pkt is not None and pkt[:4] == CONNACK_OK, f"{client_id!r}: {pkt!r} ({how})"
    return s


def ids_on(broker, prefix: str) -> Counter:
    """ClientIds (starting with prefix) that reached this broker, with how many times."""
    return Counter(c for c in U.broker_client_ids(broker.log()) if c.startswith(prefix))


def where(brokers, prefix: str, expected_total: int, timeout: float = 10.0) -> list[Counter]:
    """Per broker, the ClientIds with prefix it accepted; waits (bounded) until the brokers'
    logs hold expected_total such connections in all."""
    def counts():
        cs = [ids_on(b, prefix) for b in brokers]
        return cs if sum(sum(c.values()) for c in cs) >= expected_total else None

    try:
        cs = U.wait_until(counts, timeout, what=f"{expected_total} '{prefix}*' clients in the brokers' logs")
    except AssertionError:
        got = [sum(ids_on(b, prefix).values()) for b in brokers]
        raise AssertionError(f"brokers saw {got} '{prefix}*' clients, expected {expected_total} in all")
    assert sum(sum(c.values()) for c in cs) == expected_total, [sum(c.values()) for c in cs]
    return cs


def broker_index(counters: list[Counter], client_id: str) -> int:
    """The one broker that saw client_id (asserting it is exactly one)."""
    hits = [i for i, c in enumerate(counters) if client_id in c]
    assert len(hits) == 1, f"{client_id!r} seen by brokers {hits}"
    return hits[0]


def status(admin_port: int) -> dict:
    r = U.run_cli("status", "--admin", f"{HOST}:{admin_port}", timeout=15)
    assert r.returncode == 0, f"fastproxy status: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def wait_status(admin_port: int, timeout: float = 10.0) -> dict:
    """The first status answer (the admin endpoint may start a moment after the listener)."""
    def ask():
        r = U.run_cli("status", "--admin", f"{HOST}:{admin_port}", timeout=15)
        return json.loads(r.stdout) if r.returncode == 0 else None

    return U.wait_until(ask, timeout, interval=0.1, what="the admin endpoint")


def server_row(st: dict, address: str) -> dict:
    rows = [s for s in st["servers"] if s["server"] == address]
    assert len(rows) == 1, f"{address} in status servers: {st['servers']}"
    return rows[0]


def dead_port() -> int:
    """A loopback port with nothing listening (connects are refused)."""
    p = U.free_port()
    assert not U.port_is_listening(p)
    return p


def predict(client_ids: list[str], addresses: list[str], **kw) -> list[str]:
    """The engine's own choice for each ClientId over servers keyed by their address text."""
    pos = E.pick_many([c.encode() for c in client_ids], [a.encode() for a in addresses], **kw)
    return [addresses[p] if p >= 0 else None for p in pos]


def serve(run_fastproxy, upstreams: list[str], *extra: str, **kw):
    port = U.free_port()
    args = ["--listen", f"{HOST}:{port}"]
    for u in upstreams:
        args += ["--upstream", u]
    return run_fastproxy(*args, *extra, **kw)


def run_many(port: int, client_ids: list[str], workers: int = 8, **kw) -> list[bytes | None]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda c: connack(port, c, **kw), client_ids))


# ----------------------------------------------------------------------------- 1. sticky


def test_clientid_is_sticky_and_deterministic_across_instances_and_orders(mosquitto_factory, run_fastproxy):
    brokers = [mosquitto_factory() for _ in range(3)]
    ups = [b.upstream for b in brokers]
    p1 = serve(run_fastproxy, ups, "--health-interval", "0")
    # a second, independent instance with the same servers listed in another order
    p2 = serve(run_fastproxy, [ups[2], ups[0], ups[1]], "--health-interval", "0")

    # one ClientId reconnecting 6 times (through both instances) always reaches the same broker
    for i in range(6):
        assert connack((p1, p2)[i % 2].port, "sticky-one") == CONNACK_OK
    cs = where(brokers, "sticky-one", 6)
    assert sorted(sum(c.values()) for c in cs) == [0, 0, 6], cs

    # many ClientIds, each connecting once through each instance
    ids = [f"sticky-{i:03d}" for i in range(45)]
    for cid in ids:
        assert connack(p1.port, cid) == CONNACK_OK, cid
        assert connack(p2.port, cid) == CONNACK_OK, cid
    cs = where(brokers, "sticky-0", 45 * 2)
    expected = predict(ids, ups)
    for cid, exp in zip(ids, expected):
        i = broker_index(cs, cid)
        assert cs[i][cid] == 2, f"{cid} reached broker {i} {cs[i][cid]} time(s), and other brokers"
        assert ups[i] == exp, f"{cid}: reached {ups[i]}, the engine's choice is {exp}"
    # the ClientIds do spread: every broker has some
    assert all(len(c) >= 3 for c in cs), [len(c) for c in cs]
    # the access log names the same ClientIds in both instances
    for p in (p1, p2):
        entries = p.wait_access(lambda e: e.clientid.startswith("sticky-0"), n=45)
        assert all(e.status == 200 and e.reason == "ok" for e in entries), [e.raw for e in entries]


def test_clientid_sticky_over_tls(mosquitto_factory, run_fastproxy, certs):
    brokers = [mosquitto_factory() for _ in range(2)]
    ups = [b.upstream for b in brokers]
    p = serve(run_fastproxy, ups, "--tls-cert", certs.server_cert, "--tls-key", certs.server_key)
    ctx = U.client_context(certs)
    ids = [f"tlssticky-{i}" for i in range(12)]
    for _ in range(3):
        for cid in ids:
            assert connack(p.port, cid, tls_ctx=ctx) == CONNACK_OK, cid
    cs = where(brokers, "tlssticky-", 36)
    for cid, exp in zip(ids, predict(ids, ups)):
        i = broker_index(cs, cid)
        assert cs[i][cid] == 3 and ups[i] == exp, (cid, i, exp)
    entries = p.wait_access(lambda e: e.clientid.startswith("tlssticky-"), n=36)
    assert {e.protocol for e in entries} <= {"TLSv1.2", "TLSv1.3"}, {e.protocol for e in entries}


# ----------------------------------------------------------------------------- 2. spread


@pytest.mark.parametrize("n_brokers", [2, 3])
def test_1000_clientids_spread_evenly(mosquitto_factory, run_fastproxy, n_brokers):
    brokers = [mosquitto_factory() for _ in range(n_brokers)]
    p = serve(run_fastproxy, [b.upstream for b in brokers], "--access-log", "off")
    ids = [f"spread{n_brokers}-{i:04d}" for i in range(1000)]
    answers = run_many(p.port, ids)
    bad = [(c, a) for c, a in zip(ids, answers) if a != CONNACK_OK]
    assert not bad, bad[:10]
    cs = where(brokers, f"spread{n_brokers}-", 1000, timeout=20)
    share = 1000 / n_brokers
    sizes = [len(c) for c in cs]
    assert all(abs(n - share) <= 0.2 * share for n in sizes), f"{sizes}, even share {share:.0f} +-20%"
    assert all(v == 1 for c in cs for v in c.values())  # each ClientId reached one broker once


# ----------------------------------------------------------------------------- 3. simulation


SIM_IDS = [f"device-{i:05d}".encode() for i in range(10_000)]
A, B, C = b"10.0.0.1:1883", b"10.0.0.2:1883", b"10.0.0.3:1883"


def _keys(pos: list[int], servers: list[bytes]) -> list[bytes | None]:
    return [servers[p] if p >= 0 else None for p in pos]


def test_simulation_adding_a_server_moves_a_third_and_only_to_it():
    two = _keys(E.pick_many(SIM_IDS, [A, B]), [A, B])
    three = _keys(E.pick_many(SIM_IDS, [A, B, C]), [A, B, C])
    moved = [i for i in range(len(SIM_IDS)) if two[i] != three[i]]
    frac = len(moved) / len(SIM_IDS)
    assert 0.28 <= frac <= 0.39, f"{frac:.3f} of the ids changed server when adding a third"
    assert all(three[i] == C for i in moved), "an id moved between the old servers"
    # the order of the list does not matter
    assert _keys(E.pick_many(SIM_IDS, [C, A, B]), [C, A, B]) == three
    assert _keys(E.pick_many(SIM_IDS, [B, A]), [B, A]) == two


def test_simulation_removing_a_server_moves_only_its_ids():
    three = _keys(E.pick_many(SIM_IDS, [A, B, C]), [A, B, C])
    without_b = _keys(E.pick_many(SIM_IDS, [A, C]), [A, C])
    for i, (before, after) in enumerate(zip(three, without_b)):
        if before == B:
            assert after in (A, C)
        else:
            assert after == before, f"{SIM_IDS[i]!r} moved from {before!r} to {after!r}"
    b_ids = [after for before, after in zip(three, without_b) if before == B]
    # B's ids are spread over what is left, not piled onto one server
    assert 0.35 <= b_ids.count(A) / len(b_ids) <= 0.65


def test_simulation_weights():
    shares = Counter(_keys(E.pick_many(SIM_IDS, [A, B], weights=[1, 2]), [A, B]))
    assert abs(shares[A] / len(SIM_IDS) - 1 / 3) <= 0.03, shares
    assert abs(shares[B] / len(SIM_IDS) - 2 / 3) <= 0.03, shares
    shares = Counter(_keys(E.pick_many(SIM_IDS, [A, B, C], weights=[1, 1, 2]), [A, B, C]))
    assert abs(shares[C] / len(SIM_IDS) - 0.5) <= 0.03, shares


def test_simulation_down_and_backup_servers():
    three = _keys(E.pick_many(SIM_IDS, [A, B, C]), [A, B, C])
    b_down = _keys(E.pick_many(SIM_IDS, [A, B, C], up=[True, False, True]), [A, B, C])
    assert B not in b_down
    for before, after in zip(three, b_down):
        if before != B:
            assert after == before
    assert E.pick_many(SIM_IDS[:50], [A, B], up=[False, False]) == [-1] * 50
    # a backup takes nothing while a primary is up, everything once none is
    assert set(E.pick_many(SIM_IDS[:500], [A, B, C], backup=[False, False, True])) == {0, 1}
    assert set(E.pick_many(SIM_IDS[:500], [A, B, C], backup=[False, False, True], up=[False, False, True])) == {2}


# ----------------------------------------------------------------------------- 4. pick modes


def test_round_robin_alternates(mosquitto_factory, run_fastproxy):
    brokers = [mosquitto_factory() for _ in range(2)]
    p = serve(run_fastproxy, [b.upstream for b in brokers], "--balance", "round-robin")
    ids = [f"rr-{i}" for i in range(6)]
    for cid in ids:
        assert connack(p.port, cid) == CONNACK_OK, cid
    cs = where(brokers, "rr-", 6)
    assert [len(c) for c in cs] == [3, 3], cs
    seq = [broker_index(cs, cid) for cid in ids]
    assert all(a != b for a, b in zip(seq, seq[1:])), f"not alternating: {seq}"


def test_least_conn_follows_the_open_sessions(mosquitto_factory, run_fastproxy, raw_sockets):
    brokers = [mosquitto_factory() for _ in range(2)]
    p = serve(run_fastproxy, [b.upstream for b in brokers], "--balance", "least-conn",
              "--health-interval", "0")
    held = {f"lc-{i}": hold(p.port, f"lc-{i}", raw_sockets) for i in range(4)}
    cs = where(brokers, "lc-", 4)
    assert [len(c) for c in cs] == [2, 2], cs
    # close both sessions on broker X: it now has 0 sessions to the other's 2, so the next two
    # clients both go to X (round-robin would alternate)
    x = broker_index(cs, "lc-0")
    closing = [cid for cid in held if cid in cs[x]]
    for cid in closing:
        held[cid].close()
    p.wait_access(lambda e: e.clientid in closing, n=2)
    for cid in ("lc-new-0", "lc-new-1"):
        hold(p.port, cid, raw_sockets)
    cs = where(brokers, "lc-new-", 2)
    assert len(cs[x]) == 2, f"least-conn sent the new clients to {[len(c) for c in cs]}, expected both on {x}"


def test_source_balance_keeps_each_address_on_one_broker(mosquitto_factory, run_fastproxy):
    brokers = [mosquitto_factory() for _ in range(2)]
    p = serve(run_fastproxy, [b.upstream for b in brokers], "--balance", "source", "--health-interval", "0")
    sources = [f"127.0.0.{i}" for i in range(1, 17)]
    by_source: dict[str, list[str]] = {}
    for src in sources:
        by_source[src] = [f"src-{src}-{k}" for k in range(3)]
        for cid in by_source[src]:
            assert connack(p.port, cid, src=src) == CONNACK_OK, (src, cid)
    cs = where(brokers, "src-", 16 * 3)
    used = set()
    for src, cids in by_source.items():
        idx = {broker_index(cs, cid) for cid in cids}
        assert len(idx) == 1, f"clients from {src} went to brokers {idx}"
        used |= idx
    assert used == {0, 1}, "16 client addresses all hashed to one broker"
    remotes = {e.remote.rsplit(":", 1)[0] for e in p.wait_access(lambda e: e.clientid.startswith("src-"), n=48)}
    assert remotes == set(sources)


def test_empty_clientid_is_accepted_and_spread_by_least_conn(mosquitto_factory, run_fastproxy, raw_sockets):
    """MQTT 3.1.1 allows an empty ClientId with clean session; clientid mode falls back to least-conn."""
    brokers = [mosquitto_factory() for _ in range(2)]
    p = serve(run_fastproxy, [b.upstream for b in brokers], "--balance", "clientid", "--health-interval", "0")
    for _ in range(4):
        hold(p.port, "", raw_sockets)
    # Mosquitto names them auto-<uuid>
    cs = where(brokers, "auto-", 4)
    assert [len(c) for c in cs] == [2, 2], cs


# ----------------------------------------------------------------------------- 5. weights


def test_weight_option_on_the_command_line(mosquitto_factory, run_fastproxy):
    b1, b2 = mosquitto_factory(), mosquitto_factory()
    p = serve(run_fastproxy, [f"{b1.upstream},weight=3", b2.upstream], "--access-log", "off",
              "--health-interval", "0")
    ids = [f"w-{i:03d}" for i in range(400)]
    assert all(a == CONNACK_OK for a in run_many(p.port, ids))
    cs = where([b1, b2], "w-", 400)
    frac = len(cs[0]) / 400
    assert 0.65 <= frac <= 0.85, f"weight 3:1 gave {len(cs[0])}:{len(cs[1])}"
    # exactly the engine's weighted choice
    expected = predict(ids, [b1.upstream, b2.upstream], weights=[3, 1])
    assert [b1.upstream if cid in cs[0] else b2.upstream for cid in ids] == expected


# ----------------------------------------------------------------------------- 6. backup


def test_backup_takes_over_when_the_primary_dies(mosquitto_factory, run_fastproxy):
    a, b = mosquitto_factory(), mosquitto_factory()
    admin = U.free_port()
    # checks are rare: the take-over below comes from the retry, not from a check
    p = serve(run_fastproxy, [a.upstream, f"{b.upstream},backup"], "--health-interval", "60",
              "--admin", f"{HOST}:{admin}")
    before = [f"bk-a-{i}" for i in range(10)]
    for cid in before:
        assert connack(p.port, cid) == CONNACK_OK, cid
    cs = where([a, b], "bk-a-", 10)
    assert len(cs[0]) == 10 and len(cs[1]) == 0, cs

    a.proc.kill()
    a.proc.wait(5)
    assert not U.can_connect(HOST, a.port)
    after = [f"bk-b-{i}" for i in range(10)]
    answers = {cid: connack(p.port, cid) for cid in after}
    assert all(v == CONNACK_OK for v in answers.values()), answers
    cs = where([b], "bk-b-", 10)
    assert len(cs[0]) == 10
    entries = p.wait_access(lambda e: e.clientid.startswith("bk-"), n=20)
    assert all(e.status == 200 for e in entries), [e.raw for e in entries]
    st = status(admin)
    # every client after the kill tried A first (its refused connect counts in A's total too)
    ra = server_row(st, a.upstream)
    assert ra["fails"] == 10 and ra["total"] - ra["fails"] == 10, ra
    assert ra["up"] is True, "a check noticed the kill: this test wants the retry alone"
    assert server_row(st, b.upstream)["total"] == 10, st["servers"]
    assert server_row(st, b.upstream)["backup"] is True


# ----------------------------------------------------------------------------- 7. maxconn


def test_maxconn_full_pool_answers_server_busy(mosquitto_factory, run_fastproxy, raw_sockets):
    a, b = mosquitto_factory(), mosquitto_factory()
    p = serve(run_fastproxy, [f"{a.upstream},maxconn=2", f"{b.upstream},maxconn=2"], "--health-interval", "0")
    held = {f"mc-{i}": hold(p.port, f"mc-{i}", raw_sockets) for i in range(4)}
    cs = where([a, b], "mc-", 4)
    assert [len(c) for c in cs] == [2, 2], cs

    assert connack(p.port, "mc-fifth") == REFUSED_311
    assert connack(p.port, "mc-fifth-v5", version=5) == BUSY_5
    refused = p.wait_access(lambda e: e.clientid.startswith("mc-fifth"), n=2)
    assert all(e.status == 503 and e.reason == "no-server" for e in refused), [e.raw for e in refused]
    where([a, b], "mc-", 4)  # nothing more reached a broker

    # one slot frees up: the next client is accepted, on the broker that had it
    x = broker_index(cs, "mc-0")
    held["mc-0"].close()
    p.wait_access(lambda e: e.clientid == "mc-0", n=1)
    assert connack(p.port, "mc-later") == CONNACK_OK
    assert broker_index(where([a, b], "mc-later", 1), "mc-later") == x


# ----------------------------------------------------------------------------- 8. retries


def test_retry_moves_clients_off_a_dead_server(mosquitto, run_fastproxy):
    dead = f"{HOST}:{dead_port()}"
    admin = U.free_port()
    p = serve(run_fastproxy, [dead, mosquitto.upstream], "--balance", "clientid", "--health-interval", "0",
              "--admin", f"{HOST}:{admin}")
    ids = [f"retry-{i:02d}" for i in range(50)]
    first_choice = predict(ids, [dead, mosquitto.upstream])
    n_dead = first_choice.count(dead)
    assert 5 <= n_dead <= 45, "the test needs ClientIds of both servers"
    for cid in ids:
        assert connack(p.port, cid) == CONNACK_OK, cid
    assert len(where([mosquitto], "retry-", 50)[0]) == 50
    entries = p.wait_access(lambda e: e.clientid.startswith("retry-"), n=50)
    assert all(e.status == 200 and e.reason == "ok" for e in entries), [e.raw for e in entries]
    st = status(admin)
    d, live = server_row(st, dead), server_row(st, mosquitto.upstream)
    assert d["fails"] == n_dead, (n_dead, d)
    assert d["total"] == n_dead and d["sessions"] == 0, d  # total counts connect attempts
    assert live["total"] == 50 and live["fails"] == 0, live
    assert st["listeners"][0]["balance"] == "clientid", st["listeners"]


def test_no_retry_refuses_clients_of_the_dead_server(mosquitto, run_fastproxy):
    dead = f"{HOST}:{dead_port()}"
    p = serve(run_fastproxy, [dead, mosquitto.upstream], "--balance", "clientid", "--health-interval", "0",
              "--retries", "0")
    ids = [f"noretry-{i:02d}" for i in range(30)]
    first_choice = dict(zip(ids, predict(ids, [dead, mosquitto.upstream])))
    assert 3 <= list(first_choice.values()).count(dead) <= 27
    for cid in ids:
        got = connack(p.port, cid)
        assert got == (REFUSED_311 if first_choice[cid] == dead else CONNACK_OK), (cid, first_choice[cid], got)
    reached = where([mosquitto], "noretry-", 30 - list(first_choice.values()).count(dead))[0]
    assert set(reached) == {c for c, s in first_choice.items() if s != dead}
    entries = p.wait_access(lambda e: e.clientid.startswith("noretry-"), n=30)
    for e in entries:
        if first_choice[e.clientid] == dead:
            assert (e.status, e.reason) == (502, "upstream-refused"), e.raw
        else:
            assert (e.status, e.reason) == (200, "ok"), e.raw
    # An outage fails every client of the dead server: the access log has each, the error log
    # one line per server and reason per 10 s (a storm must not flood it).
    refused = [ln for ln in p.stderr().splitlines() if "upstream-refused" in ln]
    assert len(refused) == 1 and dead in refused[0], refused


# ----------------------------------------------------------------------------- 9. all down


def test_all_servers_refusing(run_fastproxy):
    p = serve(run_fastproxy, [f"{HOST}:{dead_port()}", f"{HOST}:{dead_port()}"], "--health-interval", "0")
    assert connack(p.port, "alldown-311") == REFUSED_311
    assert connack(p.port, "alldown-5", version=5) == UNAVAILABLE_5
    entries = p.wait_access(lambda e: e.clientid.startswith("alldown-"), n=2)
    assert all((e.status, e.reason) == (502, "upstream-refused") for e in entries), [e.raw for e in entries]


def test_all_servers_marked_down_by_health_checks(run_fastproxy):
    dead = [f"{HOST}:{dead_port()}", f"{HOST}:{dead_port()}"]
    admin = U.free_port()
    p = serve(run_fastproxy, dead, "--health-interval", "0.2", "--health-fall", "1", "--health-timeout", "0.3",
              "--admin", f"{HOST}:{admin}")
    wait_status(admin)

    def both_down():
        st = status(admin)
        return all(server_row(st, d)["up"] is False for d in dead) and st

    st = U.wait_until(both_down, 10, interval=0.2, what="both servers marked down")
    assert all(server_row(st, d)["check"] is not None for d in dead)
    assert connack(p.port, "nosrv-311") == REFUSED_311
    assert connack(p.port, "nosrv-5", version=5) == UNAVAILABLE_5
    entries = p.wait_access(lambda e: e.clientid.startswith("nosrv-"), n=2)
    assert all((e.status, e.reason) == (503, "no-server") for e in entries), [e.raw for e in entries]
    st = status(admin)
    # nothing was tried: no client connect failed
    assert all(server_row(st, d)["total"] == 0 for d in dead), st["servers"]
    assert "DOWN" in p.stderr(), p.stderr()


# ----------------------------------------------------------------------------- 10. configuration


def _config_error(r, flag: str) -> None:
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastproxy: configuration error: "), r.stderr
    assert flag in lines[0], f"{flag} not named in: {lines[0]}"


@pytest.mark.parametrize("extra, flag", [
    (["--balance", "bogus"], "--balance"),
    (["--upstream", "127.0.0.1:1,weight=0"], "weight"),
    (["--upstream", "127.0.0.1:1,bogus=1"], "bogus"),
    (["--on-marked-down", "shutdown-sessions", "--health-interval", "0"], "--on-marked-down"),
    (["--mqtt", "off", "--balance", "clientid"], "--balance"),
    (["--admin", "10.1.2.3:8404"], "--admin"),
    (["--upstream", "127.0.0.1:2"], "127.0.0.1:2"),
])
@pytest.mark.parametrize("command", ["check", "serve"])
def test_config_errors_are_clean(extra, flag, command):
    args = ["--listen", f"{HOST}:{U.free_port()}", "--upstream", "127.0.0.1:2", *extra]
    r = U.run_cli(command, *args, timeout=20)
    _config_error(r, flag)
    if "weight" in flag or "bogus" in flag:
        assert "--upstream" in r.stderr, r.stderr
    if extra[:1] == ["--upstream"] and extra[1] == "127.0.0.1:2":
        assert "twice" in r.stderr, r.stderr


def test_config_file_pool_passes_check(tmp_path):
    p1, p2 = U.free_port(), U.free_port()
    cfg = tmp_path / "pool.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{U.free_port()}"\n'
        f'upstream = ["127.0.0.1:{p1}", {{address = "127.0.0.1:{p2}", weight = 2, backup = true}}]\n'
        'balance = "least-conn"\n'
        'retries = 1\n'
        'access_log = "off"\n'
    )
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "is ok" in r.stdout and "Traceback" not in r.stderr
    # and a bad option inside the table is caught with the file and key named
    cfg.write_text(
        f'listen = "127.0.0.1:{U.free_port()}"\n'
        f'upstream = ["127.0.0.1:{p1}", {{address = "127.0.0.1:{p2}", weight = 0}}]\n'
    )
    r = U.run_cli("check", "-c", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(cfg) in r.stderr and "weight" in r.stderr, r.stderr


def test_config_file_pool_is_served(mosquitto_factory, run_fastproxy, tmp_path):
    """The file's pool (a weighted primary and a backup) is what the proxy uses."""
    a, b = mosquitto_factory(), mosquitto_factory()
    port = U.free_port()
    cfg = tmp_path / "pool.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:{port}"\n'
        f'upstream = ["{a.upstream}", {{address = "{b.upstream}", weight = 2, backup = true}}]\n'
        'health_interval = 0\n'
    )
    p = run_fastproxy("-c", str(cfg), port=port)
    for i in range(5):
        assert connack(p.port, f"file-{i}") == CONNACK_OK
    cs = where([a, b], "file-", 5)
    assert [len(c) for c in cs] == [5, 0], cs


# ----------------------------------------------------------------------------- retry and PROXY headers


def test_retry_drops_the_header_of_the_failed_server(mosquitto, run_fastproxy):
    """The dead first choice wants a PROXY header, the broker retried next wants none (Mosquitto
    2.0 closes on a PROXY header): the retried CONNECT must go out without it."""
    dead = f"{HOST}:{dead_port()}"
    p = serve(run_fastproxy, [f"{dead},proxy-protocol=v2", mosquitto.upstream], "--health-interval", "0")
    ids = [f"pp-retry-{i:02d}" for i in range(30)]
    n_dead = predict(ids, [dead, mosquitto.upstream]).count(dead)
    assert 3 <= n_dead <= 27
    assert [connack(p.port, c) for c in ids] == [CONNACK_OK] * len(ids)
    assert len(where([mosquitto], "pp-retry-", len(ids))[0]) == len(ids)


class _HeaderRecorder(U.ThreadedServer):
    """Reads one PROXY v2 header and the CONNECT after it, keeps both, answers CONNACK 0."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, bytes]] = []
        super().__init__()

    def handle(self, conn: socket.socket, peer, state) -> None:
        from fastproxy import proxy_protocol as pp

        conn.settimeout(5)
        with conn:
            buf = b""
            try:
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                    hdr = pp.parse(buf)
                    if hdr is not None and len(buf) > hdr.length + 1 and len(buf) >= hdr.length + 2 + buf[hdr.length + 1]:
                        break
                self.seen.append((hdr, buf[hdr.length:]))
                conn.sendall(CONNACK_OK)
                conn.recv(16)
            except (OSError, ValueError):
                return


def test_retry_sends_one_header_to_the_next_server(run_fastproxy):
    """Listener-level PROXY v2, first choice dead: the server that answers gets exactly one header
    (built again for it) followed directly by the client's CONNECT."""
    rec = _HeaderRecorder()
    try:
        dead = f"{HOST}:{dead_port()}"
        p = serve(run_fastproxy, [dead, rec.upstream], "--proxy-protocol", "v2", "--health-interval", "0")
        ids = [c for c in (f"hdr-{i:02d}" for i in range(40)) if predict([c], [dead, rec.upstream])[0] == dead][:5]
        assert len(ids) == 5
        for c in ids:
            assert connack(p.port, c) == CONNACK_OK, c
        U.wait_until(lambda: len(rec.seen) == 5, 10, what="5 sessions at the recorder")
        for hdr, rest in rec.seen:
            # the client's addresses: where it came from, and the proxy address it reached
            assert hdr.command == "PROXY" and hdr.dst == (HOST, p.port) and hdr.src[0] == HOST, hdr
            assert rest[:1] == b"\x10" and rest[1] == len(rest) - 2, rest   # the CONNECT, nothing between
        assert sorted(r[1] for r in rec.seen) == sorted(U.connect_packet(c) for c in ids)
    finally:
        rec.close()
