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


def test_every_compiled_module_has_a_stub():
    ext = os.path.join(REPO, "ext")
    for name in os.listdir(ext):
        if name.endswith(".pyx"):
            stub = os.path.join(REPO, "fastproxy", name[:-4] + ".pyi")
            assert os.path.exists(stub), f"missing typed stub {stub}"
