/* WebSocket handshake parser and frame codec: see ws.h. RFC 6455 section numbers in brackets. */
#include "ws.h"

#include <string.h>

/* ---- small helpers ---------------------------------------------------------------------- */

static int lower(int c)
{
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

static int ieq(const char *a, size_t alen, const char *b)
{
    size_t i;
    for (i = 0; i < alen; i++) {
        if (b[i] == 0 || lower((unsigned char)a[i]) != lower((unsigned char)b[i]))
            return 0;
    }
    return b[alen] == 0;
}

static int is_tchar(unsigned char c)
{
    /* RFC 9110 5.6.2 token characters */
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static ws_span trim(const char *p, size_t n)
{
    ws_span s;
    while (n && (p[0] == ' ' || p[0] == '\t')) {
        p++;
        n--;
    }
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    s.ptr = p;
    s.len = n;
    return s;
}

int ws_has_token(ws_span value, const char *token)
{
    size_t i = 0, tl = strlen(token);
    if (value.ptr == NULL)
        return 0;
    while (i < value.len) {
        size_t start = i, end;
        ws_span t;
        while (i < value.len && value.ptr[i] != ',')
            i++;
        end = i;
        t = trim(value.ptr + start, end - start);
        if (t.len == tl && ieq(t.ptr, t.len, token))
            return 1;
        i++; /* past the comma */
    }
    return 0;
}

const char *ws_pick_protocol(ws_span offered)
{
    size_t i = 0;
    if (offered.ptr == NULL)
        return NULL;
    while (i < offered.len) {
        size_t start = i;
        ws_span t;
        while (i < offered.len && offered.ptr[i] != ',')
            i++;
        t = trim(offered.ptr + start, i - start);
        if (t.len == 4 && memcmp(t.ptr, "mqtt", 4) == 0)
            return "mqtt";
        if (t.len == 8 && memcmp(t.ptr, "mqttv3.1", 8) == 0)
            return "mqttv3.1";
        i++;
    }
    return NULL;
}

static int b64char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
           c == '/';
}

/* [4.1] a base64-encoded 16-byte value: 22 characters and "==" */
static int key_ok(ws_span k)
{
    size_t i;
    if (k.ptr == NULL || k.len != 24 || k.ptr[22] != '=' || k.ptr[23] != '=')
        return 0;
    for (i = 0; i < 22; i++) {
        if (!b64char((unsigned char)k.ptr[i]))
            return 0;
    }
    /* the last character before the padding carries 2 bits: one of AQgw */
    return strchr("AQgw", k.ptr[21]) != NULL;
}

/* ---- the request ------------------------------------------------------------------------- */

int ws_parse_request(const char *buf, size_t len, ws_request *out)
{
    size_t lim = len < WS_REQUEST_MAX ? len : WS_REQUEST_MAX;
    size_t end = 0, i, line_end, sp1, sp2;
    int found = 0, get;

    memset(out, 0, sizeof(*out));
    out->version = -1;
    /* Not HTTP at all (an MQTT client on the WebSocket port, TLS to a ws listener): refused at
     * its first bytes, not after the handshake timeout. A method is a short token. */
    for (i = 0; i < lim && buf[i] != ' '; i++) {
        if (!is_tchar((unsigned char)buf[i]) || i >= 16)
            return WS_E_MALFORMED;
    }
    for (i = 3; i < lim; i++) {
        if (buf[i] == '\n' && buf[i - 1] == '\r' && buf[i - 2] == '\n' && buf[i - 3] == '\r') {
            end = i + 1;
            found = 1;
            break;
        }
    }
    if (!found)
        return len >= WS_REQUEST_MAX ? WS_E_TOO_LARGE : WS_NEED_MORE;
    out->length = end;

    /* Request line [RFC 9112 3]: method SP request-target SP HTTP-version CRLF */
    for (line_end = 0; buf[line_end] != '\r'; line_end++)
        ;
    for (sp1 = 0; sp1 < line_end && buf[sp1] != ' '; sp1++) {
        if (!is_tchar((unsigned char)buf[sp1]))
            return WS_E_MALFORMED;
    }
    if (sp1 == 0 || sp1 >= line_end)
        return WS_E_MALFORMED;
    for (sp2 = sp1 + 1; sp2 < line_end && buf[sp2] != ' '; sp2++) {
        unsigned char c = (unsigned char)buf[sp2];
        if (c <= 0x20 || c >= 0x7f)
            return WS_E_MALFORMED;
    }
    if (sp2 >= line_end || sp2 == sp1 + 1 || buf[sp1 + 1] != '/')
        return WS_E_MALFORMED;
    if (line_end - sp2 - 1 != 8 || memcmp(buf + sp2 + 1, "HTTP/1.", 7) != 0 || buf[sp2 + 8] < '1' ||
        buf[sp2 + 8] > '9')
        return WS_E_MALFORMED; /* [4.1] HTTP/1.1 or later; HTTP/1.0 has no Upgrade */
    get = sp1 == 3 && memcmp(buf, "GET", 3) == 0;
    out->path.ptr = buf + sp1 + 1;
    out->path.len = sp2 - sp1 - 1;
    for (i = 0; i < out->path.len; i++) {
        if (out->path.ptr[i] == '?') {
            out->path.len = i;
            break;
        }
    }

    /* Header fields [RFC 9112 5]: name ":" OWS value OWS CRLF; no obs-fold. */
    i = line_end + 2;
    while (i < end - 2) {
        size_t ls = i, colon, le;
        ws_span name, value;
        for (le = ls; buf[le] != '\r'; le++) {
            unsigned char c = (unsigned char)buf[le];
            if ((c < 0x20 && c != '\t') || c == 0x7f)
                return WS_E_MALFORMED;
        }
        if (buf[le + 1] != '\n')
            return WS_E_MALFORMED;
        for (colon = ls; colon < le && buf[colon] != ':'; colon++) {
            if (!is_tchar((unsigned char)buf[colon]))
                return WS_E_MALFORMED; /* also a leading space: obs-fold */
        }
        if (colon == ls || colon >= le)
            return WS_E_MALFORMED;
        name.ptr = buf + ls;
        name.len = colon - ls;
        value = trim(buf + colon + 1, le - colon - 1);
        if (ieq(name.ptr, name.len, "host")) {
            if (out->host.ptr == NULL)
                out->host = value;
        } else if (ieq(name.ptr, name.len, "upgrade")) {
            out->upgrade_websocket |= (uint8_t)ws_has_token(value, "websocket");
        } else if (ieq(name.ptr, name.len, "connection")) {
            out->connection_upgrade |= (uint8_t)ws_has_token(value, "upgrade");
        } else if (ieq(name.ptr, name.len, "sec-websocket-key")) {
            if (out->key.ptr != NULL)
                return WS_E_KEY; /* [4.2.1] exactly one */
            out->key = value;
        } else if (ieq(name.ptr, name.len, "sec-websocket-version")) {
            int v = 0;
            size_t k;
            if (value.len == 0 || value.len > 3)
                v = -1;
            for (k = 0; v >= 0 && k < value.len; k++) {
                if (value.ptr[k] < '0' || value.ptr[k] > '9')
                    v = -1;
                else
                    v = v * 10 + (value.ptr[k] - '0');
            }
            out->version = v;
        } else if (ieq(name.ptr, name.len, "sec-websocket-protocol")) {
            if (out->protocols.ptr == NULL)
                out->protocols = value;
        } else if (ieq(name.ptr, name.len, "origin")) {
            if (out->origin.ptr == NULL)
                out->origin = value;
        } else if (ieq(name.ptr, name.len, "x-forwarded-for")) {
            if (out->forwarded_for.ptr == NULL)
                out->forwarded_for = value;
        }
        i = le + 2;
    }
    if (!get)
        return WS_E_METHOD;
    if (!out->upgrade_websocket || !out->connection_upgrade)
        return WS_E_NOT_UPGRADE;
    if (out->version != 13)
        return WS_E_VERSION;
    if (!key_ok(out->key))
        return WS_E_KEY;
    if (ws_pick_protocol(out->protocols) == NULL)
        return WS_E_PROTOCOL;
    return WS_OK;
}

int ws_error_status(int err)
{
    switch (err) {
    case WS_E_PATH:
        return 404;
    case WS_E_ORIGIN:
        return 403;
    case WS_E_VERSION:
        return 426;
    default:
        return 400;
    }
}

const char *ws_error_text(int err)
{
    switch (err) {
    case WS_E_TOO_LARGE:
        return "request header too large";
    case WS_E_MALFORMED:
        return "malformed HTTP request";
    case WS_E_METHOD:
        return "not a GET request";
    case WS_E_NOT_UPGRADE:
        return "not a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)";
    case WS_E_KEY:
        return "missing or invalid Sec-WebSocket-Key";
    case WS_E_VERSION:
        return "unsupported Sec-WebSocket-Version (13 required)";
    case WS_E_PROTOCOL:
        return "no MQTT subprotocol offered (Sec-WebSocket-Protocol: mqtt)";
    case WS_E_PATH:
        return "unknown path";
    case WS_E_ORIGIN:
        return "origin not allowed";
    default:
        return "bad request";
    }
}

/* ---- frames -------------------------------------------------------------------------------- */

/* out[0..n) = in[0..n) XOR the mask, starting at mask byte pos: 8 bytes a step (the per-byte
 * loop is what a busy wss session spends its time on; compilers do not vectorise it). */
static void unmask(uint8_t *out, const uint8_t *in, size_t n, const uint8_t mask[4], unsigned pos)
{
    uint8_t m8[8];
    uint64_t m, w;
    size_t k = 0;
    unsigned j;
    for (j = 0; j < 8; j++)
        m8[j] = mask[(pos + j) & 3];
    memcpy(&m, m8, 8);
    for (; k + 8 <= n; k += 8) {   /* 8 is a multiple of 4: the mask phase repeats */
        memcpy(&w, in + k, 8);
        w ^= m;
        memcpy(out + k, &w, 8);
    }
    for (; k < n; k++)
        out[k] = in[k] ^ mask[(pos + k) & 3];
}

static int fail(ws_decoder *d, uint16_t code, const char *why)
{
    d->close_code = code;
    d->error = why;
    return WS_D_ERROR;
}

/* The header in d->hdr is complete: check it and set up the payload. */
static int begin_frame(ws_decoder *d)
{
    uint8_t b0 = d->hdr[0], b1 = d->hdr[1], op = b0 & 0x0F;
    uint64_t n = b1 & 0x7F;
    size_t at = 2;
    if (b0 & 0x70)
        return fail(d, WS_CLOSE_PROTOCOL, "reserved bits set"); /* [5.2] no extension agreed */
    if (!(b1 & 0x80))
        return fail(d, WS_CLOSE_PROTOCOL, "unmasked client frame"); /* [5.1] */
    if (n == 126) {
        n = (uint64_t)d->hdr[2] << 8 | d->hdr[3];
        at = 4;
    } else if (n == 127) {
        int k;
        if (d->hdr[2] & 0x80)
            return fail(d, WS_CLOSE_PROTOCOL, "payload length with the top bit set");
        n = 0;
        for (k = 0; k < 8; k++)
            n = n << 8 | d->hdr[2 + k];
        at = 10;
    }
    memcpy(d->mask, d->hdr + at, 4);
    d->mask_pos = 0;
    d->opcode = op;
    d->fin = (b0 & 0x80) != 0;
    d->left = n;
    if (op & 0x08) {
        if (op != WS_OP_CLOSE && op != WS_OP_PING && op != WS_OP_PONG)
            return fail(d, WS_CLOSE_PROTOCOL, "reserved opcode");
        if (!d->fin || n > WS_CONTROL_MAX)
            return fail(d, WS_CLOSE_PROTOCOL, "fragmented or oversized control frame"); /* [5.5] */
        d->ctrl_len = 0;
    } else if (op == WS_OP_TEXT) {
        return fail(d, WS_CLOSE_UNSUPPORTED, "text frame (MQTT uses binary frames)");
    } else if (op == WS_OP_BINARY) {
        if (d->in_message)
            return fail(d, WS_CLOSE_PROTOCOL, "new message inside a fragmented one");
        d->in_message = !d->fin;
    } else if (op == WS_OP_CONT) {
        if (!d->in_message)
            return fail(d, WS_CLOSE_PROTOCOL, "continuation without a message");
        d->in_message = !d->fin;
    } else {
        return fail(d, WS_CLOSE_PROTOCOL, "reserved opcode");
    }
    if (d->max_frame && n > d->max_frame && !(op & 0x08))
        return fail(d, WS_CLOSE_TOO_BIG, "frame larger than ws_max_frame");
    d->in_frame = 1;
    d->hdr_len = 0;
    return WS_D_DATA;
}

static size_t header_size(const uint8_t *hdr, size_t have)
{
    uint8_t n;
    if (have < 2)
        return 2;
    n = hdr[1] & 0x7F;
    return 2 + (n == 126 ? 2 : n == 127 ? 8 : 0) + 4;
}

int ws_decode(ws_decoder *d, const uint8_t *in, size_t in_len, size_t *consumed, uint8_t *out,
              size_t out_cap, size_t *produced)
{
    size_t i = 0, o = 0;
    *consumed = 0;
    *produced = 0;
    while (i < in_len) {
        if (!d->in_frame) {
            /* collect the header, byte by byte up to its size (at most WS_HEADER_MAX) */
            size_t need = header_size(d->hdr, d->hdr_len);
            while (d->hdr_len < need && i < in_len) {
                d->hdr[d->hdr_len++] = in[i++];
                need = header_size(d->hdr, d->hdr_len);
            }
            if (d->hdr_len >= 2 && !(d->hdr[1] & 0x80)) {
                /* refused at once: an unmasked frame's header is shorter than header_size() */
                *consumed = i;
                *produced = o;
                return fail(d, WS_CLOSE_PROTOCOL, "unmasked client frame");
            }
            if (d->hdr_len < need)
                break;
            if (begin_frame(d) != WS_D_DATA) {
                *consumed = i;
                *produced = o;
                return WS_D_ERROR;
            }
        }
        if (d->opcode & 0x08) {
            while (d->left && i < in_len) {
                d->ctrl[d->ctrl_len++] = in[i++] ^ d->mask[d->mask_pos++ & 3];
                d->left--;
            }
            if (d->left)
                break;
            d->in_frame = 0;
            *consumed = i;
            *produced = o;
            if (d->opcode == WS_OP_CLOSE && d->ctrl_len == 1)
                return fail(d, WS_CLOSE_PROTOCOL, "close frame with a 1-byte payload");
            return WS_D_CONTROL;
        }
        {
            size_t n = in_len - i, room = out_cap - o;
            if (n > d->left)
                n = (size_t)d->left;
            if (n > room)
                n = room;
            unmask(out + o, in + i, n, d->mask, d->mask_pos);
            d->mask_pos = (uint8_t)((d->mask_pos + n) & 3);
            i += n;
            o += n;
            d->left -= n;
            if (d->left == 0)
                d->in_frame = 0;
            else if (o == out_cap)
                break;
        }
    }
    *consumed = i;
    *produced = o;
    return WS_D_DATA;
}

size_t ws_frame_header(uint8_t *out, uint8_t opcode, uint64_t len)
{
    out[0] = (uint8_t)(0x80 | (opcode & 0x0F));
    if (len < 126) {
        out[1] = (uint8_t)len;
        return 2;
    }
    if (len <= 0xFFFF) {
        out[1] = 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        return 4;
    }
    out[1] = 127;
    {
        int k;
        for (k = 0; k < 8; k++)
            out[2 + k] = (uint8_t)(len >> (56 - 8 * k));
    }
    return 10;
}

size_t ws_control_frame(uint8_t *out, size_t cap, uint8_t opcode, const uint8_t *payload, size_t len)
{
    if (len > WS_CONTROL_MAX || cap < 2 + len)
        return 0;
    out[0] = (uint8_t)(0x80 | opcode);
    out[1] = (uint8_t)len;
    if (len)
        memcpy(out + 2, payload, len);
    return 2 + len;
}

size_t ws_close_frame(uint8_t *out, size_t cap, uint16_t code, const char *reason)
{
    uint8_t p[WS_CONTROL_MAX];
    size_t rl = reason ? strlen(reason) : 0;
    if (rl > WS_CONTROL_MAX - 2)
        rl = WS_CONTROL_MAX - 2;
    p[0] = (uint8_t)(code >> 8);
    p[1] = (uint8_t)code;
    if (rl)
        memcpy(p + 2, reason, rl);
    return ws_control_frame(out, cap, WS_OP_CLOSE, p, 2 + rl);
}
