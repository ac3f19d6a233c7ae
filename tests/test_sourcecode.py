"""Static checks: the typed stubs of the compiled modules agree with how the package uses them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_on_package():
    pytest.importorskip("mypy")
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary", "fastproxy"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


EXT = os.path.join(REPO, "ext", "fastproxy")


def test_every_compiled_module_has_a_stub():
    names = [n for n in os.listdir(EXT) if n.endswith(".pyx")]
    assert len(names) >= 10
    for name in names:
        stub = os.path.join(REPO, "fastproxy", name[:-4] + ".pyi")
        assert os.path.exists(stub), f"missing typed stub {stub}"


def test_no_compiled_module_over_a_thousand_lines():
    for name in os.listdir(EXT):
        if name.endswith((".pyx", ".pxd")):
            with open(os.path.join(EXT, name)) as f:
                n = sum(1 for _ in f)
            assert n <= 1000, f"{name} has {n} lines: split it along the connection's stages"


def test_python_mirrors_of_engine_constants():
    """fastproxy.constants holds the one Python copy of each engine limit and mode list."""
    _engine = pytest.importorskip("fastproxy._engine")
    from fastproxy import constants as C

    lim = _engine.LIMITS
    assert C.MAX_LISTENERS == lim["MAX_LISTENERS"]
    assert C.MAX_POOL == lim["MAX_POOL"]
    assert C.MAX_SOURCES == lim["MAX_SOURCES"]
    assert len(C.BALANCE_MODES) == lim["BAL_SOURCE"] + 1
    assert len(C.PROXY_PROTOCOL_MODES) == lim["PP_V2_SSL_CN"] + 1
    from fastproxy.config import PROXY_PROTOCOL_OPTIONS

    assert {k: v for k, v in PROXY_PROTOCOL_OPTIONS.items() if v} == _engine.PP2_WANT


def test_parsers_compiled_once():
    """The C parsers are linked from one compilation, not compiled into each module."""
    with open(os.path.join(REPO, "setup.py")) as f:
        setup_py = f.read()
    assert setup_py.count("mqtt_connect.c") == 1 and setup_py.count("proxy_v2.c") == 1


def test_config_does_not_import_policy():
    """No import circle: configuration knows nothing of the policy machinery."""
    import ast

    with open(os.path.join(REPO, "fastproxy", "config.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module not in ("policy", "fastproxy.policy"), "config.py imports policy"
