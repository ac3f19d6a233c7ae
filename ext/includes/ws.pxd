# ext/src/ws.h: the WebSocket opening handshake parser and frame codec (RFC 6455).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "ws.h" nogil:
    enum:
        WS_REQUEST_MAX
        WS_HEADER_MAX
        WS_SERVER_HEADER_MAX
        WS_CONTROL_MAX
        WS_OK
        WS_NEED_MORE
        WS_E_TOO_LARGE
        WS_E_MALFORMED
        WS_E_METHOD
        WS_E_NOT_UPGRADE
        WS_E_KEY
        WS_E_VERSION
        WS_E_PROTOCOL
        WS_E_PATH
        WS_E_ORIGIN
        WS_OP_BINARY
        WS_OP_CLOSE
        WS_OP_PING
        WS_OP_PONG
        WS_CLOSE_NORMAL
        WS_CLOSE_GOING_AWAY
        WS_D_DATA
        WS_D_CONTROL
        WS_D_ERROR

    ctypedef struct ws_span:
        const char* ptr
        size_t len

    ctypedef struct ws_request:
        ws_span path
        ws_span host
        ws_span key
        ws_span protocols
        ws_span origin
        ws_span forwarded_for
        int version
        size_t length

    ctypedef struct ws_decoder:
        uint32_t max_frame
        uint8_t opcode
        uint8_t ctrl[125]
        uint8_t ctrl_len
        uint16_t close_code
        const char* error

    int ws_parse_request(const char* buf, size_t len, ws_request* out)
    const char* ws_pick_protocol(ws_span offered)
    int ws_error_status(int err)
    const char* ws_error_text(int err)
    int ws_decode(ws_decoder* d, const uint8_t* inp, size_t in_len, size_t* consumed, uint8_t* out,
                  size_t out_cap, size_t* produced)
    size_t ws_frame_header(uint8_t* out, uint8_t opcode, uint64_t len)
    size_t ws_control_frame(uint8_t* out, size_t cap, uint8_t opcode, const uint8_t* payload, size_t len)
    size_t ws_close_frame(uint8_t* out, size_t cap, uint16_t code, const char* reason)
