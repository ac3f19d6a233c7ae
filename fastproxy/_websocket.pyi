"""The WebSocket upgrade stage (RFC 6455 section 4): the HTTP request of a WebSocket listener's
client, answered with 101 or an HTTP error.

A stage of the compiled engine (ext/fastproxy/_websocket.pyx): its interface is C-level only
(ext/fastproxy/_websocket.pxd, cimported by the other stages); nothing here is for Python.
"""
