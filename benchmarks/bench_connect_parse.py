"""ns per CONNECT: the compiled MQTT CONNECT parser on a typical 3.1.1 and a typical 5.0 CONNECT.

Not part of the default test run (tests/ is). Run with pytest-benchmark:

    python3 -m pytest benchmarks/bench_connect_parse.py --benchmark-columns=min,mean,median,ops

Two figures per packet:
  parse_connect   the Python API: C parse + building the ConnectInfo dataclass (what Python
                  code pays);
  C parser only   fastproxy._mqtt._parse_repeat runs mqtt_parse_connect() 1000 times per
                  round without creating Python objects (what the engine pays); its
                  extra_info["ns_per_connect"] is the per-CONNECT time.
"""
from __future__ import annotations

import pytest

from fastproxy import _mqtt, mqtt


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


_PASSWORD = b"s3cr3t-t0k3n-0123456789"
_PAYLOAD = _lp(b"sensor-0042-a1b2c3") + _lp(b"device42") + _lp(_PASSWORD)

# A typical device CONNECT: ClientId, user name and password, keep alive 60, clean session.
_BODY311 = _lp(b"MQTT") + b"\x04" + b"\xc2" + b"\x00\x3c" + _PAYLOAD
V311 = b"\x10" + bytes([len(_BODY311)]) + _BODY311

# The same in MQTT 5.0 with the properties clients commonly send: Session Expiry Interval,
# Receive Maximum, Topic Alias Maximum, one User Property.
_PROPS = (
    b"\x11\x00\x00\x0e\x10"
    + b"\x21\x00\x14"
    + b"\x22\x00\x0a"
    + b"\x26" + _lp(b"fw") + _lp(b"1.4.2")
)
_BODY5 = _lp(b"MQTT") + b"\x05" + b"\xc2" + b"\x00\x3c" + bytes([len(_PROPS)]) + _PROPS + _PAYLOAD
V5 = b"\x10" + bytes([len(_BODY5)]) + _BODY5

PACKETS = {"3.1.1": V311, "5.0": V5}
LOOP = 1000


def test_packets_are_valid():
    for name, data in PACKETS.items():
        info = mqtt.parse_connect(data)
        assert info is not None and info.packet_length == len(data), name


@pytest.mark.parametrize("version", list(PACKETS))
def test_parse_connect(benchmark, version):
    data = PACKETS[version]
    info = benchmark(mqtt.parse_connect, data)
    assert info.client_id == "sensor-0042-a1b2c3"
    benchmark.extra_info["packet_bytes"] = len(data)


@pytest.mark.parametrize("version", list(PACKETS))
def test_c_parser_only(benchmark, version):
    data = PACKETS[version]
    assert benchmark(_mqtt._parse_repeat, data, LOOP) == 1  # MQTT_VALID
    benchmark.extra_info["packet_bytes"] = len(data)
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_connect"] = round(benchmark.stats.stats.min * 1e9 / LOOP, 1)


@pytest.mark.parametrize("version", list(PACKETS))
def test_incomplete_and_invalid(benchmark, version):
    """Early exits: half a CONNECT (need more) costs less than a whole one."""
    data = PACKETS[version][: len(PACKETS[version]) // 2]
    assert benchmark(_mqtt._parse_repeat, data, LOOP) == 0  # MQTT_NEED_MORE
