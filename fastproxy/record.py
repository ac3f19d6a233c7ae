"""The record of one finished connection, as `Proxy(on_record=...)` receives it.

One per connection, when it ends (also for refused and failed ones); the access-log line is
made from the same values. Delivered on the "fastproxy-records" thread, never on the loop.
"""
from __future__ import annotations

from typing import TypedDict


class Record(TypedDict):
    """What `on_record` gets. Keys are always present; `None` means unknown / not applicable."""

    listener: str               # the listener's name (`name`, default listener0, listener1, ...)
    addr: str                   # client address (after a trusted PROXY header: the one it carries)
    port: int                   # client port
    protocol: str               # "TCP", "TLSv1.2", "TLSv1.3", or "TLS" when no handshake finished
    reason: str                 # end reason: "ok", "idle-timeout", "denied", "upstream-refused", ...
    status: int                 # the access log's status for reason: 200, 400, 403, 500, 502, 503, 504
    bytes_sent: int             # application bytes sent to the client
    bytes_received: int         # application bytes received from the client
    start: float                # accept time, seconds since the epoch (time.time())
    duration: float             # seconds from accept to close
    detail: str | None          # more about the reason: OpenSSL's reason, an errno text, a refusal's cause
    cn: str | None              # CN of the verified client certificate
    client_id: str | None       # MQTT ClientId of the CONNECT (after any rewrite)
    upstream: str | None        # the broker the session went to ("host:port", "unix:/path", or
                                # "name (address)" for a named upstream); None if none was chosen
    cipher: str | None          # TLS cipher suite of the session ("TLS_AES_256_GCM_SHA384"), None without TLS
    tls_reason: str | None      # OpenSSL's reason for a failed handshake ("sslv3 alert bad certificate")
    websocket: bool             # the client spoke MQTT over WebSocket (ws / wss)
    refuse_code: int | None     # MQTT 5 reason code of a refusal decided by the engine's own rules
    username: str | None        # MQTT user name of the CONNECT (never the password)
