"""The CONNECT stage: read the first packet, check it is a valid CONNECT, apply the built-in

A stage of the compiled engine (ext/fastproxy/_identity.pyx): its interface is C-level only
(ext/fastproxy/_identity.pxd, cimported by the other stages); nothing here is for Python.
"""
