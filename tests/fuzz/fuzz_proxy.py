"""Fuzz the PROXY protocol builder/parser (ext/src/proxy_v2.c). Not collected by pytest.

Two harnesses in one file (commands and results: docs/proxy-protocol.md, "Fuzzing"):

1. atheris (default), through the compiled module, on an ASan+UBSan, libFuzzer-instrumented
   build of fastproxy._proxyproto. Besides memory errors it checks invariants and compares
   every parse with the pure-Python reference parser (tests/pp_reference.py):

       python3 tests/fuzz/fuzz_proxy.py --make-seeds /tmp/pp-corpus
       LD_PRELOAD=$(python3 -c 'import atheris,os;print(os.path.join(atheris.path(),"asan_with_fuzzer.so"))') \\
       ASAN_OPTIONS=detect_leaks=0 python3 tests/fuzz/fuzz_proxy.py -atheris_runs=1000000 /tmp/pp-corpus

2. libFuzzer in plain C (`--libfuzzer`): writes a C harness next to a copy of proxy_v2.c,
   builds it with clang -fsanitize=fuzzer,address,undefined and runs it with the remaining
   arguments (e.g. -runs=20000000). Needs clang.

       python3 tests/fuzz/fuzz_proxy.py --libfuzzer -runs=20000000 /tmp/pp-corpus
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))      # import fastproxy from the work tree

C_HARNESS = r"""
#include "proxy_v2.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "invariant failed: %s (line %d)\n", #c, __LINE__); abort(); } } while (0)

static void check_parse(const uint8_t *d, size_t n, size_t max)
{
    pp_result r, r2;
    int rc = pp_parse_ex(d, n, max, &r);
    CHECK(rc == PP_VALID || rc == PP_NEED_MORE || rc == PP_INVALID);
    if (rc == PP_INVALID) {
        static uint8_t ext[70000];
        CHECK(r.reason != NULL);
        /* refusal is final: more bytes never make it valid or incomplete */
        if (n + 4 <= sizeof(ext)) {
            memcpy(ext, d, n);
            memcpy(ext + n, "\r\n\r\n", 4);
            CHECK(pp_parse_ex(ext, n + 4, max, &r2) == PP_INVALID);
        }
        return;
    }
    if (rc == PP_NEED_MORE)
        return;
    CHECK(r.header_len >= 15 && r.header_len <= n);
    CHECK(r.version == 1 || r.version == 2);
    if (r.version == 1)
        CHECK(r.header_len <= PP1_MAX_LEN);
    else
        CHECK(r.header_len <= max || max < PP2_HEADER_LEN);
    /* exactly the header is enough, one byte less is not */
    CHECK(pp_parse_ex(d, r.header_len, max, &r2) == PP_VALID && r2.header_len == r.header_len);
    CHECK(pp_parse_ex(d, r.header_len - 1, max, &r2) == PP_NEED_MORE);
    if (r.tlv) {
        pp_tlv_iter it; pp_tlv t; int k;
        CHECK(r.tlv >= d && r.tlv + r.tlv_len == d + r.header_len);
        pp_tlv_iter_init(&it, r.tlv, r.tlv_len);
        while ((k = pp_tlv_next(&it, &t)) == 1) {
            CHECK(t.value + t.len <= d + r.header_len);
            if (t.type == PP2_TYPE_SSL) {
                pp_tlv_iter sub; pp_tlv s; uint8_t c; uint32_t v;
                CHECK(pp_tlv_ssl_open(&t, &c, &v, &sub) == 0);
                while ((k = pp_tlv_next(&sub, &s)) == 1)
                    CHECK(s.value + s.len <= t.value + t.len);
                CHECK(k == 0);   /* sub-TLVs were validated by the parser */
            }
        }
        CHECK(k == 0);           /* TLVs fill the area exactly */
    }
}

static void check_build(const uint8_t *d, size_t n)
{
    static const uint8_t fams[7] = { 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32 };
    pp2_info info;
    uint8_t out[70000];
    char line[128];
    pp_result r;
    size_t pos = 0;
    int len;
    if (n < 8)
        return;
    pp2_info_init(&info);
    info.command = d[0] & 1;
    info.fam = fams[d[1] % 7];
    info.flags = d[2] & 3;
    info.ssl_client = d[3];
    info.ssl_verify = (uint32_t)d[4] << 24 | d[5];
    info.src_port = (uint16_t)(d[6] << 8 | d[7]);
    info.dst_port = (uint16_t)(d[7] << 8 | d[6]);
    info.max_len = PP2_MAX_HEADER_LEN;
    pos = 8;
    memcpy(info.src_addr, d + pos, n - pos < 108 ? n - pos : 108);
    memcpy(info.dst_addr, d + (n - pos < 108 ? pos : n - 108), n - pos < 108 ? n - pos : 108);
    {
        /* split the rest into string fields by length bytes */
        pp_str *fields[9] = { &info.alpn, &info.authority, &info.unique_id, &info.ssl_version,
                              &info.ssl_cn, &info.ssl_key_alg, &info.ssl_sig_alg, &info.ssl_cipher,
                              &info.netns };
        int i;
        for (i = 0; i < 9 && pos < n; i++) {
            size_t l = d[pos++];
            if (l == 255) continue;     /* absent */
            if (l > n - pos) l = n - pos;
            fields[i]->ptr = d + pos;
            fields[i]->len = l;
            pos += l;
        }
        if (pos < n && (d[pos] & 1)) info.noop_len = d[pos];
    }
    len = pp2_build(&info, out, sizeof(out));
    if (len == PP_ERR_ARG)             /* authority > 255 or unique id > 128 */
        return;
    CHECK(len > 0 && (long)len == pp2_build_size(&info));
    CHECK(pp2_build(&info, out, (size_t)len - 1) == PP_ERR_CAP);
    CHECK(pp_parse_ex(out, (size_t)len, PP2_MAX_HEADER_LEN, &r) == PP_VALID);
    CHECK(r.header_len == (size_t)len && r.command == info.command && r.fam == info.fam);
    if ((info.fam & 0xF0) == 0x10 || (info.fam & 0xF0) == 0x20) {
        size_t al = (info.fam & 0xF0) == 0x10 ? 4 : 16;
        CHECK(r.src_port == info.src_port && r.dst_port == info.dst_port);
        CHECK(memcmp(r.src_addr, info.src_addr, al) == 0 && memcmp(r.dst_addr, info.dst_addr, al) == 0);
    }
    CHECK(!!r.has_crc32c == !!(info.flags & PP2_F_CRC32C));
    len = pp1_build(&info, line, sizeof(line));
    CHECK(len > 0 && len <= PP1_MAX_LEN);
    CHECK(pp_parse_ex((const uint8_t *)line, (size_t)len, 4096, &r) == PP_VALID && r.header_len == (size_t)len);
    if (info.command == PP2_CMD_PROXY && (info.fam == PP2_TCP4 || info.fam == PP2_TCP6)) {
        size_t al = info.fam == PP2_TCP4 ? 4 : 16;
        CHECK(r.fam == info.fam && r.src_port == info.src_port && r.dst_port == info.dst_port);
        CHECK(memcmp(r.src_addr, info.src_addr, al) == 0 && memcmp(r.dst_addr, info.dst_addr, al) == 0);
    } else {
        CHECK(r.fam == PP2_AF_UNSPEC);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
    if (n == 0)
        return 0;
    switch (d[0] & 3) {
    case 0: check_parse(d + 1, n - 1, PP_PARSE_DEFAULT_MAX); break;
    case 1: check_parse(d + 1, n - 1, (size_t)d[0] * 4); break;
    case 2: check_build(d + 1, n - 1); break;
    default: {
        /* a valid v2 prefix followed by fuzz: reaches the TLV walker quickly */
        uint8_t buf[4096];
        size_t m = n - 1 > sizeof(buf) - 28 ? sizeof(buf) - 28 : n - 1;
        memcpy(buf, PP2_SIGNATURE, 12);
        buf[12] = 0x21; buf[13] = 0x11;
        buf[14] = (uint8_t)((12 + m) >> 8); buf[15] = (uint8_t)(12 + m);
        memset(buf + 16, 7, 12);
        memcpy(buf + 28, d + 1, m);
        check_parse(buf, 28 + m, sizeof(buf));
        break;
    }
    }
    return 0;
}
"""


def run_libfuzzer(args: list[str]) -> int:
    clang = shutil.which("clang")
    if not clang:
        sys.exit("fuzz_proxy: --libfuzzer needs clang (apt-get install clang)")
    work = Path(tempfile.mkdtemp(prefix="pp-libfuzzer-"))
    (work / "harness.c").write_text(C_HARNESS)
    exe = work / "fuzz_proxy_c"
    cmd = [clang, "-g", "-O1", "-std=c99", "-Wall", "-fsanitize=fuzzer,address,undefined",
           "-fno-sanitize-recover=undefined", f"-I{REPO / 'ext' / 'src'}",
           str(work / "harness.c"), str(REPO / "ext" / "src" / "proxy_v2.c"), "-o", str(exe)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return subprocess.run([str(exe), *args]).returncode


SEEDS = {
    "v2_ipv4": None, "v2_ssl_cn": None, "v2_unix": None, "v2_local": None,
    "v1_tcp4": b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
    "v1_tcp6": b"PROXY TCP6 2001:db8::1 ::ffff:1.2.3.4 1 2\r\n",
    "v1_unknown": b"PROXY UNKNOWN\r\n",
}


def make_seeds(directory: str) -> None:
    from fastproxy import proxy_protocol as pp
    SEEDS["v2_ipv4"] = pp.build_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    SEEDS["v2_ssl_cn"] = pp.build_v2(
        ("2001:db8::1", 1), ("2001:db8::2", 2), crc32c=True, alpn=b"mqtt", authority="a.example",
        unique_id=b"u1", netns="n",
        ssl=pp.SSLInfo(client=7, verify=0, version="TLSv1.3", cn="sensor-1", key_alg="EC256",
                       sig_alg="ecdsa-with-SHA256", cipher="TLS_AES_256_GCM_SHA384"))
    SEEDS["v2_unix"] = pp.build_v2("/a", "/b")
    SEEDS["v2_local"] = pp.build_v2()
    os.makedirs(directory, exist_ok=True)
    for name, blob in SEEDS.items():
        for mode in (0, 1):     # first byte selects the atheris/libFuzzer mode
            Path(directory, f"{name}_{mode}").write_bytes(bytes([mode]) + blob)
    print(f"wrote {2 * len(SEEDS)} seeds to {directory}")


def _text(packed: bytes) -> str:
    import socket
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def run_atheris() -> None:
    import atheris

    sys.path.insert(0, str(HERE.parent))
    with atheris.instrument_imports(include=["fastproxy", "pp_reference"]):
        from fastproxy import proxy_protocol as pp
        from fastproxy.errors import InvalidProxyHeaderError, ProxyProtocolError
        import pp_reference as ref

    def outcome(fn, blob, max_length):
        try:
            return ("ok", fn(blob, max_length=max_length))
        except (InvalidProxyHeaderError, ref.Invalid):
            return ("invalid", None)

    def one_input(data: bytes) -> None:
        if not data:
            return
        mode, blob = data[0] & 3, data[1:]
        if mode in (0, 1):
            max_length = 4096 if mode == 0 else 16 + data[0] * 2
            ours = outcome(pp.parse, blob, max_length)
            if len(blob) <= 600:
                theirs = outcome(ref.parse, blob, max_length)
                if ours != theirs:
                    raise AssertionError(f"compiled {ours!r} != reference {theirs!r} for {blob!r}")
            if ours[0] == "ok" and ours[1] is not None:
                h = ours[1]
                assert 15 <= h.length <= len(blob)
                assert pp.parse(blob[:h.length], max_length=max_length) == h
                assert pp.parse(blob[:h.length - 1], max_length=max_length) is None
            return
        fdp = atheris.FuzzedDataProvider(blob)
        if mode == 2:
            def ip():
                return (bytes(fdp.ConsumeBytes(4)) if fdp.ConsumeBool() else bytes(fdp.ConsumeBytes(16)))
            src_ip, dst_ip = ip(), ip()
            if len(src_ip) not in (4, 16) or len(dst_ip) not in (4, 16):
                return
            src = (src_ip, fdp.ConsumeIntInRange(0, 65535))
            dst = (dst_ip, fdp.ConsumeIntInRange(0, 65535))
            kw = {}
            for name in ("alpn", "authority", "unique_id", "netns"):
                if fdp.ConsumeBool():
                    kw[name] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
            if fdp.ConsumeBool():
                kw["ssl"] = pp.SSLInfo(
                    client=fdp.ConsumeIntInRange(0, 255), verify=fdp.ConsumeIntInRange(0, 2**32 - 1),
                    version=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20)) if fdp.ConsumeBool() else None,
                    cn=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)) if fdp.ConsumeBool() else None,
                    cipher=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)) if fdp.ConsumeBool() else None)
            kw["crc32c"] = fdp.ConsumeBool()
            max_length = fdp.ConsumeIntInRange(16, 2000)
            try:
                hdr = pp.build_v2(src, dst, max_length=max_length, **kw)
            except ProxyProtocolError:
                return
            assert len(hdr) <= max_length
            h = pp.parse(hdr, max_length=max_length)
            assert h is not None and h.length == len(hdr) and h.src_port == src[1]
        else:
            def ip4or6():
                b = bytes(fdp.ConsumeBytes(16 if fdp.ConsumeBool() else 4))
                return b if len(b) in (4, 16) else b"\0" * 4
            src = (ip4or6(), fdp.ConsumeIntInRange(0, 65535))
            dst = (ip4or6(), fdp.ConsumeIntInRange(0, 65535))
            line = pp.build_v1(src, dst)
            h = pp.parse(line)
            assert h.length == len(line) <= 107 and (h.src_port, h.dst_port) == (src[1], dst[1])
            assert ref.parse(line) == h
            assert ref.build_v1((_text(src[0]), src[1]), (_text(dst[0]), dst[1])) == line

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    if "--libfuzzer" in sys.argv:
        sys.exit(run_libfuzzer([a for a in sys.argv[1:] if a != "--libfuzzer"]))
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(sys.argv[2])
        sys.exit(0)
    run_atheris()
