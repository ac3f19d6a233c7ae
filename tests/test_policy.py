"""Policy hooks (fastproxy.policy): in-process `fastproxy.Proxy(cfg, policy=fn)` and the CLI's
`--policy module:function`, with `--named-upstream` for Route(). Real Mosquitto brokers (their
logs show who connected, as which ClientId), real clients, real TLS.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import re
import ssl

import pytest

import fastproxy
import policies_example as PE
import proxyutil as U
from fastproxy.mqtt import ConnectInfo, ReasonCode
from fastproxy.policy import Allow, Deny, PeerCertificate
from mqtt_reference import encode_connect

MOD = "tests.policies_example"


# ----------------------------------------------------------------------------- helpers


class InProcess:
    """A Proxy in a background thread of the test process, with its session records."""

    def __init__(self, raw: dict, policy=None) -> None:
        self.records: list[dict] = []
        cfg = fastproxy.build_config({"listen": "127.0.0.1:0", "access_log": "off", **raw})
        self.proxy = fastproxy.Proxy(cfg, policy=policy, on_record=self.records.append)
        (_, self.port), = self.proxy.addresses[0]
        self.proxy.start()

    def wait_records(self, n: int) -> list[dict]:
        U.wait_until(lambda: len(self.records) >= n, 10, what=f"{n} session records")
        return list(self.records)

    def stats(self) -> dict:
        return self.proxy.stats()

    def stop(self) -> None:
        self.proxy.stop()
        self.proxy.close()


@pytest.fixture
def in_process():
    started: list[InProcess] = []

    def start(raw: dict, policy=None) -> InProcess:
        p = InProcess(raw, policy)
        started.append(p)
        return p

    yield start
    for p in started:
        try:
            p.stop()
        except Exception as e:  # the engine re-raises what stopped it; the test has reported that
            print(f"in-process proxy stopped with {e!r}")


@pytest.fixture
def policy_log():
    """Records of the 'fastproxy.policy' logger (whatever the root logger's configuration)."""
    records: list[logging.LogRecord] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    h = H(logging.DEBUG)
    lg = logging.getLogger("fastproxy.policy")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    yield records
    lg.removeHandler(h)
    lg.setLevel(old)


def tls_raw(certs) -> dict:
    """TLS with optional client certificates from the test CA."""
    return {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "client_ca": certs.ca_cert,
            "verify": "optional"}


def ids_at(broker) -> list[str]:
    return U.broker_client_ids(broker.log())


def wait_id(broker, client_id: str) -> None:
    U.wait_until(lambda: client_id in ids_at(broker), 10, what=f"{client_id} at the broker")


def pub(port: int, certs, client_id: str, *, version: str | None = None, message: str = "hi",
        topic: str = "pol/t", tls: bool = True) -> "U.subprocess.CompletedProcess":
    cmd = ["mosquitto_pub", *U.mosq_conn_args(port, certs if tls else None), "-t", topic, "-m", message,
           "-q", "1", "-i", client_id]
    if tls:
        cmd += ["--cert", certs.client_cert, "--key", certs.client_key]
    if version:
        cmd += ["-V", version]
    return U.subprocess.run(cmd, capture_output=True, timeout=30)


def out_of(r) -> str:
    return (r.stdout + r.stderr).decode(errors="replace")


# ----------------------------------------------------------------------------- what the hook sees


def test_hook_receives_connect_certificate_and_client_address(certs, mosquitto, in_process):
    """The hook gets a ConnectInfo (client_id, username, password_present — never the password —,
    keepalive, version, properties), the PeerCertificate (cn, verified, fingerprint, serial,
    validity, DER) and the client's (address, port); without a certificate, None."""
    seen: list[tuple] = []

    def hook(connect, cert, client):
        seen.append((connect, cert, client))
        return None

    p = in_process({"upstream": mosquitto.upstream, **tls_raw(certs)}, policy=hook)
    password = b"pa55-w0rd-never-seen"
    pkt = encode_connect(5, "rec-1", keepalive=17, username="alice", password=password,
                         properties=[("session_expiry_interval", 30), ("user_property", ("site", "lab"))])
    ctx = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    s = U.open_socket(p.port, tls_ctx=ctx)
    try:
        local_port = s.getsockname()[1]
        s.sendall(pkt)
        ptype, _, body = U.read_packet(s)
        assert ptype == 2 and body[1] == 0, body
        s.sendall(U.DISCONNECT)
        U.wait_closed(s, 10)
    finally:
        s.close()
    wait_id(mosquitto, "rec-1")
    assert len(seen) == 1, seen
    info, cert, client = seen[0]
    assert isinstance(info, ConnectInfo)
    assert (info.client_id, info.username, info.password_present, info.keepalive, info.version) == \
        ("rec-1", "alice", True, 17, 5)
    assert info.properties.get("session_expiry_interval") == 30
    assert info.user_properties == [("site", "lab")]
    for name in info.__dataclass_fields__:
        v = getattr(info, name)
        assert password not in (v if isinstance(v, bytes) else str(v).encode()), f"the password is in {name}"
    assert password.decode() not in repr(info)
    assert client == ("127.0.0.1", local_port), client

    assert isinstance(cert, PeerCertificate)
    der = U.cert_der(certs.client_cert)
    from cryptography import x509

    c = x509.load_der_x509_certificate(der)
    assert (cert.cn, cert.verified) == ("thing001", True)
    assert cert.der == der
    assert cert.fingerprint_sha256.replace(":", "").lower() == hashlib.sha256(der).hexdigest()
    assert int(cert.serial.replace(":", ""), 16) == c.serial_number
    assert "CN=thing001" in cert.subject and "fastproxy test CA" in cert.issuer
    assert cert.not_before == int(c.not_valid_before_utc.timestamp())
    assert cert.not_after == int(c.not_valid_after_utc.timestamp())
    assert cert.not_before < dt.datetime.now().timestamp() < cert.not_after

    # no client certificate (verify optional): cert is None; MQTT 3.1.1 without credentials
    s = U.open_socket(p.port, tls_ctx=U.client_context(certs))
    try:
        assert U.mqtt_handshake(s, "rec-2", keepalive=5, version=4) == 0
    finally:
        s.close()
    U.wait_until(lambda: len(seen) == 2, 10, what="the second hook call")
    info, cert, client = seen[1]
    assert cert is None
    assert (info.client_id, info.username, info.password_present, info.keepalive, info.version) == \
        ("rec-2", None, False, 5, 4)

    # a certificate that fails verification, if the handshake lets it through, is marked unverified
    s = None
    try:
        s = U.open_socket(p.port, tls_ctx=U.client_context(certs, cert=certs.rogue_client_cert,
                                                           key=certs.rogue_client_key))
        U.mqtt_handshake(s, "rec-3")
    except (ssl.SSLError, OSError, ConnectionError, AssertionError):
        pass
    finally:
        if s is not None:
            s.close()
    p.wait_records(3)
    if len(seen) == 3:
        assert seen[2][1] is not None and seen[2][1].verified is False and seen[2][1].cn == "thing001"


def test_hook_sees_clientid_rewritten_from_cn(certs, mosquitto, in_process):
    """With --clientid-from-cn, the hook sees the CN as ClientId of an empty-ClientId CONNECT."""
    seen = []
    p = in_process({"upstream": mosquitto.upstream, **tls_raw(certs), "clientid_from_cn": True},
                   policy=lambda c, cert, addr: seen.append(c.client_id))
    o = U.try_connect(p.port, U.connect_packet("", version=5),
                      tls_ctx=U.client_context(certs, cert=certs.client_cert, key=certs.client_key))
    assert o.code == 0, o
    assert seen == ["thing001"]
    wait_id(mosquitto, "thing001")
    assert [r["client_id"] for r in p.wait_records(1)] == ["thing001"]


def test_hook_via_cli_gets_the_same(certs, mosquitto, start_proxy, tmp_path):
    """--policy module:function in the CLI: the hook runs in the proxy process with the same arguments."""
    rec = tmp_path / "policy-record.jsonl"
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--policy", f"{MOD}:record",
                     env={PE.RECORD_ENV: str(rec)})
    pkt = encode_connect(4, "cli-rec", keepalive=42, username="bob", password=b"hunter2-secret")
    ctx = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    o = U.try_connect(fp.port, pkt, tls_ctx=ctx)
    assert o.code == 0, (o, fp.stderr())
    (entry,) = [json.loads(ln) for ln in rec.read_text().splitlines()]
    c = entry["connect"]
    assert (c["client_id"], c["username"], c["password_present"], c["keepalive"], c["version"]) == \
        ("cli-rec", "bob", True, 42, 4)
    assert "hunter2" not in json.dumps(entry)
    assert entry["cert"]["cn"] == "thing001" and entry["cert"]["verified"] is True
    assert bytes.fromhex(entry["cert"]["der"]) == U.cert_der(certs.client_cert)
    assert entry["client"] == ["127.0.0.1", o.local_port]
    wait_id(mosquitto, "cli-rec")


# ----------------------------------------------------------------------------- allow list


@pytest.mark.parametrize("version,code", [(4, 0x05), (5, 0x87)])
def test_allow_list_in_process(mosquitto, in_process, tmp_path, policy_log, version, code):
    """The README example (ClientIds allowed by a file): a listed ClientId is accepted, another is
    refused with 0x05 / 0x87; the file is read per CONNECT, so adding a line lets the next one in.
    Proxy.stats() counts the refusals by cause."""
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("# devices\ndev-1\ndev-2\n")
    p = in_process({"upstream": mosquitto.upstream}, policy=PE.make_allow_list(str(allowed)))
    assert U.try_connect(p.port, U.connect_packet("dev-1", version=version)).code == 0
    wait_id(mosquitto, "dev-1")
    before = U.broker_connections(mosquitto.log())
    for cid in ("intruder", "dev-3", "DEV-1"):
        o = U.try_connect(p.port, U.connect_packet(cid, version=version))
        assert o.code == code and o.closed, (cid, o)
    p.wait_records(4)
    st = p.stats()
    assert st["refused: ClientId not on the allow list"] == 3, st
    assert st["closed_denied"] == 3, st
    allowed.write_text("dev-1\ndev-2\ndev-3\n")
    assert U.try_connect(p.port, U.connect_packet("dev-3", version=version)).code == 0
    wait_id(mosquitto, "dev-3")
    assert U.broker_connections(mosquitto.log()) == before + 1
    assert not {"intruder", "DEV-1"} & set(ids_at(mosquitto))
    recs = p.wait_records(5)
    assert [(r["status"], r["reason"], r["client_id"]) for r in recs] == [
        (200, "ok", "dev-1"), (403, "denied", "intruder"), (403, "denied", "dev-3"), (403, "denied", "DEV-1"),
        (200, "ok", "dev-3")], recs
    msgs = [r.getMessage() for r in policy_log if "refused client" in r.getMessage()]
    assert len(msgs) == 3 and all("ClientId not on the allow list" in m for m in msgs), msgs
    assert re.search(r"refused client 127\.0\.0\.1:\d+ ClientId 'intruder' CN \S+: ClientId not on the allow list "
                     r"\(reason code 0x87\)", msgs[0]), msgs[0]


@pytest.mark.parametrize("version,code,text", [("mqttv311", 0x05, "not authori"), ("mqttv5", 0x87, "Not authorized")])
def test_allow_list_cli(certs, mosquitto, start_proxy, tmp_path, version, code, text):
    """--policy tests.policies_example:allow_list over mTLS with mosquitto_pub: the listed device
    publishes (a subscriber gets it), the other is refused (0x05 / 0x87, 403 denied, one error-log
    line) and never reaches the broker."""
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("thing001\n")
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--policy", f"{MOD}:allow_list",
                     env={PE.ALLOWLIST_ENV: str(allowed)})
    sub = U.MosqSub(mosquitto.port, None, "pol/t", count=1, client_id="direct-sub", qos=1, timeout=20)
    try:
        sub.wait_subscribed(mosquitto.log)
        before = U.broker_connections(mosquitto.log())
        r = pub(fp.port, certs, "intruder", version=version)
        assert r.returncode == code and text in out_of(r), (r.returncode, out_of(r))
        r = pub(fp.port, certs, "thing001", version=version, message="allowed")
        assert r.returncode == 0, out_of(r)
        rc, out, err = sub.result(timeout=20)
    finally:
        sub.kill()
    assert out.strip() == b"allowed", (rc, out, err)
    assert U.broker_connections(mosquitto.log()) == before + 1
    assert "intruder" not in mosquitto.log()
    entries = fp.wait_access(n=2)
    assert [(e.status, e.reason, e.clientid, e.cn) for e in entries] == [
        (403, "denied", "intruder", "thing001"), (200, "ok", "thing001", "thing001")], [e.raw for e in entries]
    lines = [ln for ln in fp.stderr().splitlines() if "refused client" in ln]
    assert len(lines) == 1 and "'intruder'" in lines[0] and "allow list" in lines[0] and "0x87" in lines[0], lines


# ----------------------------------------------------------------------------- routing


def test_route_to_named_upstream_cli(certs, mosquitto_factory, start_proxy):
    """Route("eu") with --named-upstream eu=ADDR: 'eu-' devices land on the second Mosquitto, the
    others on the listener's upstream; routing to an unknown name refuses (0x03 / 0x88)."""
    main, eu = mosquitto_factory(), mosquitto_factory()
    fp = start_proxy(main, "--named-upstream", f"eu={eu.host}:{eu.port}", "--policy", f"{MOD}:route_eu")
    n_main, n_eu = U.broker_connections(main.log()), U.broker_connections(eu.log())  # readiness probes
    for cid, version in (("eu-dev1", None), ("us-dev1", None), ("eu-dev2", "mqttv5")):
        r = pub(fp.port, certs, cid, version=version, tls=True)
        assert r.returncode == 0, (cid, out_of(r), fp.stderr()[-2000:])
    wait_id(eu, "eu-dev2")
    wait_id(main, "us-dev1")
    assert ids_at(eu) == ["eu-dev1", "eu-dev2"], eu.log()[-2000:]
    assert ids_at(main) == ["us-dev1"], main.log()[-2000:]
    r = pub(fp.port, certs, "nowhere-1", version="mqttv5")
    assert r.returncode == 0x88, out_of(r)
    r = pub(fp.port, certs, "nowhere-2")
    assert r.returncode == 0x03, out_of(r)
    entries = fp.wait_access(n=5)
    assert [(e.status, e.clientid) for e in entries] == [
        (200, "eu-dev1"), (200, "us-dev1"), (200, "eu-dev2"), (403, "nowhere-1"), (403, "nowhere-2")], \
        [e.raw for e in entries]
    assert "no-such-upstream" in fp.stderr()
    assert U.broker_connections(main.log()) == n_main + 1 and U.broker_connections(eu.log()) == n_eu + 2


def test_route_in_process_and_counters(mosquitto_factory, in_process):
    """The same with the API (config key upstreams); an unknown route counts as refused: policy-error."""
    main, eu = mosquitto_factory(), mosquitto_factory()
    p = in_process({"upstream": main.upstream, "upstreams": {"eu": eu.upstream}}, policy=PE.route_eu)
    assert U.try_connect(p.port, U.connect_packet("eu-api", version=5)).code == 0
    assert U.try_connect(p.port, U.connect_packet("us-api", version=5)).code == 0
    o = U.try_connect(p.port, U.connect_packet("nowhere-api", version=5))
    assert o.code == 0x88 and o.closed, o
    wait_id(eu, "eu-api")
    wait_id(main, "us-api")
    assert ids_at(eu) == ["eu-api"] and ids_at(main) == ["us-api"]
    p.wait_records(3)
    st = p.stats()
    assert st["refused: policy-error"] == 1 and st["closed_denied"] == 1 and st["closed_ok"] == 2, st


# ----------------------------------------------------------------------------- failures in the hook


def test_hook_that_raises_refuses_and_proxy_keeps_serving(mosquitto, in_process, policy_log):
    """A hook that raises: the client is refused (5.0: 0x88 Server unavailable, 3.1.1: 0x03), the
    error is logged with its traceback, counted as refused: policy-error; the proxy serves on.
    A hook returning something that is not a decision is treated the same."""
    p = in_process({"upstream": mosquitto.upstream}, policy=PE.broken)
    o = U.try_connect(p.port, U.connect_packet("crash-1", version=5))
    assert o.connack == b"\x20\x03\x00\x88\x00" and o.closed, o
    p.wait_records(1)
    assert p.stats()["refused: policy-error"] == 1
    assert U.try_connect(p.port, U.connect_packet("fine-1", version=5)).code == 0
    o = U.try_connect(p.port, U.connect_packet("crash-2", version=4))
    assert o.connack == b"\x20\x02\x00\x03" and o.closed, o
    assert U.try_connect(p.port, U.connect_packet("fine-2", version=4)).code == 0
    wait_id(mosquitto, "fine-2")
    recs = p.wait_records(4)
    st = p.stats()
    assert st["refused: policy-error"] == 2 and st["closed_denied"] == 2 and st["closed_ok"] == 2, st
    assert ids_at(mosquitto) == ["fine-1", "fine-2"]
    errs = [r for r in policy_log if r.levelno >= logging.ERROR]
    assert len(errs) == 2 and all(r.exc_info and "policy bug" in str(r.exc_info[1]) for r in errs), errs
    assert "crash-1" in errs[0].getMessage()
    assert [(r["status"], r["reason"]) for r in recs] == [(403, "denied"), (200, "ok")] * 2, recs


def test_hook_returning_garbage_is_a_policy_error(mosquitto, in_process):
    p = in_process({"upstream": mosquitto.upstream}, policy=PE.wrong_type)
    o = U.try_connect(p.port, U.connect_packet("garbage-1", version=5))
    assert o.connack == b"\x20\x03\x00\x88\x00", o
    p.wait_records(1)
    assert p.stats()["refused: policy-error"] == 1
    assert "garbage-1" not in mosquitto.log()


def test_hook_that_raises_cli(certs, mosquitto, start_proxy):
    """The same in the CLI: mosquitto_pub sees 'Server unavailable' (0x88), 403 denied, the error
    log says the policy failed; the next client gets through."""
    fp = start_proxy(mosquitto, "--policy", f"{MOD}:broken", tls=False, allow_traceback=True)
    r = pub(fp.port, certs, "crash-cli", version="mqttv5", tls=False)
    assert r.returncode == 0x88, out_of(r)
    r = pub(fp.port, certs, "fine-cli", version="mqttv5", tls=False)
    assert r.returncode == 0, out_of(r)
    wait_id(mosquitto, "fine-cli")
    assert "crash-cli" not in mosquitto.log()
    entries = fp.wait_access(n=2)
    assert [(e.status, e.reason, e.clientid) for e in entries] == [(403, "denied", "crash-cli"),
                                                                   (200, "ok", "fine-cli")]
    err = fp.stderr()
    assert "policy failed" in err and "crash-cli" in err and "RuntimeError: policy bug" in err, err
    assert fp.proc.poll() is None


# ----------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_allow_client_id_rewrites_what_the_broker_sees(certs, mosquitto, in_process, tls):
    """Allow(client_id=...) replaces the ClientId on the way: the broker and the access record see
    the new one; packets coalesced behind the CONNECT and a 300 KiB PUBLISH after it are relayed
    intact over the re-encoded session."""
    raw = {"upstream": mosquitto.upstream, **({"tls_cert": certs.server_cert, "tls_key": certs.server_key} if tls else {})}
    p = in_process(raw, policy=PE.rename)
    sub = U.PahoClient(mosquitto.port, client_id="direct-sub")
    sub.connect()
    try:
        sub.subscribe("pol/renamed", 1)
        big = random.Random(11).randbytes(300 * 1024)
        s = U.open_socket(p.port, tls_ctx=U.client_context(certs) if tls else None)
        try:
            s.sendall(U.connect_packet("dev7", keepalive=30) + U.publish_packet("pol/renamed", b"first", qos=1, mid=3))
            assert U.read_packet(s) == (2, 0, b"\x00\x00")
            assert U.read_packet(s) == (4, 0, b"\x00\x03")
            s.sendall(U.publish_packet("pol/renamed", big, qos=1, mid=4))
            assert U.read_packet(s) == (4, 0, b"\x00\x04")
            s.sendall(U.DISCONNECT)
            U.wait_closed(s, 10)
        finally:
            s.close()
        got = sub.collect(2, timeout=15)
    finally:
        sub.close()
    assert [m.payload for m in got] == [b"first", big]
    assert "renamed-dev7" in ids_at(mosquitto) and "dev7" not in ids_at(mosquitto)
    (rec,) = p.wait_records(1)
    assert (rec["reason"], rec["client_id"]) == ("ok", "renamed-dev7"), rec
    st = p.stats()
    assert st["live_buffers"] == 0 and st["active"] == 0, st


def test_deny_reason_codes(mosquitto, in_process):
    """Deny(code, why): the 5.0 code as given, the 3.x code of the same meaning; counted by `why`;
    the hook runs exactly once per connection."""
    calls = []

    def hook(connect, cert, client):
        calls.append(connect.client_id)
        if connect.client_id.startswith("banned"):
            return Deny(ReasonCode.BANNED, "banned device")
        if connect.client_id.startswith("busy"):
            return Deny(ReasonCode.SERVER_BUSY, "too busy")
        if connect.client_id.startswith("badpw"):
            return Deny(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad credentials")
        return Allow()

    p = in_process({"upstream": mosquitto.upstream}, policy=hook)
    cases = [("banned-5", 5, b"\x20\x03\x00\x8a\x00"), ("banned-4", 4, b"\x20\x02\x00\x05"),
             ("busy-5", 5, b"\x20\x03\x00\x89\x00"), ("busy-4", 4, b"\x20\x02\x00\x03"),
             ("badpw-5", 5, b"\x20\x03\x00\x86\x00"), ("badpw-4", 4, b"\x20\x02\x00\x04")]
    for cid, version, want in cases:
        o = U.try_connect(p.port, U.connect_packet(cid, version=version))
        assert o.connack == want and o.closed, (cid, o)
    assert U.try_connect(p.port, U.connect_packet("ok-1")).code == 0
    wait_id(mosquitto, "ok-1")
    p.wait_records(7)
    st = p.stats()
    assert (st["refused: banned device"], st["refused: too busy"], st["refused: bad credentials"]) == (2, 2, 2), st
    assert st["closed_denied"] == 6
    assert calls == [c for c, _, _ in cases] + ["ok-1"]
    assert ids_at(mosquitto) == ["ok-1"]


def test_stats_count_identity_and_policy_refusals_by_cause(certs, identity_certs, mosquitto, in_process, tmp_path):
    """Identity checks run before the hook; Proxy.stats() has one `refused: <why>` per cause."""
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("thing001\n")
    p = in_process({"upstream": mosquitto.upstream, **tls_raw(certs), "require_clientid_cn": True},
                   policy=PE.make_allow_list(str(allowed)))
    t1 = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    t2 = U.client_context(certs, cert=identity_certs.thing002_cert, key=identity_certs.thing002_key)
    assert U.try_connect(p.port, U.connect_packet("thing001", version=5), tls_ctx=t1).code == 0
    assert U.try_connect(p.port, U.connect_packet("other", version=5), tls_ctx=t1).code == 0x85
    assert U.try_connect(p.port, U.connect_packet("thing001", version=5), tls_ctx=U.client_context(certs)).code == 0x87
    assert U.try_connect(p.port, U.connect_packet("thing002", version=5), tls_ctx=t2).code == 0x87
    assert U.try_connect(p.port, U.connect_packet("thing002", version=4), tls_ctx=t2).code == 0x05
    p.wait_records(5)
    st = p.stats()
    refused = {k: v for k, v in st.items() if k.startswith("refused: ")}
    assert refused == {
        "refused: ClientId does not match certificate CN": 1,
        "refused: no verified client certificate": 1,
        "refused: ClientId not on the allow list": 2,
    }, refused
    assert st["closed_denied"] == 4 and st["closed_ok"] == 1, st
    assert ids_at(mosquitto) == ["thing001"]


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("value", [
    "nocolon",
    ":allow_list",
    f"{MOD}:",
    "no_such_module_fastproxy_test:fn",
    f"{MOD}:missing_function",
    f"{MOD}:NOT_CALLABLE",
    f"{MOD}:allow_list:extra",
])
@pytest.mark.parametrize("command", ["serve", "check"])
def test_bad_policy_values(certs, command, value):
    """A --policy that is not module:function, names a missing module or function, or something
    not callable: exit 2, one configuration-error line naming --policy, no traceback."""
    r = U.run_cli(command, "--listen", f"127.0.0.1:{U.free_port()}", "--upstream", "127.0.0.1:1883",
                  "--policy", value, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastproxy: configuration error: command line: --policy: "), lines[0]
    assert "listening" not in r.stdout + r.stderr


def test_policy_and_upstreams_in_config_file(certs, mosquitto_factory, run_fastproxy, tmp_path):
    """File keys: `policy = "mod:fn"` and an [upstreams] table; a bad policy names the key and file."""
    main, eu = mosquitto_factory(), mosquitto_factory()
    port = U.free_port()
    cfg = tmp_path / "fp.toml"
    cfg.write_text(f'listen = "127.0.0.1:{port}"\nupstream = "{main.upstream}"\npolicy = "{MOD}:route_eu"\n'
                   f'[upstreams]\neu = "{eu.upstream}"\n')
    fp = run_fastproxy("-c", str(cfg), port=port)
    assert U.try_connect(fp.port, U.connect_packet("eu-file")).code == 0
    assert U.try_connect(fp.port, U.connect_packet("main-file")).code == 0
    wait_id(eu, "eu-file")
    wait_id(main, "main-file")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'listen = "127.0.0.1:{port}"\nupstream = "{main.upstream}"\npolicy = "{MOD}:nope"\n')
    r = U.run_cli("check", "-c", str(bad))
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"fastproxy: configuration error: {bad}: policy: "), line


# ----------------------------------------------------------------------------- bad decisions


BAD_DECISIONS = {
    "client-id-with-nul": Allow(client_id="a\x00b"),
    "client-id-not-a-string": Allow(client_id=5),
    "client-id-too-long": Allow(client_id="x" * 70000),
    "reason-code-out-of-range": Deny(300, "out of range"),
    "reason-code-not-an-int": Deny("nope", "not an int"),
    # a refusal must never tell the client it was accepted (CONNACK 0x00 then close)
    "deny-with-success-code": Deny(ReasonCode.SUCCESS, "denied with code 0"),
}


@pytest.mark.parametrize("name", list(BAD_DECISIONS))
def test_invalid_decision_refuses_the_client_not_the_proxy(mosquitto, in_process, name):
    """A hook's decision that cannot be applied (a ClientId MQTT cannot carry, a reason code that
    is no reason code) is the hook's bug, like an exception: that client is refused (never with
    a success CONNACK), counted as policy-error, and the proxy keeps serving everyone else."""
    bad = BAD_DECISIONS[name]

    def hook(connect, cert, client):
        return bad if connect.client_id == "victim" else None

    p = in_process({"upstream": mosquitto.upstream}, policy=hook)
    o = U.try_connect(p.port, U.connect_packet("victim", version=5), timeout=5)
    assert o.code != 0, o
    o = U.try_connect(p.port, U.connect_packet("bystander", version=5), timeout=5)
    assert o.code == 0, f"the proxy no longer serves after a bad policy decision: {o}"
    wait_id(mosquitto, "bystander")
    assert "victim" not in ids_at(mosquitto)
    if name != "deny-with-success-code":
        assert p.stats().get("refused: policy-error") == 1, p.stats()


def test_prefixing_hook_and_long_clientid_do_not_crash_the_proxy(certs, mosquitto, start_proxy):
    """--policy with a hook that prefixes the ClientId ('tenant-a/' + id) and a larger
    --max-connect-size: a client whose 65,530-byte ClientId cannot be prefixed within MQTT's
    65,535-byte limit is refused; the proxy process keeps running and serving."""
    fp = start_proxy(mosquitto, "--policy", f"{MOD}:prefix_tenant", "--max-connect-size", "128KiB", tls=False,
                     allow_traceback=True)
    assert U.try_connect(fp.port, U.connect_packet("dev-1")).code == 0
    wait_id(mosquitto, "tenant-a/dev-1")
    o = U.try_connect(fp.port, U.connect_packet("L" * 65530), timeout=5)
    assert o.code != 0, o
    assert fp.wait(1.0) is None, f"the proxy exited with {fp.proc.returncode}:\n{fp.stderr()[-3000:]}"
    o = U.try_connect(fp.port, U.connect_packet("dev-2"), timeout=5)
    assert o.code == 0, f"the proxy stopped serving: {o}\n{fp.stderr()[-3000:]}"
    wait_id(mosquitto, "tenant-a/dev-2")


def test_refusal_counters_stay_bounded():
    """A hook whose Deny reason holds the ClientId makes one cause per client: past 64 distinct
    causes they are counted together, so stats() and /status stay bounded."""
    from fastproxy.server import _BoundedCounter

    c = _BoundedCounter()
    for i in range(200):
        c[f"device dev-{i} is not allowed"] += 1
    c["device dev-0 is not allowed"] += 1
    assert len(c) == 65 and sum(c.values()) == 201
    assert c[_BoundedCounter.OTHER] == 136 and c["device dev-0 is not allowed"] == 2
