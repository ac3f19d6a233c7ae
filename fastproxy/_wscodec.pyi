"""The WebSocket frame codec of a client side after the upgrade (RFC 6455): frames decoded on
read, the broker's bytes framed per read, control frames answered.

A stage of the compiled engine (ext/fastproxy/_wscodec.pyx): its interface is C-level only
(ext/fastproxy/_wscodec.pxd, cimported by the other stages); nothing here is for Python.
"""
