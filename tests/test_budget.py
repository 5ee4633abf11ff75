"""The host's memory budget: admission, the queue, shedding, with real agents and cgroups.

The pure decisions (``core.budget``) are checked with explicit figures; the daemon's with
real processes that really take their memory, watched by the kernel's own count of the
daemon's cgroup (every agent group is inside it), not by the daemon's figures.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.config.settings import parse_config
from supervisord.control.client import AsyncClient, Client
from supervisord.core import budget as budgeting
from supervisord.core.budget import Budget, Claim, Trigger
from supervisord.core.errors import ConfigError, NotFoundError, RemoteError
from supervisord.core.history import PeakHistory
from supervisord.core.units import MIB
from supervisord.host.cgroup.base import CgroupManager
from supervisord.host.cgroup.detect import enclosing_limit_bytes
from supervisord.supervise.pressure import HostGuard
from tests.cgroup_helpers import kill_group, shim_command
from tests.conftest import DaemonProcess, Events, read_jsonl, simagent, write_config
from tests.test_cgroup import Processes, procs, v1  # noqa: F401 (fixtures)
from tests.test_cli import CLI, clean_environ
from tests.test_security import NOBODY, as_nobody, attempt

pytestmark = pytest.mark.anyio
GROWN = {"warning_mb": 500, "critical_mb": 600, "max_mb": 700}

# -- the pure model ----------------------------------------------------------------------


def test_the_budget_follows_the_host_when_not_set() -> None:
    assert budgeting.resolve(24_000) == Budget(budget_mb=21_600, reserve_mb=2_400)
    # A small host keeps at least 512 MB for everything else.
    assert budgeting.resolve(2_000) == Budget(budget_mb=1_488, reserve_mb=512)
    assert budgeting.resolve(8_000, budget_mb=3_072).budget_mb == 3_072


def test_a_launch_fits_beside_what_running_agents_hold() -> None:
    budget = Budget(budget_mb=1_200, reserve_mb=500)
    # One agent used 100 MB of a 400 MB request: it holds 400 (it may still grow into it).
    running = [Claim("a", used_mb=100, request_mb=400), Claim("b", used_mb=450, request_mb=400)]
    assert budgeting.admit(budget, running, 350, available_mb=10_000).fits
    late = budgeting.admit(budget, running, 351, available_mb=10_000)
    assert not late.fits
    assert "needs 351 MB; 350 MB of the 1200 MB budget is free" in late.reason
    # Available memory after the unused requests (300) and this one stays above the reserve.
    assert budgeting.admit(budget, running, 200, available_mb=1_000).fits
    short = budgeting.admit(budget, running, 201, available_mb=1_000)
    assert "would leave 499 MB available, below the reserve of 500 MB" in short.reason


def test_pressure_names_what_triggered_it() -> None:
    budget = Budget(budget_mb=1_000, reserve_mb=500, psi_some_avg10=20)
    assert budgeting.pressure(budget, 1_000, 5_000, 19.9) is None
    over = budgeting.pressure(budget, 1_000.1, 5_000)
    assert over is not None
    assert over.trigger is Trigger.BUDGET
    low = budgeting.pressure(budget, 10, 499)
    assert low is not None
    assert low.trigger is Trigger.RESERVE
    stalled = budgeting.pressure(budget, 10, 5_000, 20.5)
    assert stalled is not None
    assert stalled.trigger is Trigger.PSI
    assert "20.5% is over 20%" in stalled.message


def test_shedding_order_is_priority_then_growth_then_youngest() -> None:
    claims = [
        Claim("important", 900, 100, priority=10, growth_mb_s=500, age_s=1),
        Claim("old", 300, 100, priority=0, growth_mb_s=1, age_s=100),
        Claim("young", 300, 100, priority=0, growth_mb_s=1, age_s=5),
        Claim("grower", 300, 100, priority=0, growth_mb_s=50, age_s=500),
        Claim("ending", 300, 100, priority=-5, ending=True),
    ]
    order = [c.subprocess_id for c in budgeting.shed_order(claims)]
    assert order == ["grower", "young", "old", "important"]


def test_requests_come_from_the_p90_of_finished_runs() -> None:
    history = PeakHistory()
    for peak in range(100, 1100, 100):  # 100 .. 1000
        history.add("eng", peak, aborted=False)
    history.add("eng", 50_000, aborted=True)  # a run killed at its limit says nothing
    assert history.request_mb("eng") == 910  # numpy.percentile(range(100, 1100, 100), 90)
    assert history.request_mb("qa") is None


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"budget_mb": -5}, "host.budget_mb"),
        ({"budget_mb": "lots"}, "host.budget_mb"),
        ({"reserve_mb": -1}, "host.reserve_mb"),
        ({"pressure_psi_some_avg10": 150}, "host.pressure_psi_some_avg10"),
        ({"max_queued": 0}, "host.max_queued"),
        ({"budget": 5}, "unknown key 'budget'"),
    ],
)
def test_bad_host_settings_name_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"host": section})


def test_bad_scheduling_of_a_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"agents\.eng\.priority = 1.5 is not allowed"):
        parse_config({"agents": {"eng": {"priority": 1.5}}})
    with pytest.raises(ConfigError, match="use 'stop' or 'requeue'"):
        parse_config({"agents": {"eng": {"on_pressure": "pause"}}})


# -- the daemon ----------------------------------------------------------------------------


@contextmanager
def observed_total(group: Path) -> Iterator[list[float]]:
    """The kernel's working set of every agent together, sampled every 10 ms: the daemon's
    group holds each agent's group, so its counters cover the whole fleet."""
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            usage = int((group / "memory.usage_in_bytes").read_text())
            stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
            peak[0] = max(peak[0], (usage - int(stat["total_inactive_file"])) / 2**20)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def budget_daemon(home: Home, budget_mb: float, **host: Any) -> DaemonProcess:
    write_config(home, GROWN, host={"budget_mb": budget_mb, **host})
    return DaemonProcess(home).start()


async def test_six_agents_run_as_the_budget_allows(home: Home) -> None:
    daemon = budget_daemon(home, 1_200)
    grower = simagent("--hold-mb", "20", "--rate", "800", "--cap", "380", "--duration", "1.5")
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            group = Path((await client.status())["cgroups"]["path"])
            with observed_total(group) as peak:
                launched = [await client.launch("grower", grower, request_mb=400) for _ in range(6)]
                ids = [r["subprocess_id"] for r in launched]
                exits = [await events.exit_of(sid, timeout_s=30) for sid in ids]
            host = (await client.status())["host"]
    finally:
        daemon.close()
    assert [r["queued"] for r in launched] == [False] * 3 + [True] * 3
    assert [r["position"] for r in launched[3:]] == [1, 2, 3]
    assert all(e["reason"] == "exited" and e["exit_code"] == 0 for e in exits)
    running = most = 0
    for event in events.seen:  # the stream is in the daemon's own order
        if event["type"] == "launch":
            running += 1
        elif event["type"] == "exit":
            running -= 1
        most = max(most, running)
    assert most == 3, "never more running at once than fit"
    sys.stderr.write(f"\n[budget] 6 x 400 MB under 1,200 MB: observed peak {peak[0]:.1f} MB\n")
    assert sum(e["type"] == "admitted" for e in events.seen) == 3
    assert 1_000 < peak[0] <= 1_200 * 1.05, f"observed total peak {peak[0]:.1f} MB"
    alerts = [a["event"] for a in read_jsonl(home.alerts_log)]
    assert "oom_kill" not in alerts
    assert "host_pressure" not in alerts
    assert host["queue_length"] == 0
    assert host["budget_mb"] == 1_200


@pytest.mark.parametrize("on_pressure", ["stop", "requeue"])
async def test_a_low_priority_agent_is_shed_for_a_high_priority_one(
    home: Home, on_pressure: str
) -> None:
    daemon = budget_daemon(home, 900)
    holder = simagent("--hold-mb", "300", "--duration", "5")
    grower = simagent("--hold-mb", "20", "--rate", "250", "--cap", "500", "--duration", "4")
    low = {"request_mb": 300, "priority": 0, "on_pressure": on_pressure}
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            holders = [(await client.launch("low", holder, **low))["subprocess_id"] for _ in "ab"]
            for sid in holders:
                await wait_mb(client, sid, 290)
            high = await client.launch("high", grower, request_mb=100, priority=10)
            assert not high["queued"]
            shed = await events.next_matching(20, type="exit", reason="host_pressure")
            assert shed["subprocess_id"] in holders
            assert (await events.exit_of(high["subprocess_id"]))["exit_code"] == 0
            kept = next(sid for sid in holders if sid != shed["subprocess_id"])
            assert (await events.exit_of(kept))["reason"] == "exited"
            if on_pressure == "requeue":
                assert shed.get("requeued") is True
                again = await events.next_matching(
                    20, type="admitted", subprocess_id=shed["subprocess_id"]
                )
                final = await events.next_matching(
                    20, type="exit", subprocess_id=shed["subprocess_id"], reason="exited"
                )
                assert final["exit_code"] == 0
                assert again["pid"] != shed["pid"]
            else:
                assert "requeued" not in shed
    finally:
        daemon.close()
    # One shed only: a requeued agent let in again at once, on the figures read as it went
    # while the grower pressed on, would be shed a second time (the hold after a shed).
    (alert,) = [a for a in read_jsonl(home.alerts_log) if a["event"] == "host_pressure"]
    assert alert["subprocess_id"] == shed["subprocess_id"]
    assert alert["host"]["trigger"] == "budget"
    assert alert["host"]["budget_mb"] == 900
    assert alert["host"]["agents_mb"] > 900
    records = read_jsonl(home.stats_log)
    assert [r["reason"] for r in records if r["subprocess_id"] == high["subprocess_id"]] == [
        "exited"
    ]


async def wait_mb(client: AsyncClient, subprocess_id: str, mb: float) -> None:
    with anyio.fail_after(10):
        while (await client.stats(subprocess_id))["current_mb"] < mb:
            await anyio.sleep(0.05)


async def test_queue_listing_cancel_and_refusals(home: Home) -> None:
    daemon = budget_daemon(home, 600, max_queued=2)
    sleeper = ["/bin/sh", "-c", "exec sleep 30"]
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            first = await client.launch("big", sleeper, request_mb=500)
            waiting = [await client.launch("big", sleeper, request_mb=500) for _ in "ab"]
            listing = await client.queue()
            assert [r["subprocess_id"] for r in listing["queue"]] == [
                w["subprocess_id"] for w in waiting
            ]
            head, behind = listing["queue"]
            assert "needs 500 MB; 100 MB of the 600 MB budget is free" in head["reason"]
            assert behind["reason"].startswith(f"behind {head['subprocess_id']}")
            with pytest.raises(RemoteError) as full:
                await client.launch("big", sleeper, request_mb=100)
            assert full.value.code == "queue_full"
            assert "[host] max_queued" in str(full.value)
            with pytest.raises(RemoteError) as never:
                await client.launch("big", sleeper, request_mb=601)
            assert never.value.code == "launch_refused"
            assert "could never be" in str(never.value)
            with pytest.raises(RemoteError) as no_queue:
                await client.launch("big", sleeper, request_mb=200, no_queue=True)
            assert "(no queueing)" in str(no_queue.value)
            with pytest.raises(NotFoundError, match="no queued launch big_0000"):
                await client.cancel("big_000000000000")
            await client.cancel(waiting[0]["subprocess_id"])
            cancelled = await events.next_matching(5, type="cancelled")
            assert cancelled["subprocess_id"] == waiting[0]["subprocess_id"]
            assert [r["position"] for r in (await client.queue())["queue"]] == [1]
            # The daemon restarts; the launch still waiting survives it, and runs once it fits.
            await client.shutdown(leave_agents=True)
        daemon.wait()
        daemon.close()
        daemon = DaemonProcess(home).start()
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            assert [r["subprocess_id"] for r in (await client.queue())["queue"]] == [
                waiting[1]["subprocess_id"]
            ]
            await client.kill(first["subprocess_id"])
            admitted = await events.next_matching(10, type="admitted")
            assert admitted["subprocess_id"] == waiting[1]["subprocess_id"]
            await client.kill(admitted["subprocess_id"])
    finally:
        daemon.close()


def test_another_user_sees_and_cancels_only_their_own_queued_launches(home: Home) -> None:
    write_config(home, GROWN, daemon={"allowed_groups": ["nogroup"]}, host={"budget_mb": 600})
    os.chmod(home.root.parent, 0o755)  # nobody must reach the socket inside
    daemon = DaemonProcess(home).start()
    sleeper = ["/bin/sh", "-c", "exec sleep 30"]
    try:
        with daemon.client() as client:
            running = client.launch("big", sleeper, request_mb=500)
            roots = client.launch("big", sleeper, request_mb=500)

        def as_user() -> dict[str, Any]:
            with Client(daemon.socket) as client:
                mine = client.launch("mine", sleeper, cwd="/tmp", request_mb=500)
                return {
                    "queue": attempt(client.queue),
                    "cancel_roots": attempt(lambda: client.cancel(roots["subprocess_id"])),
                    "ahead": attempt(lambda: client.launch("mine", sleeper, priority=5)),
                    "smaller": attempt(lambda: client.launch("mine", sleeper, request_mb=1)),
                    "cancel_mine": attempt(lambda: client.cancel(mine["subprocess_id"])),
                    "mine": mine,
                }

        outcome = as_nobody(as_user)["result"]
        rows = outcome["queue"]["result"]["queue"]
        assert [r["subprocess_id"] for r in rows] == [outcome["mine"]["subprocess_id"]]
        assert rows[0]["owner_uid"] == NOBODY.pw_uid
        assert outcome["cancel_roots"]["error"] == "permission_denied"
        assert "may not cancel" in outcome["cancel_roots"]["message"]
        assert "raise priority above 0 in force" in outcome["ahead"]["message"]
        assert "lower request_mb below 500 MB in force" in outcome["smaller"]["message"]
        assert "result" in outcome["cancel_mine"]
        with daemon.client() as client:
            assert [r["subprocess_id"] for r in client.queue()["queue"]] == [roots["subprocess_id"]]
            client.kill(running["subprocess_id"])
    finally:
        daemon.close()


def test_the_cli_queues_waits_lists_and_cancels(home: Home) -> None:
    write_config(home, GROWN, host={"budget_mb": 600})
    cli = CLI(home)
    try:
        cli.ok("init")
        holder = cli.ok("launch", "big", "--request-mb", "500", "--", "sleep", "30").strip()
        queued = cli.ok("launch", "big", "--request-mb", "500", "--", "sleep", "30")
        sid, _, rest = queued.strip().partition(" ")
        assert rest.startswith("queued at position 1: needs 500 MB; 100 MB of the 600 MB budget")
        listing = cli.ok("queue")
        assert "budget:     600 MB for all agents" in listing
        assert "1 queued" in listing
        assert sid in listing
        assert "WAITS BECAUSE" in listing
        refused = cli("launch", "big", "--no-queue", "--request-mb", "200", "--", "sleep", "1")
        assert refused.returncode == 1
        assert "(no queueing)" in refused.stderr
        assert cli.ok("cancel", sid).strip() == f"{sid} cancelled"
        unknown = cli("cancel", sid)
        assert unknown.returncode == 1
        assert f"no queued launch {sid}" in unknown.stderr
        # --wait waits through the queue: admitted once the holder is killed, then its record.
        waiter = subprocess.Popen(
            [sys.executable, "-m", "supervisord", "launch", "small", "--wait", "--request-mb",
             "500", "--", sys.executable, "-c", "exit(0)"],
            env=clean_environ(home), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert waiter.stdout is not None
        assert "queued at position 1" in waiter.stdout.readline()
        cli.ok("kill", holder)
        out, _ = waiter.communicate(timeout=20)
        assert waiter.returncode == 0
        assert "ended: exited (exit code 0)" in out
    finally:
        cli.cleanup()


def test_the_python_api_says_when_it_queued(home: Home) -> None:
    from claude_pm.utils.task_tool_helper import TaskToolHelper

    write_config(home, GROWN, host={"budget_mb": 600}, agents={"eng": {"request_mb": 500}})
    daemon = DaemonProcess(home).start()
    os.environ["CLAUDE_PM_HOME"] = str(home.root)
    try:
        helper = TaskToolHelper()
        sleeper = ["sleep", "30"]
        first = helper.create_agent_subprocess("eng", "first", command=sleeper)
        second = helper.create_agent_subprocess("eng", "second", command=sleeper)
        assert first["success"]
        assert not first["queued"]
        assert first["pid"] > 0
        assert second["success"]
        assert second["queued"]
        assert second["pid"] is None
        assert second["position"] == 1
        assert "needs 500 MB" in second["reason"]
        with daemon.client() as client:
            client.cancel(second["subprocess_id"])
            client.kill(first["subprocess_id"])
    finally:
        del os.environ["CLAUDE_PM_HOME"]
        daemon.close()


async def test_at_the_kernels_ceiling_for_all_agents_the_daemon_picks_the_victim(
    home: Home,
) -> None:
    # Budget 400 MB, ceiling 440 MB for all agents together; the low-priority agent ignores
    # SIGTERM, so only the ceiling's SIGKILL can make room before its 5 s grace ends.
    write_config(
        home,
        {**GROWN, "term_grace_s": 5},
        host={"budget_mb": 400},
        cgroup={"hard_margin_pct": 10},
    )
    daemon = DaemonProcess(home).start()
    stubborn = simagent("--hold-mb", "150", "--duration", "20", "--ignore-term")
    grower = simagent("--hold-mb", "20", "--rate", "1500", "--cap", "380", "--duration", "2")
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            low = await client.launch("low", stubborn, request_mb=150)
            await wait_mb(client, low["subprocess_id"], 140)
            high = await client.launch("high", grower, request_mb=50, priority=10)
            shed = await events.exit_of(low["subprocess_id"], timeout_s=10)
            done = await events.exit_of(high["subprocess_id"], timeout_s=10)
    finally:
        daemon.close()
    assert shed["reason"] == "host_pressure"
    assert shed["signal"] == "SIGKILL"
    assert shed["term_to_gone_s"] < 3, "killed at the ceiling, not at the end of its grace"
    assert done["reason"] == "exited"
    assert done["exit_code"] == 0, "the agent paused with the rest was not killed"
    alerts = read_jsonl(home.alerts_log)
    assert not [a for a in alerts if a["event"] == "oom_kill"]
    pressure = [a for a in alerts if a["event"] == "host_pressure"]
    assert {a["subprocess_id"] for a in pressure} == {low["subprocess_id"]}


def test_an_agent_paused_at_the_common_ceiling_is_not_at_its_own(
    v1: CgroupManager,  # noqa: F811 (the fixture imported above)
    procs: Processes,  # noqa: F811
) -> None:
    total = v1.limit_total(100 * MIB)
    group = v1.create(f"test_{secrets.token_hex(6)}", 1024 * MIB)
    try:
        procs.start(shim_command(group, simagent("--hold-mb", "200", "--duration", "30")))
        deadline = time.monotonic() + 10
        while not total.under_oom():
            assert time.monotonic() < deadline, "the daemon's group never reached its ceiling"
            time.sleep(0.01)
        # The kernel marks the agent's group under OOM too; it is not at its own ceiling.
        assert "under_oom 1" in (group.path / "memory.oom_control").read_text()
        assert not group.under_oom()
        assert not group.oom_killed()
    finally:
        assert kill_group(group)
        group.remove()
        total.close()


def test_the_enclosing_cgroup_limit_is_the_tightest_of_the_daemons_ancestors(
    tmp_path: Path,
) -> None:
    mount = tmp_path / "memory"
    (mount / "slice" / "unit").mkdir(parents=True)
    (mount / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "none"
    (mount / "slice" / "memory.limit_in_bytes").write_text(f"{6 * 2**30}\n")
    (mount / "slice" / "unit" / "memory.limit_in_bytes").write_text(f"{8 * 2**30}\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"40 24 0:35 / {mount} rw - cgroup cgroup rw,memory\n")
    own = tmp_path / "cgroup"
    own.write_text("4:memory:/slice/unit\n0::/\n")
    assert enclosing_limit_bytes(str(mountinfo), str(own)) == 6 * 2**30
    (mount / "slice" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert enclosing_limit_bytes(str(mountinfo), str(own)) == 8 * 2**30
    own.write_text("4:memory:/\n")
    assert enclosing_limit_bytes(str(mountinfo), str(own)) is None


def test_memory_stalls_shed_one_agent_at_a_time(tmp_path: Path) -> None:
    pressure_file = tmp_path / "memory.pressure"
    pressure_file.write_text(
        "some avg10=31.50 avg60=10.00 avg300=2.00 total=123\n"
        "full avg10=5.00 avg60=1.00 avg300=0.10 total=45\n"
    )
    guard = HostGuard(pressure_file)
    budget = Budget(budget_mb=10_000, reserve_mb=100, psi_some_avg10=30)
    claims = [Claim("a", 100, 100, priority=1), Claim("b", 100, 100, priority=0)]
    running = {"a", "b"}
    shed = guard.check(budget, 200, 5_000, lambda: claims, running.__contains__)
    assert shed is not None
    assert shed.victim.subprocess_id == "b"
    assert shed.pressure.trigger is Trigger.PSI
    assert shed.pressure.psi_some_avg10 == 31.5
    # While "b" is still ending nothing else is shed; once it is gone the next check decides.
    assert guard.check(budget, 200, 5_000, lambda: claims, running.__contains__) is None
    running.discard("b")
    again = guard.check(budget, 100, 5_000, lambda: claims[:1], running.__contains__)
    assert again is not None
    assert again.victim.subprocess_id == "a"
    assert guard.sheds == {"psi": 2}
    pressure_file.write_text("some avg10=29.99 avg60=0 avg300=0 total=0\n")
    running.discard("a")
    assert guard.check(budget, 100, 5_000, lambda: claims[:1], running.__contains__) is None


async def test_reload_moves_the_budget_and_admits_what_now_fits(home: Home) -> None:
    daemon = budget_daemon(home, 600)
    sleeper = ["/bin/sh", "-c", "exec sleep 30"]
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            first = await client.launch("big", sleeper, request_mb=500)
            waiting = await client.launch("big", sleeper, request_mb=500)
            assert waiting["queued"]
            write_config(home, GROWN, host={"budget_mb": 1_200})
            await client.reload()
            admitted = await events.next_matching(5, type="admitted")
            assert admitted["subprocess_id"] == waiting["subprocess_id"]
            host = (await client.status())["host"]
            assert host["budget_mb"] == 1_200
            assert host["requested_mb"] == 1_000
            for sid in (first["subprocess_id"], waiting["subprocess_id"]):
                await client.kill(sid)
    finally:
        daemon.close()
