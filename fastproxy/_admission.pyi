"""Admission: allow / deny networks and per-address limits before TLS, the per-ClientId
reconnect rate after the CONNECT, and the rate-limited warnings (notices).

A stage of the compiled engine (ext/fastproxy/_admission.pyx): its interface is C-level only
(ext/fastproxy/_admission.pxd, cimported by the other stages); nothing here is for Python.
"""
