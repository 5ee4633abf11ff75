"""The kill path, end to end: a real daemon, real agents, real signals, real log files.

Every test but the kernel-ceiling ones runs twice: with the cgroup backstop where the machine
has one (``[cgroup] mode = "auto"``) and without it (``mode = "off"``), so the /proc-only path
(tree scans, escaped grandchildren, SIGKILL after the grace) is tested on machines with
cgroups too.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.control.client import AsyncClient
from supervisord.core.errors import RemoteError
from supervisord.host import procfs
from tests.conftest import (
    TEST_MEMORY,
    DaemonProcess,
    Events,
    agent_script,
    alive,
    read_jsonl,
    simagent,
    skip_or_fail,
    wait_output,
    write_config,
)

pytestmark = pytest.mark.anyio
GRACE_S = TEST_MEMORY["term_grace_s"]
INTERVAL_S = TEST_MEMORY["check_interval_s"]
# The default margin of the tests (conftest.write_config): 50%, so graceful escalation never
# races the kernel's ceiling.
CGROUP_MODES: dict[str, dict[str, Any]] = {
    "cgroup-auto": {"mode": "auto", "hard_margin_pct": 50},
    "cgroup-off": {"mode": "off"},
}


@pytest.fixture(params=list(CGROUP_MODES), ids=list(CGROUP_MODES))
def cgroup(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The [cgroup] table of this run: the backstop on (where the machine has one), or off."""
    return CGROUP_MODES[request.param]


@pytest.fixture
def home(short_tmp: Path, cgroup: dict[str, Any]) -> Home:
    home = Home(short_tmp / ".claude-pm")
    write_config(home, cgroup=cgroup)
    return home


@pytest.fixture
def daemon(home: Home, cgroup: dict[str, Any]) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(home).start()
    try:
        with proc.client() as client:
            cgroups = client.status()["cgroups"]
        if cgroup["mode"] == "off":
            assert cgroups["in_force"] == "off", cgroups
        elif cgroups["in_force"] == "off":  # the same run as cgroup-off: not worth repeating
            skip_or_fail(f"no cgroup backstop on this machine: {cgroups['reason']}")
        yield proc
    finally:
        proc.close()


@pytest.fixture
def ceiling_home(short_tmp: Path) -> Home:
    """A home for the kernel-ceiling tests, which need the cgroup and write their own config."""
    return Home(short_tmp / ".claude-pm")


async def launch(client: AsyncClient, agent_type: str, command: list[str], **kw: object) -> str:
    result = await client.launch(agent_type, command, **kw)
    return str(result["subprocess_id"])


async def test_hog_crosses_every_level_and_is_terminated(daemon: DaemonProcess) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        sid = await launch(client, "hog", simagent("--hold-mb", "10", "--rate", "150"))
        record = await events.exit_of(sid)
    assert record["reason"] == "memory_limit"
    assert record["signal"] == "SIGTERM"
    assert record["exit_code"] is None
    stats = record["memory_stats"]
    assert stats["aborted"] is True
    assert stats["peak_mb"] >= TEST_MEMORY["max_mb"]
    assert [w.split(":")[0] for w in stats["warnings"]] == ["WARNING", "CRITICAL"]

    alerts = [a for a in read_jsonl(daemon.home.alerts_log) if a["subprocess_id"] == sid]
    assert [a["event"] for a in alerts] == ["memory_warning", "memory_critical", "sigterm_sent"]
    assert [a["level"] for a in alerts] == ["WARNING", "CRITICAL", "CRITICAL"]
    assert [a["threshold_mb"] for a in alerts] == [100, 150, 200]
    for alert in alerts:
        assert alert["agent_type"] == "hog"
        assert alert["current_mb"] >= alert["threshold_mb"]
        assert set(alert["system_memory"]) == {
            "total_mb",
            "available_mb",
            "used_mb",
            "percent",
            "free_mb",
        }
        assert alert["ts"].endswith("Z")
        assert "+" not in alert["timestamp"]
    (stats_line,) = [r for r in read_jsonl(daemon.home.stats_log) if r["subprocess_id"] == sid]
    assert stats_line == {k: v for k, v in record.items() if k not in ("type", "term_to_gone_s")}


async def test_whole_tree_is_gone_within_grace_plus_two_intervals(daemon: DaemonProcess) -> None:
    command = agent_script("forker", "--children", "2", "--hold-mb", "5", "--leak-rate", "150")
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        sid = await launch(client, "tree", command)
        # Root, two children and two grandchildren: wait until the daemon counts all five.
        with anyio.fail_after(10):
            while len((await client.stats(sid))["tree_pids"]) < 5:
                await anyio.sleep(0.05)
        pids = (await client.stats(sid))["tree_pids"]
        term = await events.next_matching(20, type="alert", subprocess_id=sid, event="sigterm_sent")
        record = await events.exit_of(sid, timeout_s=GRACE_S + 2 * INTERVAL_S + 1.0)
    assert record["reason"] == "memory_limit"
    assert term["current_mb"] >= TEST_MEMORY["max_mb"]
    assert [pid for pid in pids if alive(pid)] == []


async def test_sigterm_ignoring_tree_is_sigkilled(daemon: DaemonProcess) -> None:
    # Capped between max_mb (200) and the kernel ceiling (300 with the tests' 50% margin),
    # so it is the grace period that ends, not the cgroup's OOM.
    command = simagent(
        "--hold-mb", "10", "--rate", "150", "--cap", "220", "--in-child", "--ignore-term"
    )
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        sid = await launch(client, "stubborn", command)
        record = await events.exit_of(sid, timeout_s=20)
    assert record["reason"] == "memory_limit"
    assert record["signal"] == "SIGKILL"
    assert events.alerts_of(sid)[-2:] == ["sigterm_sent", "sigkill_sent"]


async def test_normal_exit_reports_exit_code(aclient: AsyncClient, daemon: DaemonProcess) -> None:
    async with daemon.async_client() as sub:
        events = await Events(sub).start()
        sid = await launch(
            aclient, "quick", simagent("--hold-mb", "1", "--duration", "0.2", "--exit-code", "3")
        )
        record = await events.exit_of(sid)
    assert (record["reason"], record["exit_code"], record["signal"]) == ("exited", 3, None)
    assert record["memory_stats"]["aborted"] is False
    assert record["memory_stats"]["warnings"] == []
    log = daemon.home.agent_log(sid).read_text()
    assert "simagent pid" in log


async def test_stop_through_socket(aclient: AsyncClient) -> None:
    sid = await launch(aclient, "idle", simagent("--hold-mb", "5"))
    with anyio.fail_after(10):
        record = await aclient.stop(sid, grace_s=2)
    assert record["reason"] == "stopped"
    assert record["signal"] == "SIGTERM"
    assert record["memory_stats"]["aborted"] is False
    with pytest.raises(Exception, match="no agent"):
        await aclient.stats(sid)


async def test_kill_through_socket(aclient: AsyncClient, daemon: DaemonProcess) -> None:
    sid = await launch(aclient, "idle", simagent("--hold-mb", "5", "--ignore-term"))
    await wait_output(daemon.home, sid, "simagent pid")
    with anyio.fail_after(10):
        record = await aclient.kill(sid)
    assert (record["reason"], record["signal"]) == ("stopped", "SIGKILL")


async def test_timeout(aclient: AsyncClient, daemon: DaemonProcess) -> None:
    async with daemon.async_client() as sub:
        events = await Events(sub).start()
        sid = await launch(aclient, "slow", simagent("--hold-mb", "5"), timeout_s=0.5)
        record = await events.exit_of(sid, timeout_s=10)
    assert record["reason"] == "timeout"
    assert record["memory_stats"]["aborted"] is True
    assert record["memory_stats"]["duration_seconds"] >= 0.5
    assert "timeout" in events.alerts_of(sid)


async def test_escaped_setsid_grandchild_is_counted_and_killed(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    pidfile = short_tmp / "escaped.pid"
    command = agent_script("escaper", "--leak-rate", "150", "--pidfile", str(pidfile))
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        sid = await launch(client, "escaper", command)
        record = await events.exit_of(sid, timeout_s=20)
    escaped = int(pidfile.read_text())
    assert record["reason"] == "memory_limit"
    assert record["memory_stats"]["peak_mb"] >= TEST_MEMORY["max_mb"]
    assert not alive(escaped)
    # The escaped grandchild was reparented to the daemon (a subreaper), so the daemon must
    # reap it: no zombie of it is left behind.
    assert daemon.proc is not None
    with anyio.fail_after(5):
        while zombies_of(daemon.proc.pid):
            await anyio.sleep(0.05)


def zombies_of(parent: int) -> list[int]:
    found = []
    for entry in procfs.scan().values():
        if entry.zombie and entry.ppid == parent:
            found.append(entry.pid)
    return found


async def test_launch_that_could_never_fit_the_budget_is_refused_unless_forced(
    aclient: AsyncClient, daemon: DaemonProcess
) -> None:
    huge = {"warning_mb": 10**8, "critical_mb": 2 * 10**8, "max_mb": 3 * 10**8}
    with pytest.raises(RemoteError) as refused:
        await aclient.launch("big", simagent(), limits=huge)
    assert refused.value.code == "launch_refused"
    assert "over the host's budget" in str(refused.value)
    (alert,) = [a for a in read_jsonl(daemon.home.alerts_log) if a["event"] == "launch_refused"]
    assert alert["agent_type"] == "big"
    forced = await aclient.launch("big", simagent("--duration", "0.1"), limits=huge, force=True)
    assert forced["pid"] > 0


async def test_daemon_sigterm_stops_agents_and_cleans_up(daemon: DaemonProcess) -> None:
    async with daemon.async_client() as client:
        sids = [await launch(client, "worker", simagent("--hold-mb", "5")) for _ in range(2)]
        stubborn = await launch(client, "worker", simagent("--hold-mb", "5", "--ignore-term"))
        await wait_output(daemon.home, stubborn, "simagent pid")
        pids = [(await client.stats(s))["pid"] for s in [*sids, stubborn]]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout_s=GRACE_S + 10) == 0
    records = {r["subprocess_id"]: r for r in read_jsonl(daemon.home.stats_log)}
    assert {records[s]["reason"] for s in [*sids, stubborn]} == {"daemon_shutdown"}
    assert records[stubborn]["signal"] == "SIGKILL"
    assert not any(alive(pid) for pid in pids)
    assert not daemon.home.default_socket.exists()
    assert not daemon.home.pid_file.exists()


async def test_agent_runs_in_own_session_with_raised_oom_score(aclient: AsyncClient) -> None:
    result = await aclient.launch("idle", simagent("--hold-mb", "1"))
    pid = result["pid"]
    assert os.getsid(pid) == pid
    assert os.getpgid(pid) == pid
    assert int(Path(f"/proc/{pid}/oom_score_adj").read_text()) == 500
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"CLAUDE_PM_SUBPROCESS_ID={result['subprocess_id']}".encode() in environ
    await aclient.kill(result["subprocess_id"])


async def test_fast_leak_is_sampled_sooner_than_the_interval(
    home: Home, cgroup: dict[str, Any]
) -> None:
    """At a 2 s idle interval a 500 MB/s tree would pass max_mb by ~1 GB between scans;
    adaptive sampling stops it close to the limit, and the alerts carry the projection."""
    write_config(home, {"check_interval_s": 2.0, "predict_s": 5.0}, cgroup=cgroup)
    proc = DaemonProcess(home).start()
    try:
        async with proc.async_client() as client, proc.async_client() as sub:
            events = await Events(sub).start()
            await anyio.sleep(2.5)  # launch mid-interval, well away from the launch-time scan
            sid = await launch(client, "hog", simagent("--hold-mb", "10", "--rate", "500"))
            record = await events.exit_of(sid)
    finally:
        proc.close()
    assert record["reason"] == "memory_limit"
    assert record["memory_stats"]["peak_mb"] < 2 * TEST_MEMORY["max_mb"]
    alerts = [a for a in read_jsonl(home.alerts_log) if a["subprocess_id"] == sid]
    by_event = {a["event"]: a for a in alerts}
    assert by_event["memory_critical"]["growth_mb_s"] > 0
    assert "crossed_to_term_s" in by_event["sigterm_sent"]
    assert "limit_predicted" in by_event
    assert "hard limit 200 MB is reached in" in by_event["limit_predicted"]["message"]
    assert record["term_to_gone_s"] >= 0


async def test_kernel_ceiling_holds_a_1gb_per_s_hog(ceiling_home: Home) -> None:
    """With a 10% margin the cgroup never lets the tree's charge past 330 MB for max 300,
    however fast it grows; the daemon's SIGTERM (or the OOM event) ends it."""
    home = ceiling_home
    write_config(home, {"max_mb": 300}, cgroup={"mode": "required", "hard_margin_pct": 10})
    proc = DaemonProcess(home).start()
    try:
        async with proc.async_client() as client, proc.async_client() as sub:
            assert (await client.status())["cgroups"]["in_force"] in ("v1", "v2")
            events = await Events(sub).start()
            sid = await launch(client, "hog", simagent("--hold-mb", "10", "--rate", "1000"))
            record = await events.exit_of(sid, timeout_s=30)
    finally:
        proc.close()
    assert record["reason"] in ("memory_limit", "oom_killed")
    assert record["memory_stats"]["aborted"] is True
    assert record["memory_stats"]["cgroup_peak_mb"] <= 330.0


async def test_ceiling_reached_during_the_grace_kills_at_once(ceiling_home: Home) -> None:
    """A tree that ignores SIGTERM and keeps growing reaches the kernel ceiling long before
    its grace period ends: the OOM event makes the daemon SIGKILL it there and then."""
    home = ceiling_home
    write_config(home, {"term_grace_s": 20}, cgroup={"mode": "required", "hard_margin_pct": 10})
    proc = DaemonProcess(home).start()
    try:
        async with proc.async_client() as client, proc.async_client() as sub:
            events = await Events(sub).start()
            command = simagent("--hold-mb", "10", "--rate", "300", "--ignore-term")
            sid = await launch(client, "stubborn", command)
            record = await events.exit_of(sid, timeout_s=15)  # well inside the 20 s grace
    finally:
        proc.close()
    assert record["signal"] == "SIGKILL"
    assert record["reason"] == "memory_limit"
    assert events.alerts_of(sid)[-2:] == ["sigterm_sent", "oom_kill"]
    assert record["memory_stats"]["cgroup_peak_mb"] <= 220.0


@pytest.mark.parametrize("cgroup", [CGROUP_MODES["cgroup-auto"]], ids=["cgroup-auto"])
async def test_agents_that_end_at_once_never_take_the_daemon_down(daemon: DaemonProcess) -> None:
    """An agent gone before its cgroup watchers are armed (its group may be removed first)
    costs at most that agent's watcher: every record is written and the daemon answers."""
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        sids = [await launch(client, "instant", ["/bin/true"]) for _ in range(20)]
        for sid in sids:
            record = await events.exit_of(sid, timeout_s=20)
            assert (record["reason"], record["exit_code"]) == ("exited", 0)
        assert await client.ping()
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
