#!/usr/bin/env python3
"""ns per frame: the WebSocket codec of ext/src/ws.c (decode masked client frames, write server
frame headers) and ns per upgrade request (the HTTP request parser).

    python3 benchmarks/bench_ws_codec.py                 # about 10 s
    python3 benchmarks/bench_ws_codec.py --json ws.json --reps 7

ws.c has no Python wrapper, so this compiles a small C driver against it at run time
(`gcc -O2 -Iext/src ext/src/ws.c driver.c`, into a temp dir, with the flags of --cflags) that
times N iterations of each case with clock_gettime(CLOCK_MONOTONIC) and prints JSON; this script
prints ns per frame (per request) and MB/s of payload. Each case is run --reps times (separate
processes, interleaved); the table gives the median and the min..max.

Cases:
  decode 64 B / 1 KiB   one buffer holding --frames masked binary client frames (each carrying one
                        MQTT PUBLISH of that payload size, 4 different masking keys), decoded by
                        ws_decode() in one call per buffer, as the engine sees one read of a burst;
                        the output buffer is as large as the payloads, so each call runs to the end.
                        The driver checks that the unmasked output equals the plain payloads.
  decode 64 B split     the same 64 B buffer fed in 1500-byte pieces (frames cut anywhere, headers
                        included), to show the cost of partial frames between reads.
  header 64 B / 1 KiB   ws_frame_header() for a server frame of that payload (2 / 4 header bytes);
                        the engine writes one per relayed chunk toward the client.
  upgrade request       ws_parse_request() + ws_pick_protocol() on a typical browser upgrade request
                        (MQTT.js-like: Host, Upgrade, Connection, Key, Version, Protocol, Origin,
                        User-Agent, ...), and on the minimal request of mosquitto_pub --ws.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SRC = os.path.join(REPO, "ext", "src")

DRIVER = r"""
#define _POSIX_C_SOURCE 199309L
#include "ws.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static volatile size_t sink;

/* frames masked binary client frames, each an MQTT PUBLISH ("bench/ws", payload bytes of 'x') */
static size_t build(uint8_t *buf, int frames, size_t payload, uint8_t *plain, size_t *plain_len)
{
    static const uint8_t masks[4][4] = {{0x12, 0x34, 0x56, 0x78}, {0x9a, 0xbc, 0xde, 0xf0},
                                        {0x0f, 0x1e, 0x2d, 0x3c}, {0xa5, 0x5a, 0xc3, 0x3c}};
    uint8_t pkt[2048];
    size_t n = 0, p = 0, body = 2 + 8 + payload, at = 0;
    int f;
    pkt[at++] = 0x30;
    if (body < 128) {
        pkt[at++] = (uint8_t)body;
    } else {
        pkt[at++] = (uint8_t)(0x80 | (body & 0x7f));
        pkt[at++] = (uint8_t)(body >> 7);
    }
    pkt[at++] = 0;
    pkt[at++] = 8;
    memcpy(pkt + at, "bench/ws", 8);
    at += 8;
    memset(pkt + at, 'x', payload);
    at += payload;
    for (f = 0; f < frames; f++) {
        const uint8_t *m = masks[f & 3];
        size_t k;
        buf[n++] = 0x82;
        if (at < 126) {
            buf[n++] = (uint8_t)(0x80 | at);
        } else {
            buf[n++] = 0x80 | 126;
            buf[n++] = (uint8_t)(at >> 8);
            buf[n++] = (uint8_t)at;
        }
        memcpy(buf + n, m, 4);
        n += 4;
        for (k = 0; k < at; k++)
            buf[n + k] = pkt[k] ^ m[k & 3];
        n += at;
        memcpy(plain + p, pkt, at);
        p += at;
    }
    *plain_len = p;
    return n;
}

static int decode_case(const char *name, size_t payload, int frames, long iters, size_t piece)
{
    size_t cap = (size_t)frames * (payload + 32);
    uint8_t *in = malloc(cap), *out = malloc(cap), *plain = malloc(cap);
    size_t in_len, plain_len, total_out = 0;
    long it;
    double t0, t1;
    ws_decoder d;
    if (!in || !out || !plain)
        return 1;
    in_len = build(in, frames, payload, plain, &plain_len);
    for (it = -1; it < iters; it++) { /* it == -1: warm-up and check */
        size_t off = 0, o = 0;
        if (it == 0)
            t0 = now_ns();
        memset(&d, 0, sizeof d);
        d.max_frame = 1 << 20;
        while (off < in_len) {
            size_t len = in_len - off, used, made;
            int r;
            if (piece && len > piece)
                len = piece;
            r = ws_decode(&d, in + off, len, &used, out + o, cap - o, &made);
            if (r != WS_D_DATA || used != len) {
                fprintf(stderr, "%s: ws_decode returned %d (used %zu of %zu)\n", name, r, used, len);
                return 1;
            }
            off += used;
            o += made;
        }
        if (it == -1 && (o != plain_len || memcmp(out, plain, o) != 0)) {
            fprintf(stderr, "%s: decoded output differs from the plain packets\n", name);
            return 1;
        }
        total_out += o;
    }
    t1 = now_ns();
    sink += total_out;
    printf("{\"case\": \"%s\", \"kind\": \"decode\", \"payload\": %zu, \"frames\": %d, \"iters\": %ld, "
           "\"wire_bytes\": %zu, \"mqtt_bytes\": %zu, \"piece\": %zu, \"ns\": %.0f}\n",
           name, payload, frames, iters, in_len, plain_len, piece, t1 - t0);
    free(in);
    free(out);
    free(plain);
    return 0;
}

static int header_case(const char *name, size_t payload, long iters)
{
    uint8_t out[WS_SERVER_HEADER_MAX * 64];
    size_t acc = 0;
    long it;
    double t0, t1;
    t0 = now_ns();
    for (it = 0; it < iters; it++) {
        /* vary the length and the slot so that the call is not hoisted out of the loop */
        acc += ws_frame_header(out + (it & 63) * WS_SERVER_HEADER_MAX, WS_OP_BINARY, payload + (it & 7));
    }
    t1 = now_ns();
    sink += acc + out[(iters - 1) & 63];
    printf("{\"case\": \"%s\", \"kind\": \"header\", \"payload\": %zu, \"frames\": 1, \"iters\": %ld, "
           "\"header_bytes\": %zu, \"ns\": %.0f}\n", name, payload, iters, acc / (size_t)iters, t1 - t0);
    return 0;
}

static int request_case(const char *name, const char *req, long iters)
{
    size_t len = strlen(req), acc = 0;
    long it;
    double t0, t1;
    ws_request r;
    if (ws_parse_request(req, len, &r) != WS_OK || ws_pick_protocol(r.protocols) == NULL) {
        fprintf(stderr, "%s: the request does not parse\n", name);
        return 1;
    }
    t0 = now_ns();
    for (it = 0; it < iters; it++) {
        int rc = ws_parse_request(req, len, &r);
        acc += (size_t)rc + r.length + (ws_pick_protocol(r.protocols) != NULL);
    }
    t1 = now_ns();
    sink += acc;
    printf("{\"case\": \"%s\", \"kind\": \"request\", \"payload\": 0, \"frames\": 1, \"iters\": %ld, "
           "\"request_bytes\": %zu, \"ns\": %.0f}\n", name, iters, len, t1 - t0);
    return 0;
}

static const char BROWSER[] =
    "GET /mqtt HTTP/1.1\r\n"
    "Host: broker.example.com:8884\r\n"
    "Connection: Upgrade\r\n"
    "Pragma: no-cache\r\n"
    "Cache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36\r\n"
    "Upgrade: websocket\r\n"
    "Origin: https://app.example.com\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\n"
    "Accept-Language: en-US,en;q=0.9\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    "Sec-WebSocket-Protocol: mqtt\r\n"
    "\r\n";

static const char MINIMAL[] =
    "GET /mqtt HTTP/1.1\r\n"
    "Host: 127.0.0.1:8884\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: mqtt\r\n"
    "\r\n";

int main(int argc, char **argv)
{
    int frames = argc > 1 ? atoi(argv[1]) : 256;
    double scale = argc > 2 ? atof(argv[2]) : 1.0;
    long n_dec64 = (long)(4000 * scale), n_dec1k = (long)(1000 * scale);
    long n_hdr = (long)(20000000 * scale), n_req = (long)(200000 * scale);
    int rc = 0;
    rc |= decode_case("decode 64 B", 64, frames, n_dec64, 0);
    rc |= decode_case("decode 1 KiB", 1024, frames, n_dec1k, 0);
    rc |= decode_case("decode 64 B, 1500 B reads", 64, frames, n_dec64, 1500);
    rc |= header_case("header 64 B", 64, n_hdr);
    rc |= header_case("header 1 KiB", 1024, n_hdr);
    rc |= request_case("upgrade request, browser-like", BROWSER, n_req);
    rc |= request_case("upgrade request, mosquitto_pub --ws-like", MINIMAL, n_req);
    return rc;
}
"""


def build(tmp: str, cc: str, cflags: list[str]) -> str:
    drv = os.path.join(tmp, "driver.c")
    with open(drv, "w") as f:
        f.write(DRIVER)
    exe = os.path.join(tmp, "bench_ws")
    cmd = [cc, *cflags, f"-I{SRC}", os.path.join(SRC, "ws.c"), drv, "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        sys.exit(f"compiling the driver failed:\n{' '.join(cmd)}\n{r.stderr}")
    return exe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=256, help="frames per decoded buffer (default 256)")
    p.add_argument("--scale", type=float, default=1.0, help="iterations x this (default 1: ~1 s per rep)")
    p.add_argument("--reps", type=int, default=5, help="runs of the driver; the table shows the median")
    p.add_argument("--cc", default=os.environ.get("CC", "gcc"))
    p.add_argument("--cflags", default="-O2", help="compiler flags (default -O2)")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    if not shutil.which(a.cc):
        sys.exit(f"{a.cc} not found")
    tmp = tempfile.mkdtemp(prefix="bench-ws-")
    try:
        exe = build(tmp, a.cc, a.cflags.split())
        runs: dict[str, list[dict]] = {}
        for _ in range(a.reps):
            r = subprocess.run([exe, str(a.frames), str(a.scale)], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                sys.exit(f"driver failed: {r.stderr}")
            for line in r.stdout.splitlines():
                d = json.loads(line)
                runs.setdefault(d["case"], []).append(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for case, ds in runs.items():
        d0 = ds[0]
        per = [d["ns"] / (d["iters"] * d["frames"]) for d in ds]  # ns per frame (per request)
        row = {"case": case, "kind": d0["kind"], "payload": d0["payload"], "reps": len(ds),
               "ns_per_unit": statistics.median(per), "ns_min": min(per), "ns_max": max(per)}
        if d0["kind"] == "decode":
            row["frames_per_buffer"] = d0["frames"]
            row["wire_bytes_per_frame"] = d0["wire_bytes"] / d0["frames"]
            row["mqtt_bytes_per_frame"] = d0["mqtt_bytes"] / d0["frames"]
            row["piece"] = d0["piece"]
            # MB/s of decoded output (the MQTT bytes; 1 MB = 10^6 bytes)
            row["mb_per_s"] = row["mqtt_bytes_per_frame"] / row["ns_per_unit"] * 1e3
        elif d0["kind"] == "header":
            row["header_bytes"] = d0["header_bytes"]
        else:
            row["request_bytes"] = d0["request_bytes"]
            row["mb_per_s"] = d0["request_bytes"] / row["ns_per_unit"] * 1e3
        rows.append(row)
    cc_ver = subprocess.run([a.cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"ext/src/ws.c, {a.cc} {a.cflags} ({cc_ver}); {os.cpu_count()} CPU(s); median of {a.reps} runs "
          f"(min..max); load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':<42}{'ns/frame':>10}{'min..max':>18}{'MB/s':>9}  notes")
    for r in rows:
        unit = r["ns_per_unit"]
        rng = f"{r['ns_min']:.1f}..{r['ns_max']:.1f}"
        mbs = f"{r['mb_per_s']:,.0f}" if "mb_per_s" in r else "-"
        if r["kind"] == "decode":
            note = (f"{r['wire_bytes_per_frame']:.0f} B frame -> {r['mqtt_bytes_per_frame']:.0f} B MQTT, "
                    f"{r['frames_per_buffer']} frames/buffer" + (f", fed in {r['piece']} B pieces" if r["piece"] else ""))
        elif r["kind"] == "header":
            note = f"{r['header_bytes']} header bytes"
        else:
            note = f"ns per request; {r['request_bytes']} B (MB/s of request bytes)"
        print(f"{r['case']:<42}{unit:>10.1f}{rng:>18}{mbs:>9}  {note}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cc": cc_ver, "cflags": a.cflags, "reps": a.reps, "frames": a.frames, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
