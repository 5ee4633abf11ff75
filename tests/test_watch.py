"""``claude-pm watch PID`` and ``unwatch``: trees started outside the daemon, supervised like
launched agents, and let go without a signal."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisord.control.client import Client
from supervisord.core.errors import NotFoundError, RemoteError
from tests.conftest import TEST_MEMORY, DaemonProcess, alive, read_jsonl, simagent
from tests.test_cli import CLI
from tests.test_security import as_nobody, attempt, shared_daemon

__all__ = ["shared_daemon"]  # the fixture, for the test run as nobody


class Outsider:
    """A process started in a session of its own, not the test's child nor the daemon's."""

    def __init__(self, directory: Path, command: list[str]) -> None:
        pid_file = directory / f"outsider-{time.monotonic_ns()}.pid"
        shim = 'echo $$ >"$0"; exec "$@"'
        subprocess.run(["setsid", "-f", "/bin/sh", "-c", shim, str(pid_file), *command], check=True)
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the outsider did not start"
            time.sleep(0.01)
        self.pid = int(pid_file.read_text())
        # Until it execs, the pid is the shim's: wait for the command itself.
        while shim.encode() in Path(f"/proc/{self.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the outsider did not exec"
            time.sleep(0.01)

    def cgroup(self) -> str:
        return Path(f"/proc/{self.pid}/cgroup").read_text()

    def kill(self) -> None:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def outsiders(short_tmp: Path) -> Iterator[list[Outsider]]:
    started: list[Outsider] = []
    yield started
    for outsider in started:
        outsider.kill()


def wait_record(daemon: DaemonProcess, sid: str, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for r in read_jsonl(daemon.home.stats_log) if r["subprocess_id"] == sid]
        if records:
            return records[0]
        assert time.monotonic() < deadline, f"no stats record for {sid}"
        time.sleep(0.05)


def test_a_leaker_started_elsewhere_is_adopted_killed_and_recorded(
    daemon: DaemonProcess, short_tmp: Path, outsiders: list[Outsider]
) -> None:
    leaker = Outsider(short_tmp, simagent("--hold-mb", "10", "--rate", "150", "--cap", "280"))
    outsiders.append(leaker)
    with daemon.client() as client:
        watched = client.watch(leaker.pid)
        sid = watched["subprocess_id"]
        assert watched["agent_type"] == "python"  # its command's basename
        stats = client.stats(sid)
    assert stats["watched"] is True
    assert stats["supervised_by"] == "cgroup"  # v1 as root: the daemon may move it
    assert stats["measured"] in (None, "rss")  # what it charged before stayed where it was
    record = wait_record(daemon, sid)
    assert record["reason"] == "memory_limit"
    assert record["exit_code"] is None  # not the daemon's child: its status was not ours
    assert record["memory_stats"]["peak_mb"] >= TEST_MEMORY["max_mb"]
    assert not alive(leaker.pid)
    alerts = [a["event"] for a in read_jsonl(daemon.home.alerts_log) if a["subprocess_id"] == sid]
    assert "sigterm_sent" in alerts


def test_unwatch_lets_a_tree_go_unsignalled_and_where_it_was(
    daemon: DaemonProcess, short_tmp: Path, outsiders: list[Outsider]
) -> None:
    marks = short_tmp / "signals"
    loop = f'trap "echo TERM >>{marks}" TERM; while :; do sleep 0.1; done'
    other = Outsider(short_tmp, ["/bin/sh", "-c", loop])
    outsiders.append(other)
    before = other.cgroup()
    with daemon.client() as client:
        sid = client.watch(other.pid, "looper")["subprocess_id"]
        if client.stats(sid)["supervised_by"] == "cgroup":
            assert other.cgroup() != before  # moved into the agent's group
        assert CLI(daemon.home).ok("unwatch", sid).strip() == f"{sid} let go"
        with pytest.raises(NotFoundError):
            client.stats(sid)
        launched = client.launch("sleepy", ["sleep", "30"])
        with pytest.raises(RemoteError, match="was launched by the daemon, not watched"):
            client.unwatch(launched["subprocess_id"])
        client.kill(launched["subprocess_id"])
    time.sleep(0.5)
    assert alive(other.pid)
    assert not marks.exists()  # never signalled
    assert other.cgroup() == before
    assert [r for r in read_jsonl(daemon.home.stats_log) if r["subprocess_id"] == sid] == []


def test_watch_refuses_what_it_may_not_adopt(
    daemon: DaemonProcess, short_tmp: Path, outsiders: list[Outsider]
) -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    sleeper = Outsider(short_tmp, ["sleep", "30"])
    outsiders.append(sleeper)
    with daemon.client() as client:
        with pytest.raises(NotFoundError, match=f"watch: no process {pid_max + 1}"):
            client.watch(pid_max + 1)
        with pytest.raises(RemoteError, match=r"watch: pid 2 \(kthreadd\) is a kernel thread"):
            client.watch(2)
        daemon_pid = client.hello()["pid"]
        with pytest.raises(RemoteError, match=f"watch: pid {daemon_pid} .* is not an agent"):
            client.watch(daemon_pid)
        sid = client.watch(sleeper.pid, "sleeper")["subprocess_id"]
        with pytest.raises(RemoteError, match=f"watch: pid {sleeper.pid} is already supervised"):
            client.watch(sleeper.pid)
        with pytest.raises(RemoteError, match="agent type 'Bad_Type' is not allowed"):
            client.watch(sleeper.pid, "Bad_Type")
        client.kill(sid)
    done = CLI(daemon.home)("watch", "not-a-pid")
    assert done.returncode == 2
    assert "argument PID: invalid int value" in done.stderr


def test_a_user_may_not_watch_a_process_they_do_not_own(
    shared_daemon: DaemonProcess, short_tmp: Path, outsiders: list[Outsider]
) -> None:
    roots = Outsider(short_tmp, ["sleep", "30"])
    outsiders.append(roots)
    socket_path = shared_daemon.socket

    def try_it() -> dict[str, Any]:
        with Client(socket_path, timeout_s=30) as client:
            return attempt(lambda: client.watch(roots.pid))

    outcome = as_nobody(try_it)["result"]
    assert outcome["error"] == "permission_denied"
    assert f"may not watch pid {roots.pid}: it runs as uid 0" in outcome["message"]
    with shared_daemon.client() as client:
        assert client.status()["agents"] == []


def test_a_watched_agent_is_readopted_by_the_next_daemon(
    daemon: DaemonProcess, short_tmp: Path, outsiders: list[Outsider]
) -> None:
    sleeper = Outsider(short_tmp, ["sleep", "30"])
    outsiders.append(sleeper)
    before = sleeper.cgroup()
    with daemon.client() as client:
        sid = client.watch(sleeper.pid, "sleeper")["subprocess_id"]
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    daemon.start()
    with daemon.client() as client:
        stats = client.stats(sid)
        assert (stats["pid"], stats["watched"], stats["supervised_by"]) == (
            sleeper.pid,
            True,
            "cgroup",
        )
        client.unwatch(sid)
    assert alive(sleeper.pid)
    assert sleeper.cgroup() == before


def test_the_reason_line_never_goes_where_the_agents_user_may_not_write(
    short_tmp: Path,
) -> None:
    """A root daemon reopening /proc/PID/fd/2 gets root's rights: a file a user holds only
    for reading (or any regular file) is refused, a pipe or terminal of theirs is used."""
    from supervisord.host.watching import open_stderr

    nobody = pwd.getpwnam("nobody")
    precious = short_tmp / "precious"
    precious.write_text("keep me\n")
    precious.chmod(0o644)  # root's, world-readable: nobody may read it, not write it
    with open(precious, "rb") as readonly:
        held = subprocess.Popen(["sleep", "30"], stderr=readonly, user=nobody.pw_uid)
    try:
        assert open_stderr(held.pid, nobody.pw_uid) is None
        assert open_stderr(held.pid, 0) is None  # a regular file, whoever's
    finally:
        held.kill()
        held.wait()
    assert precious.read_text() == "keep me\n"
    read_end, write_end = os.pipe()
    piped = subprocess.Popen(["sleep", "30"], stderr=write_end)
    os.close(write_end)
    try:
        out = open_stderr(piped.pid, 0)
        assert out is not None
        out.write("claude-pm: the line\n")
        out.close()
        assert os.read(read_end, 100) == b"claude-pm: the line\n"
    finally:
        piped.kill()
        piped.wait()
        os.close(read_end)
