"""Who may use the daemon, and as whom agents run: checked by really dropping privileges.

CI runs as root, so each test forks a child that becomes ``nobody`` and talks to the daemon
from there (the venv's interpreter lives under /root, which nobody may not exec, so the
child keeps the already-loaded client code instead of starting a new Python).
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisord.config.home import Home
from supervisord.control.client import Client
from supervisord.core.errors import SupervisordError
from tests.conftest import DaemonProcess, write_config

NOBODY = pwd.getpwnam("nobody")
AGENT = ["/bin/sh", "-c", "id -u; id -g; exec sleep 60"]


def as_nobody(action: Callable[[], Any]) -> Any:
    """Run ``action`` in a forked child that dropped to nobody; its result or its error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            outcome: dict[str, Any] = {"result": action()}
        except SupervisordError as exc:
            outcome = {"error": exc.code, "message": str(exc)}
        except OSError as exc:
            outcome = {"error": type(exc).__name__, "message": str(exc)}
        os.write(write_fd, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def shared_daemon(home: Home) -> Any:
    write_config(home, daemon={"allowed_groups": ["nogroup"]})
    # nobody must be able to reach the socket: /tmp/cpm-*/ is 0700 from mkdtemp.
    os.chmod(home.root.parent, 0o755)
    daemon = DaemonProcess(home).start()
    yield daemon
    daemon.close()


def test_socket_and_run_dir_modes_for_an_allowed_group(shared_daemon: DaemonProcess) -> None:
    home = shared_daemon.home
    assert oct(home.default_socket.stat().st_mode & 0o777) == "0o660"
    assert home.default_socket.stat().st_gid == NOBODY.pw_gid
    assert oct(home.run.stat().st_mode & 0o777) == "0o710"


def test_root_daemon_runs_agents_as_the_requesting_user(shared_daemon: DaemonProcess) -> None:
    socket_path = shared_daemon.socket

    def launch() -> dict[str, Any]:
        with Client(socket_path) as client:
            return client.launch("mine", AGENT, cwd="/tmp")

    outcome = as_nobody(launch)
    assert "result" in outcome, outcome
    pid = outcome["result"]["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
    assert uid_line.split()[1:] == [str(NOBODY.pw_uid)] * 4
    assert gid_line.split()[1:] == [str(NOBODY.pw_gid)] * 4
    log = shared_daemon.home.agent_log(outcome["result"]["subprocess_id"])
    assert log.stat().st_uid == NOBODY.pw_uid

    sid = outcome["result"]["subprocess_id"]

    def stop_own() -> dict[str, Any]:
        with Client(socket_path, timeout_s=30) as client:
            return client.stop(sid, grace_s=1)

    stopped = as_nobody(stop_own)
    assert stopped["result"]["reason"] == "stopped"


def test_a_user_may_not_end_someone_elses_agent(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as client:
        roots = client.launch("roots", AGENT)
    socket_path = shared_daemon.socket

    def kill() -> dict[str, Any]:
        with Client(socket_path) as client:
            return client.kill(roots["subprocess_id"])

    outcome = as_nobody(kill)
    assert outcome["error"] == "permission_denied"
    assert f"launched by uid {os.getuid()}" in outcome["message"]
    with shared_daemon.client() as client:
        assert client.stats(roots["subprocess_id"])["pid"] == roots["pid"]  # still running
        client.kill(roots["subprocess_id"])


def test_a_user_outside_the_allowed_groups_is_refused(daemon: DaemonProcess) -> None:
    # The default daemon allows no groups: even with the directory made reachable,
    # SO_PEERCRED refuses nobody before any command runs.
    os.chmod(daemon.home.root.parent, 0o755)
    os.chmod(daemon.home.run, 0o755)
    os.chmod(daemon.socket, 0o666)
    socket_path = daemon.socket

    def launch() -> dict[str, Any]:
        with Client(socket_path) as client:
            return client.launch("sneaky", AGENT, cwd="/tmp")

    try:
        outcome = as_nobody(launch)
    finally:
        os.chmod(daemon.home.run, 0o700)
        os.chmod(daemon.socket, 0o600)
    assert outcome["error"] == "permission_denied"
    with daemon.client() as client:
        assert client.stats()["agents"] == []
