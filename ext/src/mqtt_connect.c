/*
 * mqtt_connect.c - strict, allocation-free parser for the MQTT CONNECT packet (see the header).
 *
 * References (section numbers are those of the OASIS documents):
 *   [3.1.1] MQTT Version 3.1.1, OASIS Standard, 29 October 2014. CONNECT: section 3.1.
 *   [5.0]   MQTT Version 5.0, OASIS Standard, 7 March 2019.      CONNECT: section 3.1.
 *   [3.1]   MQTT V3.1 Protocol Specification (IBM/Eurotech, 2010): protocol name "MQIsdp", level 3;
 *           its CONNECT is laid out as in 3.1.1, whose normative statements we also apply to it.
 *
 * Every byte is read through one bounded cursor (cur_*). A cursor has two ends:
 *   lim    the structural end: the end of the packet as declared by the Remaining Length, or
 *          the end of a property block as declared by its Property Length. Reading past lim
 *          proves the packet malformed, even when those bytes have not arrived yet.
 *   avail  the number of bytes received. Reading past avail (but not past lim) means "need
 *          more bytes".
 * No length read from the wire is used before it is checked against both ends.
 *
 * Check order (also the order of tests/mqtt_reference.py): fixed header, protocol name,
 * protocol level, packet size, connect flags, keep alive, [5.0] properties, then the payload
 * fields in order, then "no trailing bytes". The first failing check is reported.
 */
#include "mqtt_connect.h"

#include <string.h>

#define BIT(id) ((uint64_t)1 << (id))

/* CONNECT Properties allowed by [5.0] 3.1.2.11. */
#define CONNECT_PROPS                                                                           \
    (BIT(MQTT_PROP_SESSION_EXPIRY_INTERVAL) | BIT(MQTT_PROP_RECEIVE_MAXIMUM) |                 \
     BIT(MQTT_PROP_MAXIMUM_PACKET_SIZE) | BIT(MQTT_PROP_TOPIC_ALIAS_MAXIMUM) |                 \
     BIT(MQTT_PROP_REQUEST_RESPONSE_INFORMATION) | BIT(MQTT_PROP_REQUEST_PROBLEM_INFORMATION) | \
     BIT(MQTT_PROP_USER_PROPERTY) | BIT(MQTT_PROP_AUTHENTICATION_METHOD) |                     \
     BIT(MQTT_PROP_AUTHENTICATION_DATA))

/* Will Properties allowed by [5.0] 3.1.3.2. */
#define WILL_PROPS                                                                    \
    (BIT(MQTT_PROP_WILL_DELAY_INTERVAL) | BIT(MQTT_PROP_PAYLOAD_FORMAT_INDICATOR) |   \
     BIT(MQTT_PROP_MESSAGE_EXPIRY_INTERVAL) | BIT(MQTT_PROP_CONTENT_TYPE) |           \
     BIT(MQTT_PROP_RESPONSE_TOPIC) | BIT(MQTT_PROP_CORRELATION_DATA) |                \
     BIT(MQTT_PROP_USER_PROPERTY))

/* ============================================================================================ */
/* The bounded cursor                                                                            */
/* ============================================================================================ */

enum {
    CUR_OK = 0,
    CUR_MORE = 1,        /* the value lies (partly) beyond the bytes received */
    CUR_PAST = 2,        /* the value lies (partly) beyond lim: malformed */
    CUR_VBI_LONG = 3,    /* Variable Byte Integer with a 5th byte */
    CUR_VBI_NONMIN = 4,  /* Variable Byte Integer not in its shortest form */
};

typedef struct cursor {
    const uint8_t *buf;
    size_t pos;   /* next byte; invariant: pos <= lim and pos <= avail */
    size_t lim;   /* structural end (see above) */
    size_t avail; /* bytes received */
} cursor;

/* May n more bytes be read? */
static inline int cur_need(const cursor *c, size_t n)
{
    if (n > c->lim - c->pos)
        return CUR_PAST;
    if (n > c->avail - c->pos)
        return CUR_MORE;
    return CUR_OK;
}

/* Byte: [3.1.1] 1.5.1, [5.0] 1.5.1 */
static inline int cur_u8(cursor *c, uint8_t *v)
{
    int r = cur_need(c, 1);
    if (r != CUR_OK)
        return r;
    *v = c->buf[c->pos++];
    return CUR_OK;
}

/* Two Byte Integer, big-endian: [3.1.1] 1.5.2, [5.0] 1.5.2 */
static inline int cur_u16(cursor *c, uint16_t *v)
{
    int r = cur_need(c, 2);
    if (r != CUR_OK)
        return r;
    *v = (uint16_t)(((unsigned)c->buf[c->pos] << 8) | c->buf[c->pos + 1]);
    c->pos += 2;
    return CUR_OK;
}

/* Four Byte Integer, big-endian: [5.0] 1.5.3 */
static inline int cur_u32(cursor *c, uint32_t *v)
{
    int r = cur_need(c, 4);
    if (r != CUR_OK)
        return r;
    const uint8_t *p = c->buf + c->pos;
    *v = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
    c->pos += 4;
    return CUR_OK;
}

/* Variable Byte Integer: [3.1.1] 2.2.3 (Remaining Length), [5.0] 1.5.5. At most 4 bytes, and
 * "the encoded value MUST use the minimum number of bytes necessary" [MQTT-1.5.5-1]. The error
 * is reported on the byte that proves it: a 4th byte with the continuation bit, or a last byte
 * 0x00 after a continuation. pos only moves on success. */
static inline int cur_vbi(cursor *c, uint32_t *v)
{
    uint32_t value = 0;
    size_t i;
    for (i = 0; i < 4; i++) {
        int r = cur_need(c, i + 1);
        if (r != CUR_OK)
            return r;
        uint8_t b = c->buf[c->pos + i];
        value |= (uint32_t)(b & 0x7F) << (7 * i);
        if (!(b & 0x80)) {
            if (b == 0 && i > 0)
                return CUR_VBI_NONMIN;
            c->pos += i + 1;
            *v = value;
            return CUR_OK;
        }
    }
    return CUR_VBI_LONG;
}

/* Binary Data / UTF-8 Encoded String: 2-byte length, then that many bytes ([3.1.1] 1.5.3,
 * [5.0] 1.5.4, 1.5.6). The length is checked against lim before any byte of the value is
 * needed. */
static inline int cur_bin(cursor *c, mqtt_bytes *out)
{
    int r = cur_need(c, 2);
    if (r != CUR_OK)
        return r;
    uint32_t n = ((uint32_t)c->buf[c->pos] << 8) | c->buf[c->pos + 1];
    r = cur_need(c, 2 + (size_t)n);
    if (r != CUR_OK)
        return r;
    out->ptr = c->buf + c->pos + 2;
    out->len = n;
    c->pos += 2 + (size_t)n;
    return CUR_OK;
}

/* ============================================================================================ */
/* UTF-8 ([3.1.1] 1.5.3, [5.0] 1.5.4; well-formedness per Unicode / RFC 3629)                   */
/* ============================================================================================ */

int mqtt_utf8_check(const uint8_t *s, size_t n)
{
    size_t i = 0;
    int nul = 0, ctl = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time; a word with a byte < 0x20 or 0x7F (the only
         * ASCII code points refused) goes byte by byte. */
        while (n - i >= 8) {
            uint64_t w, d;
            memcpy(&w, s + i, 8);
            d = w ^ 0x7F7F7F7F7F7F7F7Full;
            if ((w & 0x8080808080808080ull) ||
                ((w - 0x2020202020202020ull) & ~w & 0x8080808080808080ull) ||
                ((d - 0x0101010101010101ull) & ~d & 0x8080808080808080ull))
                break;
            i += 8;
        }
        if (i >= n)
            break;
        uint8_t b = s[i];
        if (b < 0x80) {
            if (b == 0)
                nul = 1; /* U+0000: [MQTT-1.5.3-2], [MQTT-1.5.4-2] */
            else if (b < 0x20 || b == 0x7F)
                ctl = 1; /* U+0001..U+001F, U+007F */
            i++;
        } else if (b < 0xC2) {
            return 2;    /* stray continuation byte, or overlong 2-byte form (C0, C1) */
        } else if (b < 0xE0) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80)
                return 2;
            if (b == 0xC2 && s[i + 1] < 0xA0)
                ctl = 1; /* U+0080..U+009F, the C1 controls */
            i += 2;
        } else if (b < 0xF0) {
            if (n - i < 3 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80)
                return 2;
            if (b == 0xE0 && s[i + 1] < 0xA0)
                return 2; /* overlong 3-byte form */
            if (b == 0xED && s[i + 1] >= 0xA0)
                return 2; /* U+D800..U+DFFF, surrogates: [MQTT-1.5.3-1], [MQTT-1.5.4-1] */
            if (b == 0xEF && ((s[i + 1] == 0xB7 && s[i + 2] >= 0x90 && s[i + 2] <= 0xAF) ||
                              (s[i + 1] == 0xBF && s[i + 2] >= 0xBE)))
                ctl = 1; /* non-characters U+FDD0..U+FDEF, U+FFFE, U+FFFF */
            i += 3;
        } else if (b < 0xF5) {
            if (n - i < 4 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 ||
                (s[i + 3] & 0xC0) != 0x80)
                return 2;
            if (b == 0xF0 && s[i + 1] < 0x90)
                return 2; /* overlong 4-byte form */
            if (b == 0xF4 && s[i + 1] >= 0x90)
                return 2; /* above U+10FFFF */
            if ((s[i + 1] & 0x0F) == 0x0F && s[i + 2] == 0xBF && s[i + 3] >= 0xBE)
                ctl = 1; /* non-characters U+nFFFE, U+nFFFF of planes 1..16 */
            i += 4;
        } else {
            return 2;     /* F5..FF never appear in UTF-8 */
        }
    }
    return nul ? 1 : ctl ? 3 : 0;
}

/* ============================================================================================ */
/* The parser                                                                                    */
/* ============================================================================================ */

enum { P_OK = 0, P_MORE = 1, P_BAD = 2 };

/* What went wrong, filled on P_BAD. */
typedef struct fault {
    const char *why;
    size_t at;
    uint8_t rc5;
    uint8_t rc3;         /* 3.x CONNACK return code for this fault, 0: close without one */
    uint8_t unsupported; /* the protocol name/level pair is not supported */
} fault;

static int fail(fault *f, uint8_t rc5, const char *why, size_t at)
{
    f->rc5 = rc5;
    f->why = why;
    f->at = at;
    return P_BAD;
}

/* Map a cursor result to a parse result. past: the reason when the value crosses lim. */
static inline int take(int r, fault *f, const char *past, size_t at)
{
    if (r == CUR_OK)
        return P_OK;
    if (r == CUR_MORE)
        return P_MORE;
    return fail(f, MQTT_RC_MALFORMED_PACKET, past, at);
}

/* Cursor reads do not move pos when they fail, so c->pos is then the start of the value that
 * does not fit: that is the offset reported. */
#define TAKE(expr, past)                              \
    do {                                              \
        int r_ = (expr);                              \
        int t_ = take(r_, f, (past), c->pos);         \
        if (t_ != P_OK)                               \
            return t_;                                \
    } while (0)

/* A UTF-8 Encoded String field: read, then check well-formedness, U+0000 and the code points
 * Mosquitto refuses as malformed (controls, non-characters; [5.0] 1.5.4 lets a receiver treat
 * them so): a CONNECT the broker would drop without a CONNACK is refused here, with one. The
 * reason texts are "<field>: ill-formed UTF-8" and the like. */
static int take_string(cursor *c, mqtt_bytes *out, fault *f, const char *past, const char *bad,
                       const char *nul, const char *ctl)
{
    size_t at = c->pos;
    int r = take(cur_bin(c, out), f, past, at);
    if (r != P_OK)
        return r;
    switch (mqtt_utf8_check(out->ptr, out->len)) {
    case 0:
        return P_OK;
    case 1:
        return fail(f, MQTT_RC_MALFORMED_PACKET, nul, at);
    case 3:
        return fail(f, MQTT_RC_MALFORMED_PACKET, ctl, at);
    default:
        return fail(f, MQTT_RC_MALFORMED_PACKET, bad, at);
    }
}

/* A Topic Name (Will Topic, Response Topic): at least one character [MQTT-4.7.3-1] and no
 * wildcard characters [MQTT-4.7.1-1] ([3.1.1] 4.7, [5.0] 4.7). '+' and '#' are ASCII and so
 * never part of a multi-byte UTF-8 sequence. */
static inline int topic_name_ok(mqtt_bytes t)
{
    return t.len > 0 && !memchr(t.ptr, '+', t.len) && !memchr(t.ptr, '#', t.len);
}

/* Topic levels beyond the first (separators): Mosquitto refuses a publish or will topic with
 * more than TOPIC_HIERARCHY_LIMIT (200) of them, closing the connection without a CONNACK. */
#define MQTT_TOPIC_LEVELS_MAX 200
static inline size_t topic_levels(mqtt_bytes t)
{
    size_t i, n = 0;
    for (i = 0; i < t.len; i++)
        n += t.ptr[i] == '/';
    return n;
}

/* Value types of properties, [5.0] 2.2.2.2 table 2-4. */
enum { PT_NONE, PT_BYTE, PT_U16, PT_U32, PT_VBI, PT_STRING, PT_BINARY, PT_PAIR };

static inline int prop_type(uint8_t id)
{
    switch (id) {
    case MQTT_PROP_PAYLOAD_FORMAT_INDICATOR:
    case MQTT_PROP_REQUEST_PROBLEM_INFORMATION:
    case MQTT_PROP_REQUEST_RESPONSE_INFORMATION:
    case MQTT_PROP_MAXIMUM_QOS:
    case MQTT_PROP_RETAIN_AVAILABLE:
    case MQTT_PROP_WILDCARD_SUBSCRIPTION_AVAILABLE:
    case MQTT_PROP_SUBSCRIPTION_IDENTIFIER_AVAILABLE:
    case MQTT_PROP_SHARED_SUBSCRIPTION_AVAILABLE:
        return PT_BYTE;
    case MQTT_PROP_SERVER_KEEP_ALIVE:
    case MQTT_PROP_RECEIVE_MAXIMUM:
    case MQTT_PROP_TOPIC_ALIAS_MAXIMUM:
    case MQTT_PROP_TOPIC_ALIAS:
        return PT_U16;
    case MQTT_PROP_MESSAGE_EXPIRY_INTERVAL:
    case MQTT_PROP_SESSION_EXPIRY_INTERVAL:
    case MQTT_PROP_WILL_DELAY_INTERVAL:
    case MQTT_PROP_MAXIMUM_PACKET_SIZE:
        return PT_U32;
    case MQTT_PROP_SUBSCRIPTION_IDENTIFIER:
        return PT_VBI;
    case MQTT_PROP_CONTENT_TYPE:
    case MQTT_PROP_RESPONSE_TOPIC:
    case MQTT_PROP_ASSIGNED_CLIENT_IDENTIFIER:
    case MQTT_PROP_AUTHENTICATION_METHOD:
    case MQTT_PROP_RESPONSE_INFORMATION:
    case MQTT_PROP_SERVER_REFERENCE:
    case MQTT_PROP_REASON_STRING:
        return PT_STRING;
    case MQTT_PROP_CORRELATION_DATA:
    case MQTT_PROP_AUTHENTICATION_DATA:
        return PT_BINARY;
    case MQTT_PROP_USER_PROPERTY:
        return PT_PAIR;
    default:
        return PT_NONE;
    }
}

/* Read the value of property `id` (of a known type) into *p. Returns a CUR_* code. */
static int cur_prop_value(cursor *c, uint8_t id, mqtt_property *p)
{
    int r;
    uint8_t b = 0;
    uint16_t h = 0;
    p->id = id;
    p->value = 0;
    p->str.ptr = p->str2.ptr = NULL;
    p->str.len = p->str2.len = 0;
    switch (prop_type(id)) {
    case PT_BYTE:
        r = cur_u8(c, &b);
        p->value = b;
        return r;
    case PT_U16:
        r = cur_u16(c, &h);
        p->value = h;
        return r;
    case PT_U32:
        return cur_u32(c, &p->value);
    case PT_VBI:
        return cur_vbi(c, &p->value);
    case PT_STRING:
    case PT_BINARY:
        return cur_bin(c, &p->str);
    case PT_PAIR:
        r = cur_bin(c, &p->str);
        return r != CUR_OK ? r : cur_bin(c, &p->str2);
    default:
        return CUR_PAST; /* unknown identifier: cannot be skipped */
    }
}

/* The UTF-8 strings of a property: mqtt_utf8_check's answer, first string first. */
static inline int prop_utf8(const mqtt_property *p)
{
    int t = prop_type(p->id);
    int r = 0;
    if (t == PT_STRING || t == PT_PAIR)
        r = mqtt_utf8_check(p->str.ptr, p->str.len);
    if (r == 0 && t == PT_PAIR)
        r = mqtt_utf8_check(p->str2.ptr, p->str2.len);
    return r;
}

/*
 * A property block, [5.0] 2.2.2: Property Length (Variable Byte Integer), then properties that
 * fill exactly that length. will == 0: CONNECT Properties ([5.0] 3.1.2.11); will == 1: Will
 * Properties ([5.0] 3.1.3.2).
 *   - an identifier not valid for the block is a Malformed Packet ([5.0] 2.2.2.2);
 *   - including a property other than User Property more than once is a Protocol Error
 *     (each property's own paragraph in 3.1.2.11 and 3.1.3.2);
 *   - Receive Maximum 0, Maximum Packet Size 0, Request Response/Problem Information other than
 *     0 or 1 are Protocol Errors (3.1.2.11.3, .4, .6, .7); we treat a Payload Format Indicator
 *     other than 0 or 1 (3.1.3.2.3) the same way;
 *   - Authentication Data without Authentication Method is a Protocol Error (3.1.2.11.10).
 */
static int parse_props(cursor *c, mqtt_connect *m, int will, fault *f)
{
    size_t at = c->pos, outer = c->lim, end;
    uint32_t plen = 0;
    uint64_t seen = 0;
    const uint64_t allowed = will ? WILL_PROPS : CONNECT_PROPS;
    mqtt_property p;
    int r;

    r = cur_vbi(c, &plen);
    switch (r) {
    case CUR_OK:
        break;
    case CUR_MORE:
        return P_MORE;
    case CUR_VBI_LONG:
        return fail(f, MQTT_RC_MALFORMED_PACKET, "property length longer than 4 bytes", at);
    case CUR_VBI_NONMIN:
        return fail(f, MQTT_RC_MALFORMED_PACKET, "property length not minimally encoded", at);
    default:
        return fail(f, MQTT_RC_MALFORMED_PACKET, "property length exceeds remaining length", at);
    }
    if (plen > c->lim - c->pos)
        return fail(f, MQTT_RC_MALFORMED_PACKET, "property length exceeds remaining length", at);
    end = c->pos + plen;
    if (will) {
        m->will_properties.ptr = c->buf + c->pos;
        m->will_properties.len = plen;
    } else {
        m->properties.ptr = c->buf + c->pos;
        m->properties.len = plen;
    }

    c->lim = end;
    while (c->pos < end) {
        size_t pat = c->pos;
        uint8_t id;
        /* Property Identifier: a Variable Byte Integer, but every identifier of this version is
         * one byte below 0x80 ([5.0] 2.2.2.2), so a first byte >= 0x80 is not a valid one. */
        TAKE(cur_u8(c, &id), "property exceeds property length");
        if (id >= 64 || !(allowed & BIT(id)))
            return fail(f, MQTT_RC_MALFORMED_PACKET,
                        will ? "property not allowed in will properties"
                             : "property not allowed in CONNECT",
                        pat);
        if (id != MQTT_PROP_USER_PROPERTY && (seen & BIT(id)))
            return fail(f, MQTT_RC_PROTOCOL_ERROR, "duplicate property", pat);
        seen |= BIT(id);
        TAKE(cur_prop_value(c, id, &p), "property exceeds property length");
        r = prop_utf8(&p);
        if (r != 0) {
#define WHY3(field) {field ": contains U+0000", field ": ill-formed UTF-8", \
                     field ": control character or non-character"}
            static const char *const why[4][3] = {WHY3("authentication method"), WHY3("content type"),
                                                  WHY3("response topic"), WHY3("user property")};
#undef WHY3
            int k = id == MQTT_PROP_AUTHENTICATION_METHOD ? 0 : id == MQTT_PROP_CONTENT_TYPE ? 1
                  : id == MQTT_PROP_RESPONSE_TOPIC ? 2 : 3;
            return fail(f, MQTT_RC_MALFORMED_PACKET, why[k][r - 1], pat);
        }
        switch (id) {
        case MQTT_PROP_SESSION_EXPIRY_INTERVAL:   /* 3.1.2.11.2 */
            m->session_expiry_interval = p.value;
            break;
        case MQTT_PROP_RECEIVE_MAXIMUM:           /* 3.1.2.11.3 */
            if (p.value == 0)
                return fail(f, MQTT_RC_PROTOCOL_ERROR, "receive maximum is 0", pat);
            m->receive_maximum = (uint16_t)p.value;
            break;
        case MQTT_PROP_MAXIMUM_PACKET_SIZE:       /* 3.1.2.11.4 */
            if (p.value == 0)
                return fail(f, MQTT_RC_PROTOCOL_ERROR, "maximum packet size is 0", pat);
            m->maximum_packet_size = p.value;
            break;
        case MQTT_PROP_TOPIC_ALIAS_MAXIMUM:       /* 3.1.2.11.5 */
            m->topic_alias_maximum = (uint16_t)p.value;
            break;
        case MQTT_PROP_REQUEST_RESPONSE_INFORMATION: /* 3.1.2.11.6 */
            if (p.value > 1)
                return fail(f, MQTT_RC_PROTOCOL_ERROR,
                            "request response information is not 0 or 1", pat);
            m->request_response_information = (uint8_t)p.value;
            break;
        case MQTT_PROP_REQUEST_PROBLEM_INFORMATION: /* 3.1.2.11.7 */
            if (p.value > 1)
                return fail(f, MQTT_RC_PROTOCOL_ERROR,
                            "request problem information is not 0 or 1", pat);
            m->request_problem_information = (uint8_t)p.value;
            break;
        case MQTT_PROP_AUTHENTICATION_METHOD:     /* 3.1.2.11.9 */
            m->authentication_method = p.str;
            break;
        case MQTT_PROP_AUTHENTICATION_DATA:       /* 3.1.2.11.10 */
            m->authentication_data = p.str;
            break;
        case MQTT_PROP_WILL_DELAY_INTERVAL:       /* 3.1.3.2.2 */
            m->will_delay_interval = p.value;
            break;
        case MQTT_PROP_PAYLOAD_FORMAT_INDICATOR:  /* 3.1.3.2.3 */
            if (p.value > 1)
                return fail(f, MQTT_RC_PROTOCOL_ERROR,
                            "payload format indicator is not 0 or 1", pat);
            m->payload_format_indicator = (uint8_t)p.value;
            break;
        case MQTT_PROP_MESSAGE_EXPIRY_INTERVAL:   /* 3.1.3.2.4 */
            m->message_expiry_interval = p.value;
            break;
        case MQTT_PROP_CONTENT_TYPE:              /* 3.1.3.2.5 */
            m->content_type = p.str;
            break;
        case MQTT_PROP_RESPONSE_TOPIC:            /* 3.1.3.2.6: a Topic Name */
            if (!topic_name_ok(p.str))
                return fail(f, MQTT_RC_TOPIC_NAME_INVALID, "response topic invalid", pat);
            m->response_topic = p.str;
            break;
        case MQTT_PROP_CORRELATION_DATA:          /* 3.1.3.2.7 */
            m->correlation_data = p.str;
            break;
        case MQTT_PROP_USER_PROPERTY:             /* 3.1.2.11.8, 3.1.3.2.8: may repeat */
            if (will)
                m->will_user_property_count++;
            else
                m->user_property_count++;
            break;
        }
    }
    c->lim = outer;

    if (will) {
        m->will_props_present = seen;
    } else {
        m->props_present = seen;
        if ((seen & BIT(MQTT_PROP_AUTHENTICATION_DATA)) &&
            !(seen & BIT(MQTT_PROP_AUTHENTICATION_METHOD)))
            return fail(f, MQTT_RC_PROTOCOL_ERROR,
                        "authentication data without authentication method", at);
    }
    return P_OK;
}

/* The whole packet. Returns P_OK / P_MORE / P_BAD (then *f says why). */
static int parse(const uint8_t *buf, size_t len, size_t max_size, mqtt_connect *m, fault *f,
                 int *level_seen)
{
    cursor cur = {buf, 0, (size_t)-1, len};
    cursor *c = &cur;
    uint32_t rl = 0;
    uint16_t nlen;
    uint8_t b0, level, flags;
    int r;

    /* ---- Fixed header: [3.1.1] 2.2 and 3.1.1, [5.0] 2.1 and 3.1.1 ---------------------- */
    if (len == 0)
        return P_MORE;
    b0 = buf[0];
    /* The first packet from the Client MUST be CONNECT [MQTT-3.1.0-1]; in 5.0 anything else is
     * a Protocol Error. */
    if ((b0 >> 4) != MQTT_CPT_CONNECT)
        return fail(f, MQTT_RC_PROTOCOL_ERROR, "first packet is not CONNECT", 0);
    /* CONNECT's fixed header flags are reserved and MUST be 0000 [MQTT-2.2.2-1], [MQTT-2.2.2-2];
     * anything else is malformed. */
    if ((b0 & 0x0F) != 0)
        return fail(f, MQTT_RC_MALFORMED_PACKET, "reserved fixed header flags set", 0);
    c->pos = 1;
    r = cur_vbi(c, &rl);
    if (r == CUR_MORE)
        return P_MORE;
    if (r == CUR_VBI_LONG)
        return fail(f, MQTT_RC_MALFORMED_PACKET, "remaining length longer than 4 bytes", 1);
    if (r == CUR_VBI_NONMIN)
        return fail(f, MQTT_RC_MALFORMED_PACKET, "remaining length not minimally encoded", 1);
    m->header_len = (uint8_t)c->pos;
    m->remaining_len = rl;
    m->packet_len = c->pos + (size_t)rl;
    c->lim = m->packet_len; /* from here on nothing may be read past the declared end */

    /* ---- Protocol Name: [3.1.1] 3.1.2.1, [5.0] 3.1.2.1 --------------------------------------
     * "MQTT" (3.1.1, 5.0) or "MQIsdp" (3.1). Any other name: [MQTT-3.1.2-1] allows the Server to
     * disconnect; 5.0 lets it answer 0x84 only if it wishes to reveal it is an MQTT server: we
     * close without CONNACK. A mismatch is reported on the first wrong byte. */
    {
        size_t at = c->pos, have, i;
        const char *want;
        TAKE(cur_need(c, 2), "protocol name exceeds remaining length");
        nlen = (uint16_t)((buf[at] << 8) | buf[at + 1]);
        if (nlen != 4 && nlen != 6)
            return fail(f, MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION, "unknown protocol name", at);
        r = cur_need(c, 2 + (size_t)nlen);
        if (r == CUR_PAST)
            return fail(f, MQTT_RC_MALFORMED_PACKET, "protocol name exceeds remaining length", at);
        /* Compare the bytes received so far, then wait for the rest. */
        want = nlen == 4 ? "MQTT" : "MQIsdp";
        have = len - (at + 2);
        if (have > nlen)
            have = nlen;
        for (i = 0; i < have; i++)
            if (buf[at + 2 + i] != (uint8_t)want[i])
                return fail(f, MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION, "unknown protocol name", at);
        TAKE(cur_bin(c, &m->protocol_name), "protocol name exceeds remaining length");
    }

    /* ---- Protocol Level: [3.1.1] 3.1.2.2, [5.0] 3.1.2.2 ------------------------------------
     * Only the pairs MQIsdp/3, MQTT/4 and MQTT/5 are supported. Otherwise 3.1.1 requires
     * CONNACK 0x01 (unacceptable protocol level) [MQTT-3.1.2-2]; 5.0 allows 0x84. */
    {
        size_t at = c->pos;
        TAKE(cur_u8(c, &level), "protocol level exceeds remaining length");
        *level_seen = level;
        if (!((nlen == 6 && level == MQTT_LEVEL_3_1) || (nlen == 4 && level == MQTT_LEVEL_3_1_1) ||
              (nlen == 4 && level == MQTT_LEVEL_5_0))) {
            f->unsupported = 1;
            return fail(f, MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION, "unsupported protocol version",
                        at);
        }
        m->level = level;
    }

    /* ---- Packet size: the whole packet against the caller's limit. 5.0: CONNACK 0x95 Packet
     * too large ([5.0] 3.2.2.2); 3.x has no code for it: close. Decided before the body. ---- */
    if (m->packet_len > max_size)
        return fail(f, MQTT_RC_PACKET_TOO_LARGE, "packet too large", 1);

    /* ---- Connect Flags: [3.1.1] 3.1.2.3-3.1.2.9, [5.0] 3.1.2.3-3.1.2.9 --------------------- */
    {
        size_t at = c->pos;
        TAKE(cur_u8(c, &flags), "connect flags exceed remaining length");
        m->flags = flags;
        /* The reserved flag MUST be 0 [MQTT-3.1.2-3]; in 5.0 a Malformed Packet. */
        if (flags & MQTT_CONNECT_FLAG_RESERVED)
            return fail(f, MQTT_RC_MALFORMED_PACKET, "reserved connect flag set", at);
        /* Will Flag 0: Will QoS MUST be 0 [MQTT-3.1.2-11] and Will Retain MUST be 0
         * [MQTT-3.1.2-13] (3.1.1 numbering); in 5.0 a Malformed Packet. */
        if (!(flags & MQTT_CONNECT_FLAG_WILL) &&
            (flags & (MQTT_CONNECT_FLAG_WILL_QOS_MASK | MQTT_CONNECT_FLAG_WILL_RETAIN)))
            return fail(f, MQTT_RC_MALFORMED_PACKET,
                        "will QoS or will retain set without will flag", at);
        /* Will QoS 3 MUST NOT be used [MQTT-3.1.2-14]; 5.0: a Malformed Packet. */
        m->will_qos = (uint8_t)((flags & MQTT_CONNECT_FLAG_WILL_QOS_MASK) >>
                                MQTT_CONNECT_FLAG_WILL_QOS_SHIFT);
        if (m->will_qos == 3)
            return fail(f, MQTT_RC_MALFORMED_PACKET, "will QoS 3", at);
        /* 3.1.1: "If the User Name Flag is set to 0, the Password Flag MUST be set to 0"
         * [MQTT-3.1.2-22] (applied to 3.1 too). 5.0 allows a password without a user name
         * ([5.0] 3.1.2.9). */
        if (level != MQTT_LEVEL_5_0 && (flags & MQTT_CONNECT_FLAG_PASSWORD) &&
            !(flags & MQTT_CONNECT_FLAG_USERNAME))
            return fail(f, MQTT_RC_MALFORMED_PACKET, "password flag without user name flag", at);
    }

    /* ---- Keep Alive: [3.1.1] 3.1.2.10, [5.0] 3.1.2.10 ---------------------------------- */
    TAKE(cur_u16(c, &m->keepalive), "keep alive exceeds remaining length");

    /* ---- CONNECT Properties: [5.0] 3.1.2.11 ------------------------------------------------ */
    if (level == MQTT_LEVEL_5_0) {
        r = parse_props(c, m, 0, f);
        if (r != P_OK)
            return r;
    }

    /* ---- Payload: [3.1.1] 3.1.3, [5.0] 3.1.3. Fields in this order, each present iff its
     * flag says so ([MQTT-3.1.3-1]). ---------------------------------------------------- */
    /* Client Identifier: always present, a UTF-8 Encoded String ([MQTT-3.1.3-3], [-4]). It may
     * be empty (3.1.1 3.1.3.1, [5.0] 3.1.3.1); whether an empty one is acceptable (for example
     * with Clean Session 0 in 3.1.1, [MQTT-3.1.3-8]) is the caller's decision, which may
     * rewrite it (mqtt_rewrite_client_id). */
    m->client_id_offset = c->pos;
    static const char id_ctl[] = "client identifier: control character or non-character";
    r = take_string(c, &m->client_id, f, "client identifier exceeds remaining length",
                    "client identifier: ill-formed UTF-8", "client identifier: contains U+0000",
                    id_ctl);
    if (r == P_BAD && f->why == id_ctl) {
        /* Well-formed but refused: the identifier is rejected ([MQTT-3.1.3-9]), as Mosquitto
         * answers it (5.0: 0x85), and 3.x clients are told too (0x02). */
        f->rc5 = MQTT_RC_CLIENT_IDENTIFIER_NOT_VALID;
        f->rc3 = MQTT_CONNACK_IDENTIFIER_REJECTED;
    }
    if (r != P_OK)
        return r;

    if (flags & MQTT_CONNECT_FLAG_WILL) {
        /* Will Properties: [5.0] 3.1.3.2 */
        if (level == MQTT_LEVEL_5_0) {
            r = parse_props(c, m, 1, f);
            if (r != P_OK)
                return r;
        }
        /* Will Topic: a UTF-8 Encoded String ([3.1.1] 3.1.3.2, [5.0] 3.1.3.3) that is a Topic
         * Name. 5.0: CONNACK 0x90 Topic Name invalid. */
        size_t at = c->pos;
        r = take_string(c, &m->will_topic, f, "will topic exceeds remaining length",
                        "will topic: ill-formed UTF-8", "will topic: contains U+0000",
                        "will topic: control character or non-character");
        if (r != P_OK)
            return r;
        if (!topic_name_ok(m->will_topic))
            return fail(f, MQTT_RC_TOPIC_NAME_INVALID, "will topic invalid", at);
        if (topic_levels(m->will_topic) > MQTT_TOPIC_LEVELS_MAX)
            return fail(f, MQTT_RC_TOPIC_NAME_INVALID, "will topic has more than 200 levels", at);
        /* Will Message / Will Payload: Binary Data ([3.1.1] 3.1.3.3, [5.0] 3.1.3.4). */
        TAKE(cur_bin(c, &m->will_payload), "will payload exceeds remaining length");
    }
    /* User Name: a UTF-8 Encoded String ([3.1.1] 3.1.3.4, [5.0] 3.1.3.5). */
    if (flags & MQTT_CONNECT_FLAG_USERNAME) {
        r = take_string(c, &m->username, f, "user name exceeds remaining length",
                        "user name: ill-formed UTF-8", "user name: contains U+0000",
                        "user name: control character or non-character");
        if (r != P_OK)
            return r;
    }
    /* Password: Binary Data ([3.1.1] 3.1.3.5, [5.0] 3.1.3.6). */
    if (flags & MQTT_CONNECT_FLAG_PASSWORD)
        TAKE(cur_bin(c, &m->password), "password exceeds remaining length");

    /* Every length inside the packet must add up to the Remaining Length exactly: bytes left
     * over are not part of any field. Reported without waiting for those bytes. */
    if (c->pos != c->lim)
        return fail(f, MQTT_RC_MALFORMED_PACKET, "trailing bytes in packet", c->pos);
    return P_OK;
}

#undef TAKE

int mqtt_parse_connect(const uint8_t *buf, size_t len, size_t max_size, mqtt_connect *out,
                       mqtt_connect_error *err)
{
    fault f = {NULL, 0, 0, 0, 0};
    int level = -1;
    int r;

    memset(out, 0, sizeof(*out));
    if (buf == NULL)
        len = 0;
    r = parse(buf, len, max_size, out, &f, &level);
    if (r == P_OK)
        return MQTT_VALID;
    if (r == P_MORE)
        return MQTT_NEED_MORE;

    if (err != NULL) {
        err->reason = f.why;
        err->offset = f.at;
        err->rc5 = f.rc5;
        err->level = level < 0 ? 0 : (uint8_t)level;
        err->have_level = level >= 0;
        err->send_connack = 0;
        err->connack_level = 0;
        err->reason_code = 0;
        if (f.unsupported) {
            /* Answer in the format the client can read: the 3.x one (0x01) unless it asked for
             * level 5 or later (0x84). The high bit is masked: mosquitto bridges set it
             * ("try_private") and fall back to the plain level on 0x01. */
            uint8_t asked = (uint8_t)(level & 0x7F);
            err->send_connack = 1;
            if (asked >= MQTT_LEVEL_5_0) {
                err->connack_level = MQTT_LEVEL_5_0;
                err->reason_code = MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION;
            } else {
                err->connack_level = asked == MQTT_LEVEL_3_1 ? MQTT_LEVEL_3_1 : MQTT_LEVEL_3_1_1;
                err->reason_code = MQTT_CONNACK_UNACCEPTABLE_PROTOCOL_VERSION;
            }
        } else if (f.rc3 && (out->level == MQTT_LEVEL_3_1 || out->level == MQTT_LEVEL_3_1_1)) {
            /* A refusal 3.x has a return code for (not a protocol violation). */
            err->send_connack = 1;
            err->connack_level = out->level;
            err->reason_code = f.rc3;
        } else if (out->level == MQTT_LEVEL_5_0) {
            /* [5.0] 4.13.1: on a Malformed Packet or Protocol Error in CONNECT the Server MAY
             * send a CONNACK with the Reason Code, then MUST close the connection. */
            err->send_connack = 1;
            err->connack_level = MQTT_LEVEL_5_0;
            err->reason_code = f.rc5;
        }
        /* 3.x ([3.1.1] 4.8): a protocol violation closes the connection, no CONNACK. Also when
         * the version is not known yet. */
    }
    return MQTT_INVALID;
}

/* ============================================================================================ */
/* Property iteration                                                                            */
/* ============================================================================================ */

void mqtt_property_iter_init(mqtt_property_iter *it, mqtt_bytes block)
{
    it->p = block.ptr;
    it->pos = 0;
    it->len = block.ptr ? block.len : 0;
}

int mqtt_property_next(mqtt_property_iter *it, mqtt_property *prop)
{
    cursor cur = {it->p, it->pos, it->len, it->len};
    uint8_t id;
    if (it->pos >= it->len)
        return 0;
    if (cur_u8(&cur, &id) != CUR_OK || cur_prop_value(&cur, id, prop) != CUR_OK) {
        it->pos = it->len;
        return -1;
    }
    it->pos = cur.pos;
    return 1;
}

/* ============================================================================================ */
/* Builders                                                                                      */
/* ============================================================================================ */

/* Reason codes a CONNACK may carry, [5.0] 3.2.2.2. */
static inline int connack_rc5_ok(uint8_t rc)
{
    switch (rc) {
    case MQTT_RC_SUCCESS:
    case MQTT_RC_UNSPECIFIED_ERROR:
    case MQTT_RC_MALFORMED_PACKET:
    case MQTT_RC_PROTOCOL_ERROR:
    case MQTT_RC_IMPLEMENTATION_SPECIFIC_ERROR:
    case MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION:
    case MQTT_RC_CLIENT_IDENTIFIER_NOT_VALID:
    case MQTT_RC_BAD_USER_NAME_OR_PASSWORD:
    case MQTT_RC_NOT_AUTHORIZED:
    case MQTT_RC_SERVER_UNAVAILABLE:
    case MQTT_RC_SERVER_BUSY:
    case MQTT_RC_BANNED:
    case MQTT_RC_BAD_AUTHENTICATION_METHOD:
    case MQTT_RC_TOPIC_NAME_INVALID:
    case MQTT_RC_PACKET_TOO_LARGE:
    case MQTT_RC_QUOTA_EXCEEDED:
    case MQTT_RC_PAYLOAD_FORMAT_INVALID:
    case MQTT_RC_RETAIN_NOT_SUPPORTED:
    case MQTT_RC_QOS_NOT_SUPPORTED:
    case MQTT_RC_USE_ANOTHER_SERVER:
    case MQTT_RC_SERVER_MOVED:
    case MQTT_RC_CONNECTION_RATE_EXCEEDED:
        return 1;
    default:
        return 0;
    }
}

int mqtt_build_connack(uint8_t level, uint8_t reason_code, uint8_t *out, size_t cap)
{
    if (level == MQTT_LEVEL_3_1 || level == MQTT_LEVEL_3_1_1) {
        /* [3.1.1] 3.2: 0x20, Remaining Length 2, Connect Acknowledge Flags (Session Present 0,
         * [MQTT-3.2.2-4] for a refusal), Connect Return Code 0x00..0x05 (3.2.2.3). */
        if (reason_code > MQTT_CONNACK_NOT_AUTHORIZED)
            return MQTT_BUILD_E_ARG;
        if (out == NULL || cap < 4)
            return MQTT_BUILD_E_SPACE;
        out[0] = MQTT_CPT_CONNACK << 4;
        out[1] = 2;
        out[2] = 0;
        out[3] = reason_code;
        return 4;
    }
    if (level == MQTT_LEVEL_5_0) {
        /* [5.0] 3.2: 0x20, Remaining Length 3, Acknowledge Flags 0 ([MQTT-3.2.2-6] for a
         * refusal), Reason Code, Property Length 0. */
        if (!connack_rc5_ok(reason_code))
            return MQTT_BUILD_E_ARG;
        if (out == NULL || cap < 5)
            return MQTT_BUILD_E_SPACE;
        out[0] = MQTT_CPT_CONNACK << 4;
        out[1] = 3;
        out[2] = 0;
        out[3] = reason_code;
        out[4] = 0;
        return 5;
    }
    return MQTT_BUILD_E_ARG;
}

int mqtt_connack_code(uint8_t level, uint8_t rc5)
{
    if (level == MQTT_LEVEL_5_0)
        return connack_rc5_ok(rc5) ? rc5 : -1;
    if (level != MQTT_LEVEL_3_1 && level != MQTT_LEVEL_3_1_1)
        return -1;
    switch (rc5) {
    case MQTT_RC_SUCCESS:
        return MQTT_CONNACK_ACCEPTED;
    case MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION:
        return MQTT_CONNACK_UNACCEPTABLE_PROTOCOL_VERSION;
    case MQTT_RC_CLIENT_IDENTIFIER_NOT_VALID:
        return MQTT_CONNACK_IDENTIFIER_REJECTED;
    case MQTT_RC_SERVER_UNAVAILABLE:
    case MQTT_RC_SERVER_BUSY:
        return MQTT_CONNACK_SERVER_UNAVAILABLE;
    case MQTT_RC_BAD_USER_NAME_OR_PASSWORD:
        return MQTT_CONNACK_BAD_USER_NAME_OR_PASSWORD;
    case MQTT_RC_NOT_AUTHORIZED:
    case MQTT_RC_BANNED:
        return MQTT_CONNACK_NOT_AUTHORIZED;
    default:
        return -1;
    }
}

long mqtt_find_connect(const uint8_t *buf, size_t len)
{
    size_t at = 0;
    while (at < len) {
        uint64_t rl = 0;
        size_t i = 1;
        if ((buf[at] >> 4) == MQTT_CPT_CONNECT)
            return (long)at;
        /* Remaining Length: at most 4 bytes ([MQTT-1.5.5-1]); each step moves `at` forward
         * by at least 2, so the walk ends within len. */
        for (;;) {
            if (i > 4 || at + i >= len)
                return -1;
            rl |= (uint64_t)(buf[at + i] & 0x7F) << (7 * (i - 1));
            if (!(buf[at + i++] & 0x80))
                break;
        }
        if (rl > len - at - i)
            return -1;
        at += i + (size_t)rl;
    }
    return -1;
}

long mqtt_rewrite_client_id(const uint8_t *pkt, size_t pkt_len, const mqtt_connect *c,
                            const uint8_t *new_id, size_t new_id_len, uint8_t *out, size_t cap)
{
    size_t id_at, tail_at, head_len, tail_len, total, hl;
    uint64_t rl;
    uint8_t *w;

    if (pkt == NULL || c == NULL || (new_id == NULL && new_id_len != 0))
        return MQTT_BUILD_E_ARG;
    if (new_id_len > 65535 || (new_id_len && mqtt_utf8_check(new_id, new_id_len) != 0))
        return MQTT_BUILD_E_ARG;
    /* c must be a VALID result for pkt. */
    if (c->header_len < 2 || c->header_len > 5 ||
        c->packet_len != (size_t)c->header_len + c->remaining_len || c->packet_len > pkt_len ||
        c->client_id_offset < c->header_len || c->client_id_offset + 2 > c->packet_len ||
        c->client_id.ptr != pkt + c->client_id_offset + 2 ||
        c->client_id.len > c->packet_len - c->client_id_offset - 2 ||
        ((uint32_t)pkt[c->client_id_offset] << 8 | pkt[c->client_id_offset + 1]) != c->client_id.len)
        return MQTT_BUILD_E_PACKET;

    id_at = c->client_id_offset;
    tail_at = id_at + 2 + c->client_id.len;
    head_len = id_at - c->header_len; /* variable header (+ 5.0 properties) */
    tail_len = c->packet_len - tail_at; /* will, user name, password */
    rl = (uint64_t)c->remaining_len - c->client_id.len + new_id_len;
    if (rl > MQTT_MAX_REMAINING_LENGTH)
        return MQTT_BUILD_E_TOO_LARGE;
    hl = 2 + (rl >= 128) + (rl >= 16384) + (rl >= 2097152);
    total = hl + (size_t)rl;
    if (out == NULL || total > cap)
        return MQTT_BUILD_E_SPACE;

    w = out;
    *w++ = pkt[0];
    {
        /* Remaining Length, [3.1.1] 2.2.3 */
        uint32_t v = (uint32_t)rl;
        do {
            uint8_t b = v & 0x7F;
            v >>= 7;
            *w++ = v ? (uint8_t)(b | 0x80) : b;
        } while (v);
    }
    memcpy(w, pkt + c->header_len, head_len);
    w += head_len;
    *w++ = (uint8_t)(new_id_len >> 8);
    *w++ = (uint8_t)(new_id_len & 0xFF);
    if (new_id_len)
        memcpy(w, new_id, new_id_len);
    w += new_id_len;
    memcpy(w, pkt + tail_at, tail_len);
    w += tail_len;
    return (long)(w - out);
}
