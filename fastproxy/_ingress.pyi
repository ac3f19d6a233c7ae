"""The ingress stage: accept (with the connection cap and descriptor exhaustion), an optional

A stage of the compiled engine (ext/fastproxy/_ingress.pyx): its interface is C-level only
(ext/fastproxy/_ingress.pxd, cimported by the other stages); nothing here is for Python.
"""
