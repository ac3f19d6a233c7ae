"""The relay stage: bytes both ways between the client and its server, no Python per chunk.

A stage of the compiled engine (ext/fastproxy/_relay.pyx): its interface is C-level only
(ext/fastproxy/_relay.pxd, cimported by the other stages); nothing here is for Python.
"""
