"""Logs survive rotation, deletion and moves; reload by SIGHUP; events and logs commands."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.observe.eventlog import JsonLinesLog
from tests.conftest import DaemonProcess, Events, read_jsonl, simagent, wait_output, write_config

pytestmark = pytest.mark.anyio


def test_rotation_keeps_the_configured_number_of_files(tmp_path: Path) -> None:
    log = JsonLinesLog(tmp_path / "x.jsonl", max_bytes=200, backups=2)
    for i in range(40):
        log.write({"i": i, "pad": "x" * 20})
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["x.jsonl", "x.jsonl.1", "x.jsonl.2"]
    kept = [
        json.loads(line)["i"]
        for n in ("x.jsonl.2", "x.jsonl.1", "x.jsonl")
        for line in (tmp_path / n).read_text().splitlines()
    ]
    assert kept == sorted(kept)
    assert kept[-1] == 39
    assert all((tmp_path / n).stat().st_size <= 200 for n in names)


def test_a_deleted_or_moved_file_is_recreated_by_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "memory" / "a.log"
    log = JsonLinesLog(path, max_bytes=0, backups=0)
    log.write({"n": 1})
    path.rename(tmp_path / "moved.log")
    log.write({"n": 2})
    shutil.rmtree(tmp_path / "logs")
    log.write({"n": 3})
    log.close()
    assert read_jsonl(tmp_path / "moved.log") == [{"n": 1}]
    assert read_jsonl(path) == [{"n": 3}]


async def test_daemon_recreates_a_deleted_logs_directory(daemon: DaemonProcess) -> None:
    home = daemon.home
    async with daemon.async_client() as client, daemon.async_client() as sub:
        events = await Events(sub).start()
        first = (await client.launch("quick", simagent("--duration", "0.1")))["subprocess_id"]
        await events.exit_of(first)
        assert read_jsonl(home.stats_log)
        shutil.rmtree(home.logs)
        hog = (await client.launch("hog", simagent("--rate", "150")))["subprocess_id"]
        await events.exit_of(hog)
    assert [r["subprocess_id"] for r in read_jsonl(home.stats_log)] == [hog]
    assert [a["event"] for a in read_jsonl(home.alerts_log)] == [
        "memory_warning",
        "memory_critical",
        "sigterm_sent",
    ]
    assert home.daemon_log.exists()
    assert home.agent_log(hog).exists()


async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(home: Home) -> None:
    proc = DaemonProcess(home).start()
    try:
        async with proc.async_client() as client:
            sid = (await client.launch("idle", simagent("--hold-mb", "1")))["subprocess_id"]
            write_config(home, {"max_mb": 250})
            proc.signal(signal.SIGHUP)
            with anyio.fail_after(10):
                while (await client.stats(sid))["limits"]["max_mb"] != 250:
                    await anyio.sleep(0.05)
            home.config_file.write_text("[memory]\nmax_mb = 'lots'\n")
            proc.signal(signal.SIGHUP)
            with anyio.fail_after(10):
                while "reload_rejected" not in home.daemon_log.read_text():
                    await anyio.sleep(0.05)
            status = await client.status()
            assert status["config"]["memory"]["max_mb"] == 250
            assert (await client.stats(sid))["limits"]["max_mb"] == 250
            rejected = [
                json.loads(line)
                for line in home.daemon_log.read_text().splitlines()
                if "reload_rejected" in line
            ]
            assert "memory.max_mb = 'lots'" in rejected[-1]["error"]
    finally:
        proc.close()


def _cli(home: Home, *args: str, timeout_s: float = 30) -> subprocess.Popen[str]:
    env = {"CLAUDE_PM_HOME": str(home.root), "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-m", "supervisord", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_events_follow_and_level_filter(daemon: DaemonProcess) -> None:
    follow = _cli(daemon.home, "events", "--follow", "--level", "critical", "--json")
    history = None
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            await anyio.sleep(0.5)  # let the CLI subscribe; the check below would catch a miss
            hog = (await client.launch("hog", simagent("--rate", "150")))["subprocess_id"]
            await events.exit_of(hog)
        history = _cli(daemon.home, "events")
        out, _ = history.communicate(timeout=30)
    finally:
        follow.terminate()
        streamed, _ = follow.communicate(timeout=10)
    lines = [json.loads(line) for line in streamed.splitlines()]
    assert [e["event"] for e in lines] == ["memory_critical", "sigterm_sent"]
    assert {e["level"] for e in lines} == {"CRITICAL"}
    assert history is not None
    assert history.returncode == 0
    assert f"WARNING  {hog} memory_warning" in out
    assert f"CRITICAL {hog} sigterm_sent" in out


async def test_logs_follow_ends_when_the_agent_ends(daemon: DaemonProcess) -> None:
    async with daemon.async_client() as client:
        sid = (
            await client.launch(
                "talker",
                [
                    sys.executable,
                    "-c",
                    "import time\nfor i in range(5):\n"
                    " print('line', i, flush=True); time.sleep(0.2)",
                ],
            )
        )["subprocess_id"]
        await wait_output(daemon.home, sid, "line 0")
        follow = _cli(daemon.home, "logs", sid, "--follow")
        out, _ = follow.communicate(timeout=30)
    assert follow.returncode == 0
    assert out.splitlines() == [f"line {i}" for i in range(5)]
    missing = _cli(daemon.home, "logs", "nope_000000000000")
    _, err = missing.communicate(timeout=30)
    assert missing.returncode == 1
    assert "no output log" in err


async def test_logs_follow_carries_on_across_rotations(home: Home) -> None:
    """The daemon rotates an agent's log under a follower: nothing is lost or repeated."""
    write_config(home, daemon={"agent_log_max_bytes": 400, "log_backups": 50})
    daemon = DaemonProcess(home).start()
    try:
        async with daemon.async_client() as client:
            talker = (
                # Line 0, then a pause for the follower to start, then enough to rotate often.
                "import time\nfor i in range(60):\n"
                " print(f'line {i:03d} ' + 'x' * 30, flush=True); time.sleep(2 if i == 0 else 0.03)"
            )
            sid = (await client.launch("talker", [sys.executable, "-c", talker]))["subprocess_id"]
            await wait_output(home, sid, "line 000")
            follow = _cli(home, "logs", sid, "--follow")
            out, _ = follow.communicate(timeout=30)
    finally:
        daemon.close()
    assert follow.returncode == 0
    assert home.agent_log(sid).with_name(f"{sid}.log.1").exists()  # it did rotate
    assert out.splitlines() == [f"line {i:03d} " + "x" * 30 for i in range(60)]


def test_an_unwritable_log_costs_the_record_not_the_writer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log directory should be")
    log = JsonLinesLog(blocker / "memory" / "a.log", max_bytes=0, backups=0)
    log.write({"n": 1})  # must not raise
    assert log.failures == 1
    assert '{"n": 1}' in capsys.readouterr().err
    blocker.unlink()
    log.write({"n": 2})
    log.close()
    assert read_jsonl(blocker / "memory" / "a.log") == [{"n": 2}]
