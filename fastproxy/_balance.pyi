"""Choosing a server: the balance modes over a listener's pool, with health, backups, maxconn

A stage of the compiled engine (ext/fastproxy/_balance.pyx): its interface is C-level only
(ext/fastproxy/_balance.pxd, cimported by the other stages); nothing here is for Python.
"""
