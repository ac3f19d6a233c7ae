/*
 * libFuzzer harness for ws.c (not part of any extension module; scripts/fuzz builds it):
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *         -Iext/src ext/src/fuzz_ws.c ext/src/ws.c -o build/fuzz_ws
 *
 * Input: byte 0 selects the target (even: the upgrade request parser, odd: the frame
 * decoder), byte 1 the decoder's output chunk size and max_frame; the rest is the untrusted
 * bytes, copied into a heap block of exactly their size (AddressSanitizer sees a read one byte
 * past the end). Besides "no crash" it checks the promises callers rely on:
 *   - request: WS_OK spans lie inside the request, length <= the input, and a prefix of the
 *     request gives WS_NEED_MORE or an error, never another WS_OK with a different length;
 *     ws_pick_protocol answers only "mqtt" / "mqttv3.1".
 *   - frames: consumed <= given, produced <= room; feeding the same bytes in pieces of any
 *     size gives the same message bytes and the same outcome (the decoder keeps its state
 *     between calls); control payloads stay within 125 bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ws.h"

#define CHECK(cond)                \
    do {                           \
        if (!(cond))               \
            __builtin_trap();      \
    } while (0)

static void check_span(const char *buf, size_t len, ws_span s)
{
    if (s.ptr == NULL)
        return;
    CHECK(s.ptr >= buf && s.ptr <= buf + len && s.len <= (size_t)(buf + len - s.ptr));
}

static void fuzz_request(const uint8_t *data, size_t n)
{
    char *buf = malloc(n ? n : 1);
    ws_request r, r2;
    int st, st2;
    if (!buf)
        return;
    memcpy(buf, data, n);
    st = ws_parse_request(buf, n, &r);
    CHECK(st <= WS_NEED_MORE && st >= WS_E_ORIGIN);
    if (st == WS_OK) {
        const char *p = ws_pick_protocol(r.protocols);
        CHECK(r.length <= n && r.length <= WS_REQUEST_MAX);
        check_span(buf, r.length, r.path);
        check_span(buf, r.length, r.host);
        check_span(buf, r.length, r.key);
        check_span(buf, r.length, r.protocols);
        check_span(buf, r.length, r.origin);
        check_span(buf, r.length, r.forwarded_for);
        CHECK(r.key.len == 24 && r.version == 13);
        CHECK(p != NULL && (strcmp(p, "mqtt") == 0 || strcmp(p, "mqttv3.1") == 0));
        /* the same request with a byte fewer is not complete */
        st2 = ws_parse_request(buf, r.length - 1, &r2);
        CHECK(st2 != WS_OK);
    }
    CHECK(ws_error_text(st) != NULL && ws_error_status(st) >= 400);
    free(buf);
}

static int decode_all(const uint8_t *in, size_t n, size_t chunk, uint32_t max_frame, uint8_t *out,
                      size_t *out_len, int *controls)
{
    ws_decoder d;
    size_t at = 0, o = 0;
    memset(&d, 0, sizeof(d));
    d.max_frame = max_frame;
    *controls = 0;
    while (at < n) {
        size_t take = n - at < chunk ? n - at : chunk, used = 0, made = 0;
        size_t room = 97; /* an odd output size: payloads are cut anywhere */
        int st;
        uint8_t tmp[97];
        st = ws_decode(&d, in + at, take, &used, tmp, room, &made);
        CHECK(used <= take && made <= room);
        memcpy(out + o, tmp, made);
        o += made;
        at += used;
        if (st == WS_D_ERROR) {
            CHECK(d.close_code >= 1000 && d.error != NULL);
            *out_len = o;
            return -(int)d.close_code;
        }
        if (st == WS_D_CONTROL) {
            CHECK(d.ctrl_len <= WS_CONTROL_MAX);
            CHECK(d.opcode == WS_OP_CLOSE || d.opcode == WS_OP_PING || d.opcode == WS_OP_PONG);
            (*controls)++;
            continue;
        }
        if (used == 0 && made == 0) {
            /* no progress is only allowed when the input piece is used up */
            CHECK(take == 0);
            break;
        }
    }
    *out_len = o;
    return 0;
}

static void fuzz_frames(const uint8_t *data, size_t n, uint8_t knob)
{
    uint8_t *in = malloc(n ? n : 1), *a = malloc(n + 1), *b = malloc(n + 1);
    size_t la = 0, lb = 0;
    int ca = 0, cb = 0, ra, rb;
    uint32_t max_frame = (knob & 0x80) ? (uint32_t)(knob & 0x7F) * 16 : 0;
    if (in && a && b) {
        memcpy(in, data, n);
        ra = decode_all(in, n, n ? n : 1, max_frame, a, &la, &ca);
        rb = decode_all(in, n, 1 + (knob & 0x0F), max_frame, b, &lb, &cb);
        /* Message bytes never exceed the input, and piecewise feeding changes nothing. */
        CHECK(la <= n && lb <= n);
        CHECK(ra == rb && la == lb && ca == cb && memcmp(a, b, la) == 0);
    }
    free(in);
    free(a);
    free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t h[WS_SERVER_HEADER_MAX];
    if (size < 2)
        return 0;
    /* the encoder: any length gets a header of the right size */
    {
        uint64_t len = 0;
        size_t k = size - 2 < 8 ? size - 2 : 8, i, hl;
        for (i = 0; i < k; i++)
            len = len << 8 | data[2 + i];
        hl = ws_frame_header(h, WS_OP_BINARY, len);
        CHECK(hl == (len < 126 ? 2u : len <= 0xFFFF ? 4u : 10u));
    }
    if (data[0] & 1)
        fuzz_frames(data + 2, size - 2, data[1]);
    else
        fuzz_request(data + 2, size - 2);
    return 0;
}
