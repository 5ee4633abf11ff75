"""``claude-pm`` as users run it: a real process, real exit codes, a real background daemon."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from supervisord.config.home import HOME_DIRNAME, Home
from supervisord.config.settings import load_config
from tests.conftest import TEST_MEMORY, alive, simagent, write_config
from tests.test_reports import alert, stat, write

SUBPROCESS_ID = re.compile(r"^[a-z][a-z0-9-]*_[0-9a-f]{12}$")
NOT_RUNNING = 3


def clean_environ(home: Home | None) -> dict[str, str]:
    """This environment without any CLAUDE_PM_* variable, plus the test's home if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PM_")}
    if home is not None:
        env["CLAUDE_PM_HOME"] = str(home.root)
    return env


class CLI:
    """Runs ``claude-pm`` for one home; remembers the daemons it started, to stop them."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.daemon_pids: set[int] = set()

    def __call__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout_s: float = 30.0,
        use_home: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        environ = clean_environ(self.home if use_home else None)
        environ.update(env or {})
        done = subprocess.run(
            [sys.executable, "-m", "supervisord", *args],
            env=environ,
            cwd=cwd or self.home.root.parent,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if self.home.pid_file.exists():
            self.daemon_pids.add(int(self.home.pid_file.read_text()))
        return done

    def ok(self, *args: str, **kw: Any) -> str:
        done = self(*args, **kw)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done.stdout

    def json(self, *args: str, **kw: Any) -> Any:
        # Right after the subcommand, so it stays ours even before a `-- CMD`.
        return json.loads(self.ok(args[0], "--json", *args[1:], **kw))

    def cleanup(self) -> None:
        """Stop every daemon this CLI started: politely, then by SIGTERM to its own pid."""
        if not self.daemon_pids:
            return
        self("shutdown", timeout_s=30)
        deadline = time.monotonic() + 30
        for pid in self.daemon_pids:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not alive(pid), f"daemon {pid} did not stop"


@pytest.fixture
def cli(home: Home) -> Iterator[CLI]:
    runner = CLI(home)
    yield runner
    runner.cleanup()


@pytest.fixture
def running(cli: CLI) -> int:
    """A daemon started the way users start it; its pid."""
    out = cli.ok("init")
    match = re.search(r"daemon started \(pid (\d+)\)", out)
    assert match, out
    return int(match.group(1))


def sim(*args: str) -> list[str]:
    return ["--", *simagent(*args)]


def wait_log(home: Home, subprocess_id: str, text: str, timeout_s: float = 10.0) -> None:
    """Until the agent's output shows ``text`` (simagent prints once its handlers are set)."""
    path = home.agent_log(subprocess_id)
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{subprocess_id} never printed {text!r}"
        time.sleep(0.02)


@pytest.fixture
def fresh_dir() -> Iterator[Path]:
    """A directory with no .claude-pm in it or above it."""
    path = Path(tempfile.mkdtemp(prefix="cpm-cli-", dir="/tmp"))
    if any((p / HOME_DIRNAME).is_dir() for p in path.parents):
        pytest.skip("a .claude-pm above the temporary directory would be found instead")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- init ---------------------------------------------------------------------------------------


def test_init_no_start_creates_dot_claude_pm_here(fresh_dir: Path) -> None:
    project = fresh_dir
    home = Home(project / HOME_DIRNAME)
    cli = CLI(home)
    out = cli.ok("init", "--no-start", cwd=project, use_home=False)
    assert home.config_file.is_file()
    assert f"wrote {home.config_file}" in out
    assert str(home.root) in out
    config = load_config(home.config_file, {})
    assert (config.limits.warning_mb, config.limits.critical_mb) == (1024, 2048)
    assert config.limits.max_mb == 4096
    assert not home.pid_file.exists()
    assert not home.default_socket.exists()
    # Idempotent: the config is kept as it is.
    home.config_file.write_text(home.config_file.read_text() + "\n# mine\n")
    again = cli.ok("init", "--no-start", cwd=project, use_home=False)
    assert "wrote" not in again
    assert home.config_file.read_text().endswith("# mine\n")
    # Run from a subdirectory, the home above is found (not a new one made there).
    sub = project / "src" / "deep"
    sub.mkdir(parents=True)
    cli.ok("init", "--no-start", cwd=sub, use_home=False)
    assert not (sub / HOME_DIRNAME).exists()
    assert not cli.daemon_pids


def test_init_starts_a_daemon_once(cli: CLI, running: int) -> None:
    assert int(cli.home.pid_file.read_text()) == running
    assert alive(running)
    again = cli.ok("init")
    assert f"already running (pid {running})" in again
    assert "reload" not in again  # No drift to report.
    assert cli.json("status")["daemon"]["pid"] == running


def test_daemon_lifecycle_through_the_cli(cli: CLI, running: int) -> None:
    status_text = cli.ok("status")
    assert f"pid {running}" in status_text
    assert "no agents running" in status_text
    status = cli.json("status")
    assert status["daemon"]["pid"] == running
    assert status["config"]["memory"]["max_mb"] == TEST_MEMORY["max_mb"]
    assert status["agent_count"] == 0

    out = cli.ok("launch", "worker", "--max-mb", "300", *sim("--hold-mb", "5"))
    first = out.strip()
    assert SUBPROCESS_ID.match(first), out
    assert first.startswith("worker_")
    launched = cli.json("launch", "worker", "--env", "A=b=c", *sim("--hold-mb", "5"))
    second = launched["subprocess_id"]
    assert SUBPROCESS_ID.match(second)
    assert launched["pid"] > 0
    assert launched["limits"]["max_mb"] == TEST_MEMORY["max_mb"]
    environ = Path(f"/proc/{launched['pid']}/environ").read_bytes().split(b"\0")
    assert b"A=b=c" in environ

    table = cli.ok("stats")
    assert first in table
    assert second in table
    one = cli.json("stats", first)
    assert one["subprocess_id"] == first
    assert one["limits"]["max_mb"] == 300
    assert cli.json("status")["agent_count"] == 2

    stopped = cli.json("stop", first)
    assert (stopped["subprocess_id"], stopped["reason"]) == (first, "stopped")
    killed = cli.ok("kill", second)
    assert f"{second} ended: stopped (signal SIGKILL)" in killed
    assert cli.json("stats") == {"agents": []}

    missing = cli("stop", first)
    assert missing.returncode == 1
    assert f"no agent {first}" in missing.stderr


def test_launch_wait_reports_how_the_agent_ended(cli: CLI, running: int) -> None:
    done = cli("launch", "quick", "--wait", "--", sys.executable, "-c", "exit(0)")
    assert done.returncode == 0, done.stderr
    sid, record = done.stdout.splitlines()[:2]
    assert SUBPROCESS_ID.match(sid)
    assert record.startswith(f"{sid} ended: exited (exit code 0)")

    failed = cli("launch", "quick", "--wait", "--", sys.executable, "-c", "exit(3)")
    assert failed.returncode == 1
    assert "exited (exit code 3)" in failed.stdout

    as_json = cli("launch", "quick", "--wait", "--json", "--", sys.executable, "-c", "exit(0)")
    assert as_json.returncode == 0
    record_json = json.loads(as_json.stdout)
    assert (record_json["reason"], record_json["exit_code"]) == ("exited", 0)
    assert record_json["memory_stats"]["aborted"] is False

    limited = cli("launch", "hog", "--wait", "--max-mb", "180", *sim("--rate", "150"))
    assert limited.returncode == 1
    assert "memory_limit" in limited.stdout


def test_shutdown_waits_until_the_daemon_is_gone(cli: CLI, running: int) -> None:
    sid = cli.ok("launch", "stubborn", *sim("--hold-mb", "5", "--ignore-term")).strip()
    wait_log(cli.home, sid, "simagent pid")
    out = cli.ok("shutdown")
    assert f"daemon (pid {running}) shutting down, stopping 1 agent(s)" in out
    assert "daemon stopped" in out
    # It let go of its home before `shutdown` returned: no socket, no pid file, no lock.
    assert not cli.home.pid_file.exists()
    assert not cli.home.default_socket.exists()
    with cli.home.lock_file.open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # Its process may take a moment more to exit the interpreter.
    deadline = time.monotonic() + 5
    while alive(running):
        assert time.monotonic() < deadline, f"daemon {running} still alive"
        time.sleep(0.01)
    (record,) = [
        json.loads(line) for line in cli.home.stats_log.read_text().splitlines() if line.strip()
    ]
    assert (record["reason"], record["signal"]) == ("daemon_shutdown", "SIGKILL")

    status = cli("status")
    assert status.returncode == NOT_RUNNING
    assert "claude-pm init" in status.stderr
    assert cli("stats").returncode == NOT_RUNNING
    assert cli("launch", "worker", "--", "true").returncode == NOT_RUNNING
    # And it starts again.
    restarted = cli.ok("init")
    assert "daemon started" in restarted
    assert int(cli.home.pid_file.read_text()) != running


# -- usage and failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        [],
        ["launch"],
        ["launch", "worker"],
        ["launch", "worker", "--"],
        ["launch", "worker", "--max-mb", "-5", "--", "true"],
        ["launch", "worker", "--max-mb", "0", "--", "true"],
        ["launch", "worker", "--max-mb", "lots", "--", "true"],
        ["launch", "worker", "--timeout", "inf", "--", "true"],
        ["launch", "worker", "--env", "NOEQUALS", "--", "true"],
        ["launch", "worker", "--env", "=value", "--", "true"],
        ["stop"],
        ["stop", "worker_000000000000", "--grace", "-1"],
        ["events", "--level", "LOUD"],
        ["report", "nonsense"],
    ],
    ids=lambda args: " ".join(args) or "nothing",
)
def test_usage_errors_exit_2(cli: CLI, args: list[str]) -> None:
    done = cli(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip()
    assert "Traceback" not in done.stderr


def test_without_a_daemon_commands_exit_3_but_usage_is_checked_first(cli: CLI) -> None:
    done = cli("launch", "worker", "--max-mb", "300", "--", "true")
    assert done.returncode == NOT_RUNNING
    assert "claude-pm init" in done.stderr
    assert cli("launch", "worker", "--max-mb", "-5", "--", "true").returncode == 2


@pytest.mark.parametrize(
    ("memory", "words"),
    [
        ({"max_mb": -1}, ["memory.max_mb", "-1"]),
        ({"warning_mb": "lots"}, ["memory.warning_mb", "'lots'"]),
        ({"critical_mb": 5000}, ["critical_mb (5000)", "max_mb (200)"]),
        ({"max_mbb": 1}, ["'max_mbb'", "max_mb"]),
    ],
)
def test_invalid_config_makes_init_fail_naming_the_key(
    cli: CLI, memory: dict[str, Any], words: list[str]
) -> None:
    write_config(cli.home, memory=memory)
    done = cli("init")
    assert done.returncode == 2, (done.stdout, done.stderr)
    for word in words:
        assert word in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not cli.home.pid_file.exists()


def test_invalid_environment_makes_init_fail_naming_the_variable(cli: CLI) -> None:
    done = cli("init", env={"CLAUDE_PM_MEMORY_MAX_MB": "lots"})
    assert done.returncode == 2
    assert "CLAUDE_PM_MEMORY_MAX_MB" in done.stderr
    assert not cli.home.pid_file.exists()


def test_init_reports_threshold_drift_and_reload_applies_it(cli: CLI, running: int) -> None:
    wanted = {"CLAUDE_PM_MEMORY_MAX_MB": "300", "CLAUDE_PM_MEMORY_CRITICAL_MB": "250"}
    out = cli.ok("init", env=wanted)
    assert f"already running (pid {running})" in out
    assert "max_mb 200 (daemon) vs 300 (CLAUDE_PM_MEMORY_MAX_MB)" in out
    assert "critical_mb 150 (daemon) vs 250 (CLAUDE_PM_MEMORY_CRITICAL_MB)" in out
    assert "claude-pm reload" in out
    assert cli.json("status")["config"]["memory"]["max_mb"] == TEST_MEMORY["max_mb"]

    reloaded = cli.ok("reload", env=wanted)
    assert "max 300 MB" in reloaded
    memory = cli.json("status")["config"]["memory"]
    assert (memory["critical_mb"], memory["max_mb"]) == (250, 300)
    assert "reload" not in cli.ok("init", env=wanted)
    assert cli.json("status")["daemon"]["pid"] == running

    # A bad value is refused whole, and the daemon keeps what it had.
    bad = cli("reload", env={"CLAUDE_PM_MEMORY_MAX_MB": "lots"})
    assert bad.returncode != 0
    assert "CLAUDE_PM_MEMORY_MAX_MB='lots'" in bad.stderr
    assert cli.json("status")["config"]["memory"]["max_mb"] == 300
    # Without the variables, reload goes back to the file.
    cli.ok("reload")
    assert cli.json("status")["config"]["memory"]["max_mb"] == TEST_MEMORY["max_mb"]


# -- reports need no daemon ---------------------------------------------------------------------


def test_reports_run_without_a_daemon(cli: CLI) -> None:
    """The reports read the home's logs as the daemon left them, and this machine's memory."""
    now = datetime.now()
    minute = timedelta(minutes=1)
    write(
        cli.home.stats_log,
        stat("engineer_000000000001", 120.0, now - 25 * 60 * minute),  # not in the last 24 h
        stat("engineer_000000000002", 100.0, now - 50 * minute),
        "not a record\n",
        stat("engineer_000000000003", 250.0, now - 40 * minute),
        stat("engineer_000000000004", 570.0, now - 30 * minute, aborted=True),
    )
    write(
        cli.home.alerts_log,
        alert("engineer_000000000004", "WARNING", 1100.0, now - 32 * minute),
        alert("engineer_000000000004", "CRITICAL", 2100.0, now - 31 * minute),
    )
    health = cli("report", "health")
    assert health.returncode == 0, health.stderr
    lines = health.stdout.splitlines()
    assert lines[0] == "System Memory Health Check"
    assert "  Agents finished: 3 (aborted: 1)" in lines
    assert "  Alerts: 1 CRITICAL, 1 WARNING" in lines
    assert "1 bad line(s) skipped:" in lines
    verdicts = {
        "Memory usage is healthy",
        "WARNING: High memory usage detected!",
        "CRITICAL: Very high memory usage!",
    }
    assert len(verdicts & set(lines)) == 1, lines
    # This machine's memory, not a placeholder.
    (total,) = [line for line in lines if line.startswith("Total Memory: ")]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    assert float(total.split()[2]) == pytest.approx(mem_total_kb / 1024, abs=1)

    leaks = cli("report", "leaks", "--json")
    assert leaks.returncode == 0, leaks.stderr
    report = json.loads(leaks.stdout)
    # Every run in file order, as the guide's script reads them: (570 - 120) / 4 per run.
    assert report["types"] == {
        "engineer": {
            "runs": 4,
            "enough_data": True,
            "avg_peak_mb": 260.0,
            "max_peak_mb": 570.0,
            "growth_mb_per_run": 112.5,
            "possible_leak": True,
        }
    }
    assert len(report["problems"]) == 1, report["problems"]
    assert not cli.home.pid_file.exists()
