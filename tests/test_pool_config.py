"""Configuration of upstream pools: server options, source ranges, defaults and cross-checks.

In-process (build_config / load_config); the end-to-end behaviour is in test_pools.py and
test_failover.py.
"""
from __future__ import annotations

import pytest

from fastproxy.config import Address, ServerConfig, build_config, load_config, parse_server, parse_sources
from fastproxy.errors import ConfigError

BASE = {"listen": "127.0.0.1:18830"}


def cfg(**kw):
    return build_config({**BASE, **kw}).listeners[0]


def test_server_options_flag_syntax():
    sv = parse_server("10.0.0.12:1883,weight=2,backup,maxconn=500,proxy-protocol=v2")
    assert sv == ServerConfig(Address("10.0.0.12", 1883), weight=2, backup=True, max_connections=500,
                              proxy_protocol="v2")
    assert parse_server("[::1]:1883 weight=3").weight == 3
    assert parse_server("unix:/run/m.sock,backup").address == Address(path="/run/m.sock")
    assert str(parse_server("127.0.0.1:1883,weight=9")) == "127.0.0.1:1883"   # the balancer's key


def test_server_options_table_syntax(tmp_path):
    p = tmp_path / "f.toml"
    p.write_text('listen = "127.0.0.1:18831"\n'
                 'upstream = ["127.0.0.1:1883", {address = "127.0.0.1:1884", weight = 2, backup = true,'
                 ' max_connections = 10, proxy_protocol = "v2-ssl-cn"}]\n')
    lc = load_config(str(p)).listeners[0]
    assert [str(s) for s in lc.servers] == ["127.0.0.1:1883", "127.0.0.1:1884"]
    assert lc.upstream == Address("127.0.0.1", 1883)
    assert lc.servers[1] == ServerConfig(Address("127.0.0.1", 1884), 2, True, 10, "v2-ssl-cn")


@pytest.mark.parametrize("value, problem", [
    ("127.0.0.1:1883,weight=0", "weight must be 1-256"),
    ("127.0.0.1:1883,weight=x", "weight must be 1-256"),
    ("127.0.0.1:1883,wieght=2", "did you mean 'weight'"),
    ("127.0.0.1:1883,maxconn=-1", "max_connections"),
    ("127.0.0.1:1883,proxy-protocol=v3", "proxy_protocol must be one of"),
    ("127.0.0.1", "missing port"),
])
def test_bad_server_options(value, problem):
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "upstream": [value]})
    assert "--upstream" in str(e.value) and problem in str(e.value)


def test_file_errors_name_the_key(tmp_path):
    p = tmp_path / "f.toml"
    p.write_text('listen = "127.0.0.1:18831"\nupstream = [{address = "127.0.0.1:1", weight = 300}]\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(e.value).startswith(f"{p}: upstream: ") and "weight" in str(e.value)
    p.write_text('[[listener]]\nlisten = "127.0.0.1:18831"\nupstream = "127.0.0.1:1"\nbalance = "random"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "listener[0].balance" in str(e.value) and "clientid, round-robin, least-conn, source" in str(e.value)


def test_duplicate_server_refused():
    with pytest.raises(ConfigError, match="listed twice"):
        build_config({**BASE, "upstream": ["127.0.0.1:1883", "127.0.0.1:1883,weight=2"]})


def test_defaults():
    one = cfg(upstream="127.0.0.1:1883")
    assert one.balance == "clientid" and one.health_interval == 0 and one.retries == 3
    pool = cfg(upstream=["127.0.0.1:1883", "127.0.0.1:1884"])
    assert pool.health_interval == 2.0          # a pool is checked unless told otherwise
    assert cfg(upstream=["127.0.0.1:1883", "127.0.0.1:1884"], health_interval="0").health_interval == 0
    assert cfg(upstream="127.0.0.1:1883", mqtt="off").balance == "round-robin"
    # the check a blind relay's broker can answer (it may speak TLS or WebSocket itself)
    assert cfg(upstream="127.0.0.1:1883").health_check == "mqtt"
    assert cfg(upstream="127.0.0.1:1883", mqtt="off").health_check == "tcp"
    assert cfg(upstream="127.0.0.1:1883", mqtt="off", health_check="mqtt").health_check == "mqtt"
    assert cfg(upstream="127.0.0.1:1883").health_check_identity == "fastproxy-health"


def test_cross_checks():
    with pytest.raises(ConfigError, match="--balance: clientid needs MQTT awareness"):
        cfg(upstream="127.0.0.1:1883", mqtt="off", balance="clientid")
    with pytest.raises(ConfigError, match="--on-marked-down: needs health checks"):
        cfg(upstream="127.0.0.1:1883", on_marked_down="shutdown-sessions")
    with pytest.raises(ConfigError, match="--upstream-source: has no address of server"):
        cfg(upstream="[::1]:1883", upstream_source="127.0.0.2")
    with pytest.raises(ConfigError, match="every server is a unix socket"):
        cfg(upstream="unix:/tmp/x.sock", upstream_source="127.0.0.2")


def test_source_ranges():
    assert parse_sources("127.0.0.2-127.0.0.5") == ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
    assert parse_sources(["10.0.0.1", "10.0.0.3-10.0.0.4"]) == ("10.0.0.1", "10.0.0.3", "10.0.0.4")
    assert parse_sources("::1,fd00::1-fd00::2") == ("::1", "fd00::1", "fd00::2")
    for bad, problem in [("127.0.0.5-127.0.0.2", "bad range"), ("127.0.0.1-::1", "bad range"),
                         ("10.0.0.0-10.0.1.255", "more than 256"), ("foo", "not an address"),
                         ("10.0.0.1,10.0.0.1", "listed twice")]:
        with pytest.raises(ValueError, match=problem):
            parse_sources(bad)


def test_admin_must_be_loopback():
    assert build_config({**BASE, "upstream": "127.0.0.1:1", "admin": "8404"}).admin == Address("127.0.0.1", 8404)
    assert build_config({**BASE, "upstream": "127.0.0.1:1", "admin": "[::1]:8404"}).admin == Address("::1", 8404)
    with pytest.raises(ConfigError, match="--admin: 10.1.2.3:8404 is not a loopback address"):
        build_config({**BASE, "upstream": "127.0.0.1:1", "admin": "10.1.2.3:8404"})


def test_source_address_must_be_local():
    """`fastproxy check` binds each source address: one that is not this host's is named."""
    from fastproxy.server import check_config

    good = build_config({**BASE, "upstream": "127.0.0.1:1", "upstream_source": "127.0.0.2-127.0.0.3"})
    assert check_config(good) == []
    bad = build_config({**BASE, "upstream": "127.0.0.1:1", "upstream_source": "192.0.2.77"})
    with pytest.raises(ConfigError, match=r"--upstream-source: cannot use 192.0.2.77 as a source address"):
        check_config(bad)


@pytest.mark.parametrize("value", ["", "x" * 65, "health\ncheck", "a\x7fb"])
def test_health_check_identity_must_be_a_cn(value):
    with pytest.raises(ConfigError, match="--health-check-identity: expected a certificate CN"):
        cfg(upstream="127.0.0.1:1883", health_check_identity=value)


def test_health_interval_bounds():
    with pytest.raises(ConfigError, match="--health-interval: must be 0 .no checks. or at least 50ms"):
        cfg(upstream=["127.0.0.1:1883", "127.0.0.1:1884"], health_interval="10ms")
    with pytest.raises(ConfigError, match="--health-timeout: must be greater than 0"):
        cfg(upstream=["127.0.0.1:1883", "127.0.0.1:1884"], health_timeout="0")
