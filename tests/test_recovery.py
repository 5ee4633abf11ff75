"""Crash recovery: a restarted daemon re-adopts live agents and records the ones it lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.host import enforcer, launcher, procfs
from tests.conftest import DaemonProcess, Events, alive, read_jsonl, simagent, wait_output

pytestmark = pytest.mark.anyio


def saved_peak(home: Home, subprocess_id: str) -> float:
    try:
        document = json.loads(home.state_file.read_text())
    except (OSError, ValueError):
        return 0.0
    peaks = [a["peak_mb"] for a in document["agents"] if a["subprocess_id"] == subprocess_id]
    return float(peaks[0]) if peaks else 0.0


def sigkill(daemon: DaemonProcess) -> None:
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)


async def test_sigkilled_daemon_restarts_and_keeps_enforcing(home: Home) -> None:
    first = DaemonProcess(home).start()
    try:
        async with first.async_client() as client:
            leaker = await client.launch("leaker", simagent("--hold-mb", "10", "--rate", "40"))
            steady = await client.launch("steady", simagent("--hold-mb", "5"))
            short = await client.launch("short", simagent("--hold-mb", "5", "--duration", "3"))
            # The daemon keeps run/state.json current within a second: wait until it holds
            # the leaker's growth, then crash the daemon.
            with anyio.fail_after(10):
                while saved_peak(home, leaker["subprocess_id"]) < 20:
                    await anyio.sleep(0.05)
        sigkill(first)
    finally:
        first.close()
    pids = [leaker["pid"], steady["pid"], short["pid"]]
    assert all(alive(pid) for pid in pids), "agents must survive their daemon's crash"
    assert home.default_socket.exists()  # stale: must not block the next start

    second = DaemonProcess(home).start()
    try:
        async with second.async_client() as client, second.async_client() as sub:
            events = await Events(sub).start()
            adopted = {a["subprocess_id"]: a for a in (await client.stats())["agents"]}
            assert set(adopted) == {
                leaker["subprocess_id"],
                steady["subprocess_id"],
                short["subprocess_id"],
            }
            assert adopted[leaker["subprocess_id"]]["peak_mb"] >= 20  # counters carried over
            killed = await events.exit_of(leaker["subprocess_id"], timeout_s=20)
            ended = await events.exit_of(short["subprocess_id"], timeout_s=20)
            stopped = await client.stop(steady["subprocess_id"], grace_s=2)
    finally:
        second.close()
    assert killed["reason"] == "memory_limit"
    assert killed["memory_stats"]["peak_mb"] >= 200
    assert "sigterm_sent" in events.alerts_of(leaker["subprocess_id"])
    assert (ended["reason"], ended["exit_code"]) == ("exited", None)  # status went to init
    assert stopped["reason"] == "stopped"
    assert not any(alive(pid) for pid in pids)
    ids = [r["subprocess_id"] for r in read_jsonl(home.stats_log)]
    assert sorted(ids) == sorted(
        [leaker["subprocess_id"], steady["subprocess_id"], short["subprocess_id"]]
    )


async def test_agent_that_ended_while_no_daemon_ran_is_recorded_lost(home: Home) -> None:
    first = DaemonProcess(home).start()
    try:
        async with first.async_client() as client:
            short = await client.launch("short", simagent("--hold-mb", "1", "--duration", "0.5"))
        sigkill(first)
    finally:
        first.close()
    with anyio.fail_after(10):
        while alive(short["pid"]):
            await anyio.sleep(0.05)
    second = DaemonProcess(home).start()
    second.close()
    (record,) = read_jsonl(home.stats_log)
    assert record["subprocess_id"] == short["subprocess_id"]
    assert (record["reason"], record["exit_code"], record["signal"]) == ("lost", None, None)


async def test_a_reused_pid_is_never_adopted_nor_signalled(home: Home) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        start = procfs.start_time(stranger.pid)
        assert start is not None
        home.run.mkdir(parents=True, exist_ok=True)
        home.state_file.write_text(
            json.dumps(
                {
                    "version": 1,
                    "daemon_pid": 1,
                    "agents": [
                        {
                            "subprocess_id": "ghost_000000000000",
                            "agent_type": "ghost",
                            "command": ["x"],
                            # The pid now belongs to someone else: same pid, another start time.
                            "pid": stranger.pid,
                            "start": start - 1,
                            "started_wall": "2026-11-26T10:00:00+00:00",
                            "limits": {},
                            "overrides": {},
                            "members": [[stranger.pid, start - 1]],
                        }
                    ],
                }
            )
        )
        daemon = DaemonProcess(home).start()
        async with daemon.async_client() as client:
            assert (await client.stats())["agents"] == []
        daemon.close()
        assert stranger.poll() is None, "a stranger with a reused pid was signalled"
        (record,) = read_jsonl(home.stats_log)
        assert (record["subprocess_id"], record["reason"]) == ("ghost_000000000000", "lost")
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("has_pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_signal_identity_never_signals_a_pid_with_another_start_time(
    monkeypatch: pytest.MonkeyPatch, has_pidfd: bool
) -> None:
    """The check under every signal the daemon sends: a live process whose start time is not
    the recorded one is a stranger that got the pid, and is left alone (with pidfds, and on
    the kill()-only path of kernels without them)."""
    monkeypatch.setattr(enforcer, "HAS_PIDFD", has_pidfd)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        start = procfs.start_time(stranger.pid)
        assert start is not None
        assert enforcer.signal_identity(stranger.pid, start - 1, signal.SIGKILL) is False
        assert enforcer.signal_identity(stranger.pid, start + 1, signal.SIGKILL) is False
        assert enforcer.signal_tree([(stranger.pid, start - 1)], signal.SIGKILL) == []
        # Had one of those SIGKILLs gone out, it would be what ended the process: the right
        # start time is signalled with SIGTERM, and SIGTERM is what ends it.
        assert stranger.poll() is None
        assert enforcer.signal_identity(stranger.pid, start, signal.SIGTERM) is True
        assert stranger.wait(timeout=5) == -signal.SIGTERM
        # Reaped, its pid belongs to no one: nothing to signal.
        assert enforcer.signal_identity(stranger.pid, start, signal.SIGKILL) is False
    finally:
        stranger.kill()
        stranger.wait()


def test_adopt_refuses_a_pid_with_another_start_time_or_a_zombie() -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        start = procfs.start_time(stranger.pid)
        assert start is not None
        assert launcher.adopt(stranger.pid, start - 1) is None
        assert launcher.adopt(stranger.pid, start + 1) is None
        child = launcher.adopt(stranger.pid, start)  # the control: the right one is adopted
        assert child is not None
        try:
            assert (child.pid, child.start, child.popen) == (stranger.pid, start, None)
        finally:
            os.close(child.pidfd)
        # Ended but not yet reaped, with the right start time: lost, not adopted.
        stranger.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while alive(stranger.pid):
            assert time.monotonic() < deadline, "the stranger did not become a zombie"
            time.sleep(0.01)
        assert procfs.start_time(stranger.pid) == start
        assert launcher.adopt(stranger.pid, start) is None
        assert stranger.poll() == -signal.SIGKILL
    finally:
        stranger.kill()
        stranger.wait()


async def test_second_daemon_on_the_same_home_refuses(daemon: DaemonProcess) -> None:
    second = subprocess.run(
        [*daemon_argv()],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1
    assert "already runs for" in second.stderr
    async with daemon.async_client() as client:
        assert await client.ping()  # the first daemon still has its socket


def daemon_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "supervisord", "daemon"]


async def test_shutdown_leave_agents_then_readopt(home: Home) -> None:
    first = DaemonProcess(home).start()
    try:
        async with first.async_client() as client:
            agent = await client.launch("steady", simagent("--hold-mb", "5", "--ignore-term"))
            await wait_output(home, agent["subprocess_id"], "simagent pid")
            result = await client.shutdown(leave_agents=True)
        assert result["leave_agents"] is True
        assert first.wait(20) == 0
    finally:
        first.close()
    assert alive(agent["pid"])
    assert read_jsonl(home.stats_log) == []
    second = DaemonProcess(home).start()
    try:
        async with second.async_client() as client:
            started = time.monotonic()
            record = await client.stop(agent["subprocess_id"], grace_s=0.5)
    finally:
        second.close()
    assert record["reason"] == "stopped"
    assert time.monotonic() - started >= 0.5  # it ignored SIGTERM: SIGKILL after the grace
    assert not alive(agent["pid"])
