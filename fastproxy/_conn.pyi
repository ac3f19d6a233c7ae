"""Ending connections: close both sides, account, report to Python, linger after a refusal.

A stage of the compiled engine (ext/fastproxy/_conn.pyx): its interface is C-level only
(ext/fastproxy/_conn.pxd, cimported by the other stages); nothing here is for Python.
"""
