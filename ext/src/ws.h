/* WebSocket (RFC 6455) for MQTT over WebSocket: the server side of the opening handshake and
 * a frame codec, on untrusted input. No allocation, no I/O: the engine feeds bytes in and
 * takes bytes out; every length is checked against the buffer it indexes.
 *
 * The handshake parser reads one HTTP/1.1 request (request line + headers, at most
 * WS_REQUEST_MAX bytes) and extracts what the upgrade needs; the decoder turns client frames
 * (masked, RFC 6455 section 5.2) into the bytes of their binary messages and reports control
 * frames; the encoder writes server frame headers (unmasked). */
#ifndef FASTPROXY_WS_H
#define FASTPROXY_WS_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define WS_REQUEST_MAX 8192   /* request line + headers; more is refused (431-like, as 400) */
#define WS_HEADER_MAX 14      /* largest frame header: 2 + 8 (length) + 4 (mask) */
#define WS_SERVER_HEADER_MAX 10
#define WS_CONTROL_MAX 125    /* RFC 6455 5.5: control frame payloads */

/* ---- the opening handshake ------------------------------------------------------------- */

typedef struct ws_span {
    const char *ptr; /* NULL: absent */
    size_t len;
} ws_span;

typedef struct ws_request {
    ws_span path;        /* request-target, without the query string */
    ws_span host;
    ws_span key;         /* Sec-WebSocket-Key, trimmed */
    ws_span protocols;   /* Sec-WebSocket-Protocol (first occurrence; several headers are joined
                            by the caller's rule: we keep the first and count the rest) */
    ws_span origin;
    ws_span forwarded_for; /* X-Forwarded-For (the whole value) */
    int version;         /* Sec-WebSocket-Version, -1 absent or not a number */
    size_t length;       /* bytes of the request, up to and including the blank line */
    uint8_t upgrade_websocket;  /* Upgrade: has the token "websocket" */
    uint8_t connection_upgrade; /* Connection: has the token "upgrade" */
} ws_request;

/* Outcomes; WS_OK and WS_NEED_MORE are not errors. Each error has an HTTP status the caller
 * answers with (ws_error_status) and a short reason (ws_error_text). */
enum {
    WS_OK = 0,
    WS_NEED_MORE = 1,
    WS_E_TOO_LARGE = -1,     /* no blank line within WS_REQUEST_MAX */
    WS_E_MALFORMED = -2,     /* not an HTTP/1.1 request line and headers */
    WS_E_METHOD = -3,        /* not GET */
    WS_E_NOT_UPGRADE = -4,   /* no Upgrade: websocket / Connection: upgrade */
    WS_E_KEY = -5,           /* Sec-WebSocket-Key missing or not 16 bytes in base64 */
    WS_E_VERSION = -6,       /* Sec-WebSocket-Version not 13: 426 with our version */
    WS_E_PROTOCOL = -7,      /* no MQTT subprotocol offered */
    WS_E_PATH = -8,          /* not one of the listener's paths: 404 */
    WS_E_ORIGIN = -9         /* Origin not allowed: 403 */
};

/* Parse buf[0..len). WS_OK fills *out (spans point into buf), WS_NEED_MORE when the blank line
 * has not arrived (and len < WS_REQUEST_MAX), else an error. */
int ws_parse_request(const char *buf, size_t len, ws_request *out);

/* The subprotocol to answer with: "mqtt" or "mqttv3.1", the first of the client's offers
 * that is one of them (case-sensitive, as RFC 6455 says tokens are); NULL when none. */
const char *ws_pick_protocol(ws_span offered);

/* Whether a comma-separated header value holds token (case-insensitive). */
int ws_has_token(ws_span value, const char *token);

int ws_error_status(int err);
const char *ws_error_text(int err);

/* ---- frames ----------------------------------------------------------------------------- */

enum {
    WS_OP_CONT = 0x0,
    WS_OP_TEXT = 0x1,
    WS_OP_BINARY = 0x2,
    WS_OP_CLOSE = 0x8,
    WS_OP_PING = 0x9,
    WS_OP_PONG = 0xA
};

/* Close status codes we send (RFC 6455 7.4.1). */
enum {
    WS_CLOSE_NORMAL = 1000,
    WS_CLOSE_GOING_AWAY = 1001,
    WS_CLOSE_PROTOCOL = 1002,
    WS_CLOSE_UNSUPPORTED = 1003,
    WS_CLOSE_TOO_BIG = 1009
};

/* Decoder state of one client connection (zero-initialise it). */
typedef struct ws_decoder {
    uint64_t left;        /* payload bytes of the current frame still to come */
    uint32_t max_frame;   /* largest payload accepted (0: no limit); above it: close 1009 */
    uint8_t hdr[WS_HEADER_MAX];
    uint8_t hdr_len;      /* header bytes collected (0: at a frame boundary) */
    uint8_t in_frame;     /* header complete, payload (left bytes) being read */
    uint8_t opcode;       /* of the current frame */
    uint8_t fin;
    uint8_t mask[4];
    uint8_t mask_pos;
    uint8_t in_message;   /* a fragmented binary message has started (continuations follow) */
    uint8_t ctrl[WS_CONTROL_MAX];
    uint8_t ctrl_len;
    uint16_t close_code;  /* when ws_decode returns WS_D_ERROR: the code to close with */
    const char *error;    /* and why */
} ws_decoder;

/* ws_decode outcomes */
enum {
    WS_D_DATA = 0,   /* progress: *consumed input bytes used, *produced message bytes written */
    WS_D_CONTROL = 1,/* a whole control frame: d->opcode (CLOSE/PING/PONG), d->ctrl[0..ctrl_len) */
    WS_D_ERROR = -1  /* protocol violation: close with d->close_code (d->error says why) */
};

/* Decode client frames from in[0..in_len) into out[0..out_cap): payloads of binary messages,
 * unmasked. Stops after a control frame (WS_D_CONTROL: the caller answers it, then calls
 * again with the rest of the input) or when the input is used up or out is full. */
int ws_decode(ws_decoder *d, const uint8_t *in, size_t in_len, size_t *consumed, uint8_t *out,
              size_t out_cap, size_t *produced);

/* Write a server frame header (FIN set, unmasked) for a payload of len bytes into out
 * (at least WS_SERVER_HEADER_MAX bytes). Returns its length: 2, 4 or 10. */
size_t ws_frame_header(uint8_t *out, uint8_t opcode, uint64_t len);

/* A whole server control frame (close with code and reason, ping/pong with payload) into
 * out[0..cap); returns its length, or 0 when it does not fit or the payload is too long. */
size_t ws_control_frame(uint8_t *out, size_t cap, uint8_t opcode, const uint8_t *payload, size_t len);
size_t ws_close_frame(uint8_t *out, size_t cap, uint16_t code, const char *reason);

#ifdef __cplusplus
}
#endif
#endif /* FASTPROXY_WS_H */
