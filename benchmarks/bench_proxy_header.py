"""PROXY protocol header build/parse cost (pytest-benchmark).

    python3 -m pytest benchmarks/bench_proxy_header.py --benchmark-columns=min,median,mean,ops

Two views of the same work:
- through the Python wrappers (what a Python caller pays: argument handling, bytes and
  dataclass creation), timed by pytest-benchmark per call;
- the C functions alone (what the engine pays per connection), timed in a C loop by
  fastproxy._proxyproto._bench_c and reported in extra_info as ns per call.

The header is a typical v2-ssl-cn one: TCP/IPv4 addresses, SSL TLV with client/verify,
VERSION "TLSv1.3", a 31-byte CN and the cipher name: 105 bytes.
"""
from __future__ import annotations

import pytest

pp = pytest.importorskip("fastproxy.proxy_protocol")
_c = pytest.importorskip("fastproxy._proxyproto")

SRC, DST = ("203.0.113.7", 51234), ("127.0.0.1", 8883)
SSL = pp.SSLInfo(client=pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS,
                 verify=0, version="TLSv1.3", cn="sensor-0042.plant-7.example.com",
                 cipher="TLS_AES_256_GCM_SHA384")
HEADER_V2 = pp.build_v2(SRC, DST, ssl=SSL)
HEADER_V1 = pp.build_v1(SRC, DST)


def test_build_v2_ssl_cn_python(benchmark):
    benchmark.extra_info["header_bytes"] = len(HEADER_V2)
    assert benchmark(pp.build_v2, SRC, DST, ssl=SSL) == HEADER_V2


def test_parse_v2_ssl_cn_python(benchmark):
    h = benchmark(pp.parse, HEADER_V2)
    assert h.ssl.cn == SSL.cn


def test_build_v1_python(benchmark):
    assert benchmark(pp.build_v1, SRC, DST) == HEADER_V1


def test_parse_v1_python(benchmark):
    assert benchmark(pp.parse, HEADER_V1).src_port == SRC[1]


@pytest.mark.parametrize("what", ["build_v2_ssl_cn", "parse_v2_ssl_cn", "build_v1", "parse_v1"])
def test_c_only(benchmark, what):
    n = 200_000
    ns = benchmark.pedantic(_c._bench_c, args=(what, n), rounds=10, iterations=1)
    benchmark.extra_info["n_per_round"] = n
    benchmark.extra_info["ns_per_call_last_round"] = round(ns, 1)
    benchmark.extra_info["ns_per_call_min"] = round(benchmark.stats.stats.min * 1e9 / n, 1)
    print(f"\n{what}: {benchmark.stats.stats.min * 1e9 / n:.1f} ns per call (C loop, best of 10)")
