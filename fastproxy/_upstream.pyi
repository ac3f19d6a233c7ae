"""The upstream stage: choose the server (balance, health, maxconn), connect (source addresses,

A stage of the compiled engine (ext/fastproxy/_upstream.pyx): its interface is C-level only
(ext/fastproxy/_upstream.pxd, cimported by the other stages); nothing here is for Python.
"""
