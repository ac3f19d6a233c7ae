"""The top-level API as a user's type checker sees it: real signatures, not the lazy
__getattr__'s Any, and the on_record TypedDict."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = '''\
from __future__ import annotations

import fastproxy

cfg: fastproxy.Config = fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": "127.0.0.1:1883"})


def on_record(rec: fastproxy.Record) -> None:
    total: int = rec["bytes_sent"] + rec["bytes_received"]
    who: str | None = rec["client_id"]
    print(rec["listener"], rec["reason"], rec["status"], who, total, rec["duration"] * 1000)


proxy = fastproxy.Proxy(cfg, on_record=on_record)
proxy.start()
state: str = proxy.state
error: BaseException | None = proxy.error
proxy.stop(drain_timeout=1.5)
proxy.close()
warnings: list[str] = fastproxy.check_config(fastproxy.load_config("fastproxy.toml"))
status: int = fastproxy.serve(cfg)
'''

# (line, what mypy must say about it)
BAD_LINES = [
    ("proxy = fastproxy.Proxy(123)", r'Argument 1 to "Proxy" has incompatible type "int"'),
    ("cfg = fastproxy.build_config(1, 2, 3)", r'Too many positional arguments for "build_config"'),
    ("fastproxy.load_config()", r'Missing positional argument "path"'),
    ("fastproxy.check_config('fastproxy.toml')", r'Argument 1 to "check_config" has incompatible type "str"'),
    ("fastproxy.Proxy(fastproxy.build_config({}), on_record=lambda rec: rec['clientid'])",
     r'TypedDict "Record" has no key "clientid"'),
    ("fastproxy.Proxy(fastproxy.build_config({})).start(5)", r'Too many arguments for "start"'),
    ("fastproxy.Proxyy", r'Module has no attribute "Proxyy"'),
]


def _mypy(tmp_path, name: str, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_text(text)
    # follow-imports=silent: errors inside the package are test_sourcecode's business, not
    # this program's; the package is found from the source tree (cwd).
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / ".mypy_cache"), str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_user_program_type_checks(tmp_path):
    pytest.importorskip("mypy")
    r = _mypy(tmp_path, "good.py", GOOD)
    assert r.returncode == 0, r.stdout + r.stderr


def test_user_program_with_wrong_calls_fails(tmp_path):
    """Each wrong call is reported on its own line: the names are not Any."""
    pytest.importorskip("mypy")
    text = "import fastproxy\n\n" + "\n".join(line for line, _ in BAD_LINES) + "\n"
    r = _mypy(tmp_path, "bad.py", text)
    assert r.returncode == 1, r.stdout + r.stderr
    for i, (line, message) in enumerate(BAD_LINES):
        lineno = i + 3
        assert re.search(rf"^\S*bad\.py:{lineno}: error: {message}", r.stdout, re.M), (
            f"no error for line {lineno} ({line}):\n{r.stdout}")
