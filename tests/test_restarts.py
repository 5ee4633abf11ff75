"""Restart policies end to end: a real daemon, real agents that fail or leak, real records.

Delays are configured small (0.2 s, doubling) and jitter 0, so the backoff is measured, not
assumed; every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest

from supervisord.control.client import AsyncClient
from supervisord.core.errors import NotFoundError, RemoteError
from tests.conftest import (
    DaemonProcess,
    Events,
    agent_script,
    read_jsonl,
    simagent,
    wait_output,
    write_config,
)

pytestmark = pytest.mark.anyio
FAST: dict[str, Any] = {"restart_delay_s": 0.2, "restart_backoff": 2, "restart_jitter": 0}


def runs_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def wait_runs(path: Path, count: int) -> list[dict[str, Any]]:
    """Until ``count`` runs of the resumer have said how they were started."""
    with anyio.fail_after(10):
        while len(seen := runs_of(path)) < count:
            await anyio.sleep(0.02)
    return seen


def records_of(daemon: DaemonProcess, sid: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(daemon.home.stats_log) if r["subprocess_id"] == sid]


async def test_on_failure_backs_off_then_fails_at_the_limit(daemon: DaemonProcess) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        started = await client.launch(
            "flaky",
            simagent("--duration", "0", "--exit-code", "1"),
            restart={**FAST, "restart": "on-failure", "restart_limit": 4},
        )
        sid = started["subprocess_id"]
        limit = await events.next_matching(20, type="restart_limit", subprocess_id=sid)
        alert = await events.next_matching(5, type="alert", event="restart_limit")
    mine = [e for e in events.seen if e.get("subprocess_id") == sid]
    restarting = [e for e in mine if e["type"] == "restarting"]
    assert [e["delay_s"] for e in restarting] == [0.2, 0.4, 0.8]
    assert [(e["run"], e["reason"], e["exit_code"]) for e in restarting] == [
        (1, "exited", 1),
        (2, "exited", 1),
        (3, "exited", 1),
    ]
    # Each run starts its delay after the one before ended (never sooner), and soon after.
    exits = [e for e in mine if e["type"] == "exit"]
    relaunched = [e for e in mine if e["type"] == "restarted"]
    assert [e["run"] for e in relaunched] == [2, 3, 4]
    for ended, again, delay in zip(exits, relaunched, (0.2, 0.4, 0.8), strict=False):
        gap = _instant(again) - _instant(ended)
        assert delay - 0.02 <= gap <= delay + 0.6, (delay, gap)
    assert limit["run"] == 4
    assert limit["restarts"] == 3
    assert alert["subprocess_id"] == sid
    assert alert["level"] == "CRITICAL"
    assert "4 runs started within 300 s" in alert["message"]

    records = records_of(daemon, sid)
    assert [(r["run"], r["restarts"], r["next_restart_s"]) for r in records] == [
        (1, 0, 0.2),
        (2, 1, 0.4),
        (3, 2, 0.8),
        (4, 3, None),
    ]
    assert [a["event"] for a in read_jsonl(daemon.home.alerts_log)] == ["restart_limit"]
    async with daemon.async_client() as client:
        status = await client.status()
    assert [f["subprocess_id"] for f in status["failed"]] == [sid]
    assert status["failed"][0]["status"] == "FAILED"
    log = daemon.home.agent_log(sid).read_text()
    assert [f"{sid} run {n} (restart {n - 1})" in log for n in (2, 3, 4)] == [True] * 3


def _instant(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["ts"].rstrip("Z")).timestamp()


class Resumed(NamedTuple):
    first: dict[str, Any]  # run 1's record
    stats: dict[str, Any]  # while run 2 runs
    ended: dict[str, Any]  # run 2's record (stopped)
    seen: list[dict[str, Any]]  # how each run was started


async def leak_then_resume(
    daemon: DaemonProcess, argv_file: Path, first: list[str], resume: list[str], **restart: Any
) -> Resumed:
    """A resumer that leaks to its limit in run 1 and idles, resumed, in run 2."""
    agent = agent_script("resumer", str(argv_file))
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        started = await client.launch(
            "resumer",
            [*agent, *first, "--rate", "300", "--cap", "260"],
            restart={
                **FAST,
                "restart": "on-abort",
                "resume_command": [*agent, *resume, "--rate", "0"],
                **restart,
            },
        )
        sid = started["subprocess_id"]
        record = await events.exit_of(sid)
        await events.next_matching(10, type="restarted", subprocess_id=sid, run=2)
        stats = await client.stats(sid)
        seen = await wait_runs(argv_file, 2)
        ended = await client.stop(sid)
    assert stats["session_uuid"] == started["session_uuid"]
    return Resumed(record, stats, ended, seen)


async def test_on_abort_leaker_is_resumed_with_its_session_uuid(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    first, stats, ended, seen = await leak_then_resume(
        daemon,
        tmp_path / "argv.jsonl",
        ["--session-id", "{session_uuid}"],
        ["--resume", "{session_uuid}"],
    )
    uuid = stats["session_uuid"]
    assert (stats["run"], stats["restarts"]) == (2, 1)
    assert first["reason"] == "memory_limit"
    assert first["next_restart_s"] == 0.2
    assert ended["reason"] == "stopped"
    assert ended["run"] == 2
    assert ended["next_restart_s"] is None
    assert [s["argv"][:2] for s in seen] == [["--session-id", uuid], ["--resume", uuid]]
    assert [(s["run"], s["restarts"], s["session_uuid"]) for s in seen] == [
        ("1", "0", uuid),
        ("2", "1", uuid),
    ]


async def test_a_captured_session_id_reaches_the_next_run(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    _, stats, _, seen = await leak_then_resume(
        daemon,
        tmp_path / "argv.jsonl",
        ["--say", "session: abc123"],
        ["--resume", "{session_id}"],
        session_pattern=r"session: (\S+)",
    )
    assert stats["session_id"] == "abc123"
    assert [s["argv"][:2] for s in seen] == [["--say", "session: abc123"], ["--resume", "abc123"]]


async def test_resume_needing_an_uncaptured_session_id_runs_command_again(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    argv_file = tmp_path / "argv.jsonl"
    agent = agent_script("resumer", str(argv_file))
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        started = await client.launch(
            "silent",
            [*agent, "--first", "--duration", "0", "--exit-code", "3"],
            restart={
                **FAST,
                "restart": "on-failure",
                "restart_limit": 2,
                "session_pattern": r"session: (\S+)",
                "resume_command": [*agent, "--resume", "{session_id}"],
            },
        )
        await events.next_matching(20, type="restart_limit", subprocess_id=started["subprocess_id"])
    assert [s["argv"][0] for s in runs_of(argv_file)] == ["--first", "--first"]


async def test_stop_cancels_a_pending_restart(daemon: DaemonProcess) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        started = await client.launch(
            "flaky",
            simagent("--duration", "0", "--exit-code", "1"),
            restart={"restart": "on-failure", "restart_delay_s": 30, "restart_jitter": 0},
        )
        sid = started["subprocess_id"]
        await events.next_matching(10, type="restarting", subprocess_id=sid)
        queue = await client.queue()
        assert [(r["subprocess_id"], r["run"]) for r in queue["restarting"]] == [(sid, 2)]
        ended = await client.stop(sid)
        assert ended["restart_cancelled"] is True
        assert ended["next_restart_s"] is None
        assert ended["run"] == 1
        assert ended["exit_code"] == 1
        assert (await client.queue())["restarting"] == []
        with pytest.raises(NotFoundError, match="no agent"):
            await client.stop(sid)
    assert [r["run"] for r in records_of(daemon, sid)] == [1]


async def test_stop_and_kill_end_the_restarts_of_a_running_agent(daemon: DaemonProcess) -> None:
    always = {"restart": "always", "restart_delay_s": 0, "restart_jitter": 0}
    async with daemon.async_client() as client:
        stopped = await client.launch("sleepy", ["sleep", "60"], restart=always)
        killed = await client.launch("sleepy", ["sleep", "60"], restart=always)
        a = await client.stop(stopped["subprocess_id"])
        b = await client.kill(killed["subprocess_id"])
        await anyio.sleep(0.5)
        status = await client.status()
    assert (a["next_restart_s"], b["next_restart_s"]) == (None, None)
    assert status["agents"] == []
    assert status["restarting"] == []


async def test_restart_command_ends_the_run_and_starts_the_next_at_once(
    daemon: DaemonProcess,
) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        started = await client.launch("sleepy", simagent("--duration", "60"))
        sid = started["subprocess_id"]
        await wait_output(daemon.home, sid, "simagent pid")
        result = await client.restart(sid)
        again = await events.next_matching(10, type="restarted", subprocess_id=sid)
        stats = await client.stats(sid)
        await client.stop(sid)
    assert result["ended"]["reason"] == "restart"
    assert result["run"] == 2
    assert result["ended"]["next_restart_s"] == 0.0
    assert again["run"] == 2
    assert again["pid"] == stats["pid"] != started["pid"]
    assert stats["session_uuid"] == started["session_uuid"]


def test_a_restart_due_while_the_daemon_was_dead_happens_when_it_is_back(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    argv_file = tmp_path / "argv.jsonl"
    agent = agent_script("resumer", str(argv_file))
    with daemon.client() as client:
        started = client.launch(
            "flaky",
            [*agent, "--duration", "0", "--exit-code", "1"],
            restart={
                "restart": "on-failure",
                "restart_delay_s": 1.5,
                "restart_jitter": 0,
                "resume_command": [*agent, "--again", "--duration", "60"],
            },
        )
        sid = started["subprocess_id"]
        deadline = time.monotonic() + 10
        while not client.queue()["restarting"]:
            assert time.monotonic() < deadline, "no restart became due"
            time.sleep(0.05)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    time.sleep(1.6)  # the restart falls due while no daemon runs
    daemon.start()
    with daemon.client() as client:
        deadline = time.monotonic() + 10
        while sid not in {a["subprocess_id"] for a in client.status()["agents"]}:
            assert time.monotonic() < deadline, "the restart did not happen"
            time.sleep(0.05)
        stats = client.stats(sid)
        while len(runs_of(argv_file)) < 2:
            assert time.monotonic() < deadline, "the second run never started its agent"
            time.sleep(0.02)
        client.stop(sid)
    assert (stats["run"], stats["session_uuid"]) == (2, started["session_uuid"])
    assert [s["argv"][0] for s in runs_of(argv_file)] == ["--duration", "--again"]


async def test_after_runs_agents_in_order_and_cancels_on_failure(daemon: DaemonProcess) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        first = await client.launch("step", simagent("--duration", "0.5"))
        second = await client.launch(
            "step", simagent("--duration", "0"), after=[first["subprocess_id"]]
        )
        assert second["queued"] is True
        assert second["pid"] is None
        failing = await client.launch(
            "step", simagent("--duration", "0", "--exit-code", "2"), after=[second["subprocess_id"]]
        )
        doomed = await client.launch(
            "step", simagent("--duration", "0"), after=[failing["subprocess_id"]]
        )
        waits = (await client.queue())["waiting"]
        assert [w["subprocess_id"] for w in waits] == [
            second["subprocess_id"],
            failing["subprocess_id"],
            doomed["subprocess_id"],
        ]
        cancelled = await events.next_matching(
            20, type="cancelled", subprocess_id=doomed["subprocess_id"]
        )
    launches = [e["subprocess_id"] for e in events.seen if e["type"] == "launch"]
    exits = [e["subprocess_id"] for e in events.seen if e["type"] == "exit"]
    order = [first["subprocess_id"], second["subprocess_id"], failing["subprocess_id"]]
    assert launches == order
    assert exits == order
    assert (
        f"{failing['subprocess_id']}, which it waited for, exited with exit code 2"
        in (cancelled["reason"])
    )


async def test_after_an_agent_that_already_ended(aclient: AsyncClient) -> None:
    async with anyio.create_task_group():
        ok = await aclient.launch("step", simagent("--duration", "0"))
        bad = await aclient.launch("step", simagent("--duration", "0", "--exit-code", "1"))
        with anyio.fail_after(10):
            while (await aclient.status())["agents"]:
                await anyio.sleep(0.05)
        started = await aclient.launch(
            "step", simagent("--duration", "0"), after=[ok["subprocess_id"]]
        )
        assert started["queued"] is False
        assert started["pid"] is not None
        with pytest.raises(RemoteError, match="already exited with exit code 1"):
            await aclient.launch("step", simagent(), after=[bad["subprocess_id"]])


@pytest.mark.parametrize(
    ("restart", "named"),
    [
        ({"restart": "sometimes"}, "launch.restart = 'sometimes' is not allowed"),
        ({"restart_delay_s": -1}, "launch.restart_delay_s"),
        ({"restart_backoff": 0.5}, "launch.restart_backoff = 0.5 is not allowed"),
        ({"session_pattern": "session: (\\S+"}, "launch.session_pattern"),
        ({"session_pattern": "session: \\S+"}, "has 0 groups"),
        ({"restart_limit": 0}, "launch.restart_limit"),
    ],
)
async def test_bad_restart_settings_are_refused_naming_the_key(
    aclient: AsyncClient, restart: dict[str, Any], named: str
) -> None:
    with pytest.raises(RemoteError, match=named.replace("(", r"\(").replace(".", r"\.")):
        await aclient.launch("step", ["sleep", "1"], restart=restart)
    assert (await aclient.status())["agents"] == []


async def test_after_an_unknown_id_is_refused_naming_the_argument(aclient: AsyncClient) -> None:
    with pytest.raises(RemoteError, match="launch: after: no agent 'step_000000000000'"):
        await aclient.launch("step", ["sleep", "1"], after=["step_000000000000"])


def test_runs_and_waiting_launches_survive_a_daemon_crash(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        first = client.launch("step", ["sleep", "2"], restart={"restart": "on-failure"})
        sid = first["subprocess_id"]
        client.restart(sid)
        deadline = time.monotonic() + 10
        while sid not in {a["subprocess_id"] for a in client.status()["agents"]}:
            assert time.monotonic() < deadline, "run 2 did not start"
            time.sleep(0.05)
        after = client.launch("step", ["true"], after=[sid])["subprocess_id"]
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    daemon.start()
    with daemon.client() as client:
        stats = client.stats(sid)
        assert (stats["run"], stats["session_uuid"]) == (2, first["session_uuid"])
        assert [w["subprocess_id"] for w in client.queue()["waiting"]] == [after]
        deadline = time.monotonic() + 15
        # Re-adopted, run 2 ends by itself with a status only init could reap: no evidence
        # of a failure, so what waited for it starts.
        while not any(r["subprocess_id"] == after for r in read_jsonl(daemon.home.stats_log)):
            assert time.monotonic() < deadline, client.queue()
            time.sleep(0.05)
    runs = [(r["run"], r["reason"]) for r in records_of(daemon, sid)]
    assert runs == [(1, "restart"), (2, "exited")]


async def test_reload_gives_a_running_agent_its_types_new_policy(daemon: DaemonProcess) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        started = await client.launch("flaky", ["sh", "-c", "sleep 1; exit 1"])
        sid = started["subprocess_id"]
        assert (await client.stats(sid))["restart"] == "no"
        write_config(
            daemon.home, agents={"flaky": {"restart": "on-failure", "restart_delay_s": 0.1}}
        )
        await client.reload({})
        assert (await client.stats(sid))["restart"] == "on-failure"
        due = await events.next_matching(10, type="restarting", subprocess_id=sid)
        await client.stop(sid)
    assert (due["run"], due["exit_code"]) == (1, 1)


async def test_restart_brings_a_failed_agent_back_with_a_fresh_window(
    daemon: DaemonProcess,
) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        started = await client.launch(
            "flaky",
            simagent("--duration", "0", "--exit-code", "1"),
            restart={**FAST, "restart": "on-failure", "restart_limit": 1},
        )
        sid = started["subprocess_id"]
        await events.next_matching(10, type="restart_limit", subprocess_id=sid, run=1)
        assert [f["subprocess_id"] for f in (await client.status())["failed"]] == [sid]
        again = await client.restart(sid)
        restarted = await events.next_matching(10, type="restarted", subprocess_id=sid)
        await events.next_matching(10, type="restart_limit", subprocess_id=sid, run=2)
        status = await client.status()
    assert again["run"] == 2
    assert (restarted["run"], restarted["reason"]) == (2, "restart")
    assert [f["subprocess_id"] for f in status["failed"]] == [sid]
    assert [(r["run"], r["next_restart_s"]) for r in records_of(daemon, sid)] == [
        (1, None),
        (2, None),
    ]


def test_how_agents_ended_outlives_the_daemon(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        ok = client.launch("step", ["true"])["subprocess_id"]
        failed = client.launch(
            "flaky",
            ["false"],
            restart={"restart": "on-failure", "restart_limit": 1, "restart_jitter": 0},
        )["subprocess_id"]
        deadline = time.monotonic() + 10
        while [f["subprocess_id"] for f in client.status()["failed"]] != [failed]:
            assert time.monotonic() < deadline, "the agent did not fail"
            time.sleep(0.05)
        while {ok, failed} - _ended_in_state(daemon):
            assert time.monotonic() < deadline, "state.json never said how they ended"
            time.sleep(0.05)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    daemon.start()
    with daemon.client() as client:
        assert [f["subprocess_id"] for f in client.status()["failed"]] == [failed]
        after = client.launch("step", ["true"], after=[ok])
        assert after["queued"] is False  # what it waited for had already ended with 0
        assert client.restart(failed)["run"] == 2


def _ended_in_state(daemon: DaemonProcess) -> set[str]:
    try:
        state = json.loads(daemon.home.state_file.read_text())
    except (OSError, ValueError):
        return set()
    return {entry["subprocess_id"] for entry in state.get("ended", [])}
