/*
 * libFuzzer harness for mqtt_connect.c (not part of any extension module; see
 * docs/mqtt-parser.md for the commands):
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *         -Iext/src ext/src/fuzz_mqtt_connect.c ext/src/mqtt_connect.c -o build/fuzz_mqtt_connect
 *   build/fuzz_mqtt_connect -runs=10000000 -max_len=1024 CORPUS_DIR
 *
 * Input: byte 0 picks max_size, bytes 1..2 pick a replacement ClientId length, the rest is the
 * packet. Each packet is copied into a heap block of exactly its size, so AddressSanitizer
 * reports a read even one byte past the end. Besides "no crash", it checks the parser's
 * promises and traps when one is broken:
 *   - VALID: packet_len <= len; every span lies inside the packet; strings are valid UTF-8;
 *     property blocks iterate to their end; rewriting the ClientId gives a VALID packet with
 *     the new id; every shorter prefix of a complete packet needs more bytes.
 *   - INVALID: a reason, an offset inside the bytes, and a CONNACK that can be built.
 *   - NEED_MORE: out->packet_len is 0 or the declared size, larger than the bytes given.
 *   - any outcome: parsing a prefix gives NEED_MORE or the same outcome (same reason).
 *   - mqtt_find_connect stays inside the bytes and only ever points at a CONNECT type byte.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mqtt_connect.h"

#define CHECK(cond)                \
    do {                           \
        if (!(cond))               \
            __builtin_trap();      \
    } while (0)

static void check_span(const uint8_t *pkt, size_t packet_len, mqtt_bytes b)
{
    if (b.ptr == NULL) {
        CHECK(b.len == 0);
        return;
    }
    CHECK(b.ptr >= pkt && b.ptr <= pkt + packet_len);
    CHECK(b.len <= (size_t)(pkt + packet_len - b.ptr));
}

static void check_string(const uint8_t *pkt, size_t packet_len, mqtt_bytes b)
{
    check_span(pkt, packet_len, b);
    if (b.ptr)
        CHECK(mqtt_utf8_check(b.ptr, b.len) == 0);
}

static void check_props(const uint8_t *pkt, size_t packet_len, mqtt_bytes block)
{
    mqtt_property_iter it;
    mqtt_property p;
    int r, n = 0;
    check_span(pkt, packet_len, block);
    mqtt_property_iter_init(&it, block);
    while ((r = mqtt_property_next(&it, &p)) == 1) {
        check_span(pkt, packet_len, p.str);
        check_span(pkt, packet_len, p.str2);
        CHECK(++n <= 65536);
    }
    CHECK(r == 0);
}

static int same_outcome(int r1, const mqtt_connect_error *e1, int r2, const mqtt_connect_error *e2)
{
    if (r1 != r2)
        return 0;
    if (r1 != MQTT_INVALID)
        return 1;
    return e1->reason == e2->reason && e1->offset == e2->offset && e1->rc5 == e2->rc5 &&
           e1->send_connack == e2->send_connack && e1->reason_code == e2->reason_code &&
           e1->connack_level == e2->connack_level;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t limits[4] = {MQTT_MAX_PACKET_SIZE, 65536, 64, 16};
    mqtt_connect c, c2;
    mqtt_connect_error e, e2;
    size_t max_size, n, id_len, k;
    uint8_t *buf;
    int r, r2;

    if (size < 3)
        return 0;

    /* Builders with arbitrary arguments: a code that mqtt_connack_code() hands out can always
     * be built, and a built CONNACK has the documented shape. */
    {
        uint8_t ack[8];
        int code = mqtt_connack_code(data[1], data[2]);
        int w = mqtt_build_connack(data[1], data[2], ack, (size_t)(data[0] >> 5));
        CHECK(w == 4 || w == 5 || w == MQTT_BUILD_E_ARG || w == MQTT_BUILD_E_SPACE);
        if (w > 0)
            CHECK(ack[0] == 0x20 && ack[1] == w - 2 && ack[2] == 0 && ack[3] == data[2]);
        if (code >= 0)
            CHECK(mqtt_build_connack(data[1], (uint8_t)code, ack, sizeof(ack)) > 0);
    }

    max_size = limits[data[0] & 3];
    id_len = ((size_t)data[1] << 8 | data[2]) % 300;
    n = size - 3;
    buf = malloc(n ? n : 1);
    if (!buf)
        return 0;
    memcpy(buf, data + 3, n);

    /* The walk over the packets behind a CONNECT: stays inside the bytes, and what it finds
     * is a CONNECT type byte. */
    {
        long at = mqtt_find_connect(buf, n);
        CHECK(at >= -1 && at < (long)n);
        if (at >= 0)
            CHECK((buf[at] >> 4) == 1);
    }

    r = mqtt_parse_connect(buf, n, max_size, &c, &e);
    CHECK(r == MQTT_NEED_MORE || r == MQTT_VALID || r == MQTT_INVALID);
    /* NEED_MORE: packet_len is 0 (fixed header incomplete) or the declared size, beyond n. */
    if (r == MQTT_NEED_MORE)
        CHECK(c.packet_len == 0 || c.packet_len > n);

    if (r == MQTT_VALID) {
        CHECK(c.packet_len <= n && c.packet_len <= max_size);
        CHECK(c.packet_len == (size_t)c.header_len + c.remaining_len);
        CHECK(c.level == 3 || c.level == 4 || c.level == 5);
        CHECK(c.will_qos <= 2);
        check_span(buf, c.packet_len, c.protocol_name);
        check_string(buf, c.packet_len, c.client_id);
        check_string(buf, c.packet_len, c.will_topic);
        check_span(buf, c.packet_len, c.will_payload);
        check_string(buf, c.packet_len, c.username);
        check_span(buf, c.packet_len, c.password);
        check_props(buf, c.packet_len, c.properties);
        check_props(buf, c.packet_len, c.will_properties);
        check_string(buf, c.packet_len, c.authentication_method);
        check_string(buf, c.packet_len, c.content_type);
        check_string(buf, c.packet_len, c.response_topic);

        /* Every strict prefix of the packet needs more bytes. */
        for (k = 0; k < c.packet_len; k += 1 + k / 4)
            CHECK(mqtt_parse_connect(buf, k, max_size, &c2, &e2) == MQTT_NEED_MORE);
        CHECK(mqtt_parse_connect(buf, c.packet_len, max_size, &c2, &e2) == MQTT_VALID);
        CHECK(c2.packet_len == c.packet_len);

        /* Rewrite the ClientId ("a" * id_len) into an exact-size buffer, reparse. */
        {
            uint8_t *id = malloc(id_len ? id_len : 1);
            size_t cap = c.packet_len + id_len + 3;
            uint8_t *out = malloc(cap);
            long w;
            if (id && out) {
                memset(id, 'a', id_len);
                w = mqtt_rewrite_client_id(buf, n, &c, id, id_len, out, cap);
                if (w >= 0) {
                    uint8_t *exact = malloc((size_t)w);
                    if (exact) {
                        memcpy(exact, out, (size_t)w);
                        r2 = mqtt_parse_connect(exact, (size_t)w, MQTT_MAX_PACKET_SIZE, &c2, &e2);
                        CHECK(r2 == MQTT_VALID);
                        CHECK(c2.packet_len == (size_t)w);
                        CHECK(c2.client_id.len == id_len);
                        CHECK(c2.flags == c.flags && c2.keepalive == c.keepalive);
                        CHECK(c2.password.len == c.password.len);
                        free(exact);
                    }
                } else {
                    CHECK(w == MQTT_BUILD_E_TOO_LARGE);
                }
                /* Too small an output buffer is refused. */
                if (w > 0)
                    CHECK(mqtt_rewrite_client_id(buf, n, &c, id, id_len, out, (size_t)w - 1) ==
                          MQTT_BUILD_E_SPACE);
            }
            free(id);
            free(out);
        }
    } else if (r == MQTT_INVALID) {
        uint8_t ack[8];
        CHECK(e.reason != NULL && e.reason[0] != '\0');
        CHECK(e.offset <= n);
        CHECK(e.rc5 >= 0x80);
        if (e.send_connack) {
            int w = mqtt_build_connack(e.connack_level, e.reason_code, ack, sizeof(ack));
            CHECK(w == 4 || w == 5);
        }
    }

    /* Monotonic: a prefix needs more bytes or already has the final outcome, and once a
     * prefix needs more, every shorter one does too. Checked on a spread of prefix lengths. */
    {
        size_t cuts[8] = {n ? n - 1 : 0, n > 1 ? n - 2 : 0, n * 7 / 8, n * 3 / 4, n / 2, n / 4, 2, 1};
        int seen_more = 0, i, j;
        for (i = 1; i < 8; i++) /* longest first */
            for (j = i; j > 0 && cuts[j] > cuts[j - 1]; j--) {
                size_t t = cuts[j];
                cuts[j] = cuts[j - 1];
                cuts[j - 1] = t;
            }
        for (i = 0; i < 8; i++) {
            k = cuts[i];
            if (k >= n)
                continue;
            r2 = mqtt_parse_connect(buf, k, max_size, &c2, &e2);
            if (seen_more) {
                CHECK(r2 == MQTT_NEED_MORE);
            } else if (r2 == MQTT_NEED_MORE) {
                seen_more = 1;
            } else if (r == MQTT_VALID) {
                CHECK(r2 == MQTT_VALID && k >= c.packet_len && c2.packet_len == c.packet_len);
            } else {
                CHECK(same_outcome(r, &e, r2, &e2));
            }
        }
    }
    free(buf);
    return 0;
}
