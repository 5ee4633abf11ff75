"""A process that moves itself out of its agent's memory cgroup: noticed, still counted,
moved back, reported, and killed with its tree at the limit."""

from __future__ import annotations

import pytest

from tests.conftest import (
    TEST_MEMORY,
    DaemonProcess,
    Events,
    agent_script,
    read_jsonl,
    skip_or_fail,
)

pytestmark = pytest.mark.anyio


async def test_an_agent_that_leaves_its_cgroup_is_still_killed_at_its_limit(
    daemon: DaemonProcess,
) -> None:
    async with daemon.async_client() as client, daemon.async_client() as sub:
        cgroups = (await client.status())["cgroups"]
        if cgroups["in_force"] != "v1":
            skip_or_fail(f"the escape test writes cgroup v1's cgroup.procs: {cgroups}")
        events = await Events(sub).start()
        started = await client.launch(
            "escaper", agent_script("cgroup_escaper", "--rate", "150", "--cap", "280")
        )
        sid = started["subprocess_id"]
        escape = await events.next_matching(15, type="alert", event="cgroup_escape")
        record = await events.exit_of(sid)
    assert escape["subprocess_id"] == sid
    assert f"pid {started['pid']} of {sid} left its memory cgroup" in escape["message"]
    assert "moved back" in escape["message"]
    assert escape["level"] == "WARNING"
    assert record["reason"] == "memory_limit"
    assert record["memory_stats"]["peak_mb"] >= TEST_MEMORY["max_mb"]
    alerts = [a["event"] for a in read_jsonl(daemon.home.alerts_log) if a["subprocess_id"] == sid]
    assert alerts[0] == "cgroup_escape"
    assert "sigterm_sent" in alerts
    # Counted by RSS once it escaped: what it charged before stayed outside the group.
    log = daemon.home.agent_log(sid).read_text()
    assert "escaped to" in log
