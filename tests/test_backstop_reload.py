"""``reload`` and the kernel backstop: the usage threshold is registered again at the new
``max_mb``, and disabled monitoring lifts the ceiling instead of killing at the old one."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.control.client import AsyncClient
from tests.conftest import DaemonProcess, Events, simagent, write_config

pytestmark = pytest.mark.anyio
MIB = 1024 * 1024


def later(seconds: float, *args: str) -> list[str]:
    """The simulated agent, started only after ``seconds`` (so a reload can come first)."""
    return ["/bin/sh", "-c", f"sleep {seconds}; exec {shlex.join(simagent(*args))}"]


async def agent_limit_bytes(client: AsyncClient, subprocess_id: str) -> int:
    group = Path((await client.status())["cgroups"]["path"]) / f"agent-{subprocess_id}"
    return int((group / "memory.limit_in_bytes").read_text())


async def test_reload_rearms_the_usage_threshold_at_the_new_max_mb(home: Home) -> None:
    # Polling every 20 s at best: only the kernel's threshold can end this agent in time.
    slow = {"check_interval_s": 20, "min_interval_s": 20, "max_mb": 1000, "critical_mb": 500}
    write_config(
        home, {**slow, "warning_mb": 250}, cgroup={"mode": "required", "hard_margin_pct": 200}
    )
    proc = DaemonProcess(home).start()
    try:
        async with proc.async_client() as client, proc.async_client() as sub:
            events = await Events(sub).start()
            launched = await client.launch(
                "hog", later(2, "--hold-mb", "10", "--rate", "200", "--cap", "400")
            )
            sid = launched["subprocess_id"]
            assert await agent_limit_bytes(client, sid) == 3000 * MIB
            started = time.monotonic()
            await client.reload(env={"CLAUDE_PM_MEMORY_MAX_MB": "200"})
            assert await agent_limit_bytes(client, sid) == 600 * MIB  # the ceiling moved
            record = await events.exit_of(sid, timeout_s=15)
            ended_s = time.monotonic() - started
    finally:
        proc.close()
    assert record["reason"] == "memory_limit"
    assert record["memory_stats"]["peak_mb"] < 300  # caught near 200, not at the old 1000
    assert ended_s < 10  # the 20 s polling tick had not come


async def test_disabled_monitoring_lifts_the_ceiling_and_enabling_restores_it(home: Home) -> None:
    write_config(home, {"term_grace_s": 0.5}, cgroup={"mode": "required", "hard_margin_pct": 20})
    proc = DaemonProcess(home).start()
    try:
        async with proc.async_client() as client, proc.async_client() as sub:
            events = await Events(sub).start()
            await client.reload(env={"CLAUDE_PM_DISABLE_MEMORY_MONITOR": "true"})
            # The hog grows well past the old 240 MB ceiling (max_mb 200 + 20%), then holds.
            hog = simagent("--hold-mb", "10", "--rate", "300", "--cap", "300")
            sid = (await client.launch("hog", hog))["subprocess_id"]
            quiet = (await client.launch("quiet", simagent("--hold-mb", "10")))["subprocess_id"]
            for agent in (sid, quiet):
                assert await agent_limit_bytes(client, agent) > 1 << 50  # no ceiling at all
            with anyio.fail_after(15):
                while (await client.stats(sid))["current_mb"] < 290:
                    await anyio.sleep(0.1)
            await anyio.sleep(1.0)  # held there: no OOM kill, no signal, no alert
            assert (await client.stats(sid))["ending"] is None
            assert events.alerts_of(sid) == []
            # Monitoring back on: the ceiling returns, and the hog is over its max_mb.
            await client.reload(env={})
            assert await agent_limit_bytes(client, quiet) == 240 * MIB
            record = await events.exit_of(sid, timeout_s=15)
            await client.stop(quiet)
    finally:
        proc.close()
    assert record["reason"] == "memory_limit"
    assert "oom_kill" not in events.alerts_of(sid)
