"""An escalation a crashed daemon began is finished by the next one, on the first's clock."""

from __future__ import annotations

import json
import signal
import time

import anyio
import pytest

from supervisord.config.home import Home
from tests.conftest import (
    DaemonProcess,
    Events,
    alive,
    read_jsonl,
    simagent,
    wait_output,
    write_config,
)

pytestmark = pytest.mark.anyio
GRACE_S = 4.0


def saved_entry(home: Home, subprocess_id: str) -> dict[str, object]:
    document = json.loads(home.state_file.read_text())
    return next(a for a in document["agents"] if a["subprocess_id"] == subprocess_id)


async def test_an_agent_adopted_during_its_grace_is_sigkilled_when_the_grace_runs_out(
    home: Home,
) -> None:
    write_config(home, {"term_grace_s": GRACE_S})
    first = DaemonProcess(home).start()
    try:
        async with first.async_client() as client, first.async_client() as sub:
            events = await Events(sub).start()
            command = simagent("--hold-mb", "10", "--rate", "400", "--cap", "260", "--ignore-term")
            sid = (await client.launch("stubborn", command))["subprocess_id"]
            pid = (await client.stats(sid))["pid"]
            await events.next_matching(10, type="alert", event="sigterm_sent", subprocess_id=sid)
            sigterm_at = time.monotonic()
            # state.json holds the escalation within its write interval: then the crash.
            with anyio.fail_after(5):
                while saved_entry(home, sid).get("term_sent_wall") is None:
                    await anyio.sleep(0.05)
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.close()
    entry = saved_entry(home, sid)
    assert (entry["ending"], entry["grace_s"], entry["kill_sent"]) == (
        "memory_limit",
        GRACE_S,
        False,
    )
    assert alive(pid)  # it ignores SIGTERM, and nobody watches it now
    second = DaemonProcess(home).start()
    try:
        with anyio.fail_after(GRACE_S + 10):
            while alive(pid):
                await anyio.sleep(0.05)
        gone_after_s = time.monotonic() - sigterm_at
        with anyio.fail_after(10):
            while not (
                records := [r for r in read_jsonl(home.stats_log) if r["subprocess_id"] == sid]
            ):
                await anyio.sleep(0.05)
    finally:
        second.close()
    # Killed when the grace that began before the crash ran out, not a whole grace later.
    assert GRACE_S - 0.5 <= gone_after_s < GRACE_S + 3
    (record,) = records
    assert record["reason"] == "memory_limit"
    assert record["memory_stats"]["aborted"] is True


async def test_an_agent_whose_grace_ran_out_while_no_daemon_ran_is_sigkilled_at_adoption(
    home: Home,
) -> None:
    write_config(home, {"term_grace_s": 1.0})
    first = DaemonProcess(home).start()
    try:
        async with first.async_client() as client:
            sid = (await client.launch("steady", simagent("--hold-mb", "5", "--ignore-term")))[
                "subprocess_id"
            ]
            await wait_output(home, sid, "simagent pid")
            pid = (await client.stats(sid))["pid"]
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.stop, sid, 30.0)  # a long grace, begun just now
                with anyio.fail_after(5):
                    while saved_entry(home, sid).get("term_sent_wall") is None:
                        await anyio.sleep(0.05)
                first.signal(signal.SIGKILL)
                first.wait(10)
                tg.cancel_scope.cancel()
    finally:
        first.close()
    # Pretend the outage outlasted the grace: the SIGTERM went out a minute ago.
    document = json.loads(home.state_file.read_text())
    for agent in document["agents"]:
        agent["term_sent_wall"] = "2000-01-01T00:00:00+00:00"
    home.state_file.write_text(json.dumps(document))
    second = DaemonProcess(home).start()
    try:
        with anyio.fail_after(5):  # at adoption, not after another 30 s
            while alive(pid):
                await anyio.sleep(0.05)
    finally:
        second.close()
    assert [r["reason"] for r in read_jsonl(home.stats_log) if r["subprocess_id"] == sid] == [
        "stopped"
    ]


async def test_a_populated_agent_cgroup_missing_from_state_json_is_ended_and_recorded_lost(
    home: Home,
) -> None:
    write_config(home, {"term_grace_s": 1.0}, cgroup={"mode": "required", "hard_margin_pct": 50})
    first = DaemonProcess(home).start()
    try:
        async with first.async_client() as client:
            sid = (await client.launch("steady", simagent("--hold-mb", "5")))["subprocess_id"]
            await wait_output(home, sid, "simagent pid")
            pid = (await client.stats(sid))["pid"]
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.close()
    home.state_file.unlink()  # the daemon's memory of the agent is gone; its cgroup is not
    assert alive(pid)
    second = DaemonProcess(home).start()
    try:
        with anyio.fail_after(10):
            while not (
                records := [r for r in read_jsonl(home.stats_log) if r["subprocess_id"] == sid]
            ):
                await anyio.sleep(0.05)
        assert not alive(pid)
    finally:
        second.close()
    (record,) = records
    assert (record["reason"], record["agent_type"], record["pid"]) == ("lost", "steady", pid)
    assert record["memory_stats"]["aborted"] is False
