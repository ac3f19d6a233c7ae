"""The transport stage: our BIO under OpenSSL, TLS set-up and handshake, the client certificate.

A stage of the compiled engine (ext/fastproxy/_transport.pyx): its interface is C-level only
(ext/fastproxy/_transport.pxd, cimported by the other stages); nothing here is for Python.
"""
