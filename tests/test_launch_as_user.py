"""Another user's agent enters its cwd as that user, after the privilege drop: a directory
they may not search stays closed to them, however freely the root daemon may enter it.

Runs as root (CI does): the daemon's tests fork a child that becomes ``nobody`` to ask.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisord.client import Client
from supervisord.config.home import Home
from supervisord.host import launcher
from supervisord.host.agentlog import OutputPlace
from supervisord.host.cgroup.base import SHIM_FAILED_EXIT, AgentCgroup
from supervisord.host.cgroup.detect import detect
from tests.conftest import DaemonProcess
from tests.test_security import NOBODY, as_nobody, shared_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="launching as another user needs root")
__all__ = ["shared_daemon"]  # the fixture, used by name

SECRET = "top-secret-4f1c9a"
SHARED = "shared-content-77b2"


def make_dirs(base: Path) -> tuple[Path, Path]:
    """``locked``: root's, 0700, holding a world-readable file (only the directory guards
    it). ``shared``: root's, 0710 for nobody's group, so nobody may enter it."""
    os.chmod(base, 0o755)
    locked, shared = base / "locked", base / "shared"
    locked.mkdir(mode=0o700)
    (locked / "secret").write_text(SECRET)
    shared.mkdir()
    os.chown(shared, 0, NOBODY.pw_gid)
    os.chmod(shared, 0o710)
    (shared / "secret").write_text(SHARED)
    for path in (locked / "secret", shared / "secret"):
        os.chmod(path, 0o644)
    return locked, shared


def launch_as_nobody(daemon: DaemonProcess, command: list[str], cwd: Path) -> dict[str, Any]:
    socket_path = daemon.socket

    def launch() -> dict[str, Any]:
        with Client(socket_path) as client:
            return client.launch("peek", command, cwd=str(cwd))

    outcome: dict[str, Any] = as_nobody(launch)
    return outcome


def every_log_text(home: Home) -> str:
    return "".join(p.read_text(errors="replace") for p in home.agent_logs.rglob("*") if p.is_file())


def test_a_cwd_the_user_may_not_enter_is_a_launch_error(shared_daemon: DaemonProcess) -> None:
    home = shared_daemon.home
    locked, _ = make_dirs(home.root.parent)
    outcome = launch_as_nobody(shared_daemon, ["/bin/cat", "secret"], locked)
    assert outcome.get("error") == "launch_failed", outcome
    assert "may not enter" in outcome["message"]
    assert str(locked) in outcome["message"]
    assert SECRET not in every_log_text(home)
    assert not list(home.agent_logs.glob("peek_*")), "a refused launch leaves no log"


def test_a_cwd_the_user_may_enter_works_and_is_entered_as_them(
    shared_daemon: DaemonProcess,
) -> None:
    home = shared_daemon.home
    _, shared = make_dirs(home.root.parent)
    outcome = launch_as_nobody(shared_daemon, ["/bin/sh", "-c", "id -u; pwd; cat secret"], shared)
    assert "result" in outcome, outcome
    log = home.agent_log(outcome["result"]["subprocess_id"])
    deadline = time.monotonic() + 10
    while SHARED not in (text := log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, text
        time.sleep(0.02)
    assert text.splitlines() == [str(NOBODY.pw_uid), str(shared), SHARED]


@pytest.fixture
def v1_group() -> Iterator[AgentCgroup]:
    detection = detect(None, "required", group=f"claude-pm-test-{secrets.token_hex(4)}")
    if detection.manager is None:
        pytest.skip(f"no memory cgroup to place agents in: {detection.reason}")
    manager = detection.manager
    group = manager.create(f"peek_{secrets.token_hex(6)}", 64 * 1024 * 1024)
    try:
        yield group
    finally:
        group.remove(timeout_s=5)
        manager.remove(timeout_s=5)


@pytest.fixture(params=["plain shim", "cgroup shim"])
def cgroup(request: pytest.FixtureRequest) -> AgentCgroup | None:
    if request.param == "plain shim":
        return None
    group: AgentCgroup = request.getfixturevalue("v1_group")
    return group


@pytest.mark.anyio
async def test_the_shim_refuses_the_directory_when_the_check_is_passed_by(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, cgroup: AgentCgroup | None
) -> None:
    """The up-front check reads mode bits; the shim's ``cd``, run as the user, is what
    enforces it (an ACL, a directory changed in between): exit 125, nothing read."""
    monkeypatch.setattr(launcher, "_require_enterable", lambda directory, user: None)
    locked, _ = make_dirs(short_tmp)
    home = Home(short_tmp / ".claude-pm")
    home.run.mkdir(parents=True)
    spec = launcher.LaunchSpec(
        subprocess_id="peek_1",
        agent_type="peek",
        command=("/bin/cat", "secret"),
        log_path=home.agent_log("peek_1"),
        cwd=str(locked),
        env={"PATH": "/usr/bin:/bin"},
        user=launcher.Credentials(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid),
        cgroup=cgroup,
    )
    child = launcher.spawn(spec, OutputPlace(home, max_bytes=0, backups=0))
    with anyio.fail_after(10):
        status = await launcher.wait_exit(child)
        await child.output.drain()
    text = spec.log_path.read_text()
    assert status.exit_code == SHIM_FAILED_EXIT, text
    assert "can't cd" in text
    assert SECRET not in text
