"""Agents' output logs: the daemon drains each agent's FIFO into a log it rotates, recreates
when deleted or moved, and keeps feeding across a daemon restart; real agents throughout."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
from pathlib import Path

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.core.errors import LaunchError, RemoteError
from supervisord.host import agentlog, launcher
from supervisord.host.logfile import RotatingFile
from tests.conftest import DaemonProcess, Events, alive, wait_output, write_config

pytestmark = pytest.mark.anyio


def printer(count: int, pause_s: float = 0.0, pad: int = 30, gate: str = "") -> list[str]:
    """An agent printing ``count`` numbered lines, odd ones to stderr, then ``done``.

    With ``gate``, it prints ``ready`` first and waits for that file to exist."""
    script = f"""
import os, sys, time
if {gate!r}:
    print("ready", flush=True)
    while not os.path.exists({gate!r}):
        time.sleep(0.01)
for i in range({count}):
    print(f"line {{i:05d}} " + "x" * {pad}, file=sys.stderr if i % 2 else sys.stdout, flush=True)
    if {pause_s}:
        time.sleep({pause_s})
print("done", flush=True)
"""
    return [sys.executable, "-c", script]


def numbered(*paths: Path) -> list[int]:
    """The line numbers the printer's lines carry, file after file."""
    found = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("line "):
                found.append(int(line.split()[1]))
    return found


def rotated(log: Path) -> list[Path]:
    """The log's backups oldest first, then the log itself."""
    backups = sorted(log.parent.glob(f"{log.name}.*"), key=lambda p: -int(p.suffix[1:]))
    return [*backups, log]


async def test_output_rotates_by_size_with_backups_and_nothing_is_lost(home: Home) -> None:
    write_config(home, daemon={"agent_log_max_bytes": 2000, "log_backups": 3})
    daemon = DaemonProcess(home).start()
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            sid = (await client.launch("talker", printer(150)))["subprocess_id"]
            record = await events.exit_of(sid)
    finally:
        daemon.close()
    assert record["exit_code"] == 0
    files = rotated(home.agent_log(sid))
    assert [p.name for p in files] == [f"{sid}.log.{n}" for n in (3, 2, 1)] + [f"{sid}.log"]
    assert all(p.stat().st_size <= 2000 for p in files)
    # 150 lines of 41 bytes fill three files and a half: all there, in order, stderr too,
    # each line whole (rotation cuts at line ends), and the tail is in before the record.
    assert numbered(*files) == list(range(150))
    assert files[-1].read_text().endswith("done\n")
    assert not list((home.run / "agents").iterdir()), "the FIFO goes with the agent"


async def test_a_log_moved_away_or_deleted_is_recreated_and_nothing_is_lost(
    daemon: DaemonProcess,
) -> None:
    home = daemon.home
    gate = home.root / "go"
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        sid = (await client.launch("talker", printer(400, pause_s=0.005, gate=str(gate))))[
            "subprocess_id"
        ]
        await wait_output(home, sid, "ready")
        log = home.agent_log(sid)
        gate.touch()
        await wait_output(home, sid, "line 00100")
        moved = home.root / "moved.log"
        log.rename(moved)  # logrotate without copytruncate, or a user clearing logs
        with anyio.fail_after(10):
            while not log.exists():
                await anyio.sleep(0.01)
        record = await events.exit_of(sid)
        assert record["exit_code"] == 0
        # Every line the agent wrote after the move is in the recreated file: none lost,
        # none twice, each line whole on one side or the other.
        assert numbered(moved, log) == list(range(400))

        gated = home.root / "go2"
        second = (await client.launch("talker", printer(5, gate=str(gated))))["subprocess_id"]
        await wait_output(home, second, "ready")
        shutil.rmtree(home.agent_logs)
        gated.touch()
        await events.exit_of(second)
    assert numbered(home.agent_log(second)) == list(range(5))


@pytest.mark.parametrize("how", ["leave_agents", "sigkill"])
async def test_output_goes_on_across_a_daemon_restart(home: Home, how: str) -> None:
    # 1500 lines of ~110 bytes (165 KB) over about 3 s: more than the 64 KiB pipe buffer is
    # written while no daemon runs, so the agent blocks (never SIGPIPE) until one drains it.
    first = DaemonProcess(home).start()
    try:
        async with first.async_client() as client:
            agent = await client.launch("talker", printer(1500, pause_s=0.001, pad=100))
            await wait_output(home, agent["subprocess_id"], "line 00100")
            if how == "leave_agents":
                await client.shutdown(leave_agents=True)
        if how == "sigkill":
            first.signal(signal.SIGKILL)
        first.wait(20)
    finally:
        first.close()
    await anyio.sleep(1.0)
    assert alive(agent["pid"]), "the agent must outlive its daemon's absence"
    second = DaemonProcess(home).start()
    try:
        async with second.async_client() as sub:
            events = await Events(sub).start()
            record = await events.exit_of(agent["subprocess_id"], timeout_s=30)
    finally:
        second.close()
    assert record["reason"] == "exited"
    log = home.agent_log(agent["subprocess_id"])
    assert numbered(log) == list(range(1500))
    assert log.read_text().endswith("done\n")


async def test_a_failed_launch_leaves_no_empty_log_behind(daemon: DaemonProcess) -> None:
    home = daemon.home
    async with daemon.async_client() as client:
        for command in (["/nonexistent/agent-binary"], ["no-such-agent-program-anywhere"]):
            with pytest.raises(RemoteError) as failed:
                await client.launch("broken", command)
            assert failed.value.code == "launch_failed"
        assert (await client.stats())["agents"] == []
    assert not list(home.agent_logs.glob("broken_*")), "no log of an agent that never ran"
    fifos = home.run / "agents"
    assert not fifos.exists() or not list(fifos.iterdir())


@pytest.mark.parametrize("cwd", [None, "/nonexistent-dir"])
def test_spawn_that_fails_removes_the_fifo_and_the_log(tmp_path: Path, cwd: str | None) -> None:
    home = Home(tmp_path / "home")
    home.run.mkdir(parents=True)
    spec = launcher.LaunchSpec(
        subprocess_id="broken_1",
        agent_type="broken",
        command=("/nonexistent/agent-binary",),
        log_path=home.agent_log("broken_1"),
        cwd=cwd,
    )
    with pytest.raises(LaunchError):
        launcher.spawn(spec, agentlog.OutputPlace(home, max_bytes=0, backups=0))
    assert not home.agent_log("broken_1").exists()
    assert not list((home.run / "agents").iterdir())


def test_rotating_file_cuts_at_line_ends_and_gives_new_files_to_their_owner(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a" / "out.log"
    owner = (65534, 65534) if os.geteuid() == 0 else None
    log = RotatingFile(path, max_bytes=10, backups=1, owner=owner)
    log.write(b"aaaa\nbbbb\ncc")  # 12 bytes: the first two lines fit, "cc" starts a new file
    log.write(b"c\n" + b"x" * 25 + b"\n")  # a line longer than a file gets a file alone
    log.write(b"dd\n")
    log.close()
    assert path.with_name("out.log.1").read_bytes() == b"x" * 25 + b"\n"
    assert path.read_bytes() == b"dd\n"
    if owner is not None:
        assert (path.stat().st_uid, path.stat().st_gid) == owner


async def test_drain_survives_an_unwritable_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = Home(tmp_path / "home")
    home.run.mkdir(parents=True)
    place = agentlog.OutputPlace(home, max_bytes=0, backups=0)
    log_path = home.agent_log("x_1")
    output, agent_end = agentlog.AgentOutput.create(place, "x_1", log_path, None)
    fifo = place.fifo("x_1")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    shutil.rmtree(home.logs)
    home.logs.write_text("a file where the log directory should be")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(output.drain)
            os.write(agent_end, b"to stderr instead\n")
            await anyio.sleep(0.05)
            home.logs.unlink()
            os.write(agent_end, b"back in the log\n")
            os.close(agent_end)  # the last writer: EOF ends the drain
    assert "to stderr instead" in capsys.readouterr().err
    assert log_path.read_bytes() == b"back in the log\n"
    assert output.failures == 1
    assert not fifo.exists()
