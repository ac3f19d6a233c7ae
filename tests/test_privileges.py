"""Privileges (issue 13, part 8): --user/--group drop root once the ports are bound and the
keys read; a private key readable by every user is warned about."""
from __future__ import annotations

import os
import pwd
import shutil

import pytest

import proxyutil as U

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs the tests to run as root")


def ids_of(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])   # effective ids


@root_only
@pytest.mark.parametrize("workers", [1, 2])
def test_user_and_group_after_binding(certs, mosquitto, run_fastproxy, workers):
    """--user nobody --group nogroup on a TLS listener: the serving process(es) run as
    nobody:nogroup (the master of --workers stays root to restart workers), the key was read
    before the switch, and a device is served."""
    nobody = pwd.getpwnam("nobody")
    group = "nogroup"
    fp = run_fastproxy("--listen", f"{U.HOST}:{U.free_port()}", "--upstream", mosquitto.upstream,
                       "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                       "--user", "nobody", "--group", group, "--workers", str(workers))
    U.wait_until(lambda: "running as uid" in fp.stderr(), 10, what="the privilege drop line")
    servers = [fp.pid] if workers == 1 else sorted(U.descendants(fp.pid))
    assert len(servers) == workers, servers
    import grp
    for pid in servers:
        assert ids_of(pid) == (nobody.pw_uid, grp.getgrnam(group).gr_gid), pid
    o = U.try_connect(fp.port, U.connect_packet("after-drop", keepalive=30), tls_ctx=U.client_context(certs))
    assert o.code == 0, o


def test_unknown_user_is_a_configuration_error():
    r = U.run_cli("check", "--listen", "127.0.0.1:18830", "--upstream", "127.0.0.1:1883",
                  "--user", "no-such-user-here")
    assert "--user: no such user on this system: 'no-such-user-here'" in U.one_error_line(r)


def test_world_readable_private_key_is_warned_about(certs, tmp_path):
    key = tmp_path / "server.key"
    shutil.copy(certs.server_key, key)
    args = ["check", "--listen", "127.0.0.1:18831", "--upstream", "127.0.0.1:1883",
            "--tls-cert", certs.server_cert, "--tls-key", str(key)]
    key.chmod(0o600)
    r = U.run_cli(*args)
    assert r.returncode == 0 and "readable by every user" not in r.stderr + r.stdout, r.stderr
    key.chmod(0o644)
    r = U.run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"private key {key} is readable by every user of this host (mode 644)" in r.stderr + r.stdout
