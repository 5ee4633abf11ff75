"""``claude-pm`` with restarts: launch flags, ``restart ID``, ``queue`` and their bad input."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from supervisord.config.home import Home
from tests.conftest import simagent
from tests.test_cli import CLI


@pytest.fixture
def cli(home: Home) -> Iterator[CLI]:
    runner = CLI(home)
    runner.ok("init")
    yield runner
    runner.cleanup()


def test_launch_wait_follows_the_runs_to_the_last_record(cli: CLI) -> None:
    done = cli(
        "launch",
        "flaky",
        "--json",
        "--wait",
        "--restart",
        "on-failure",
        "--restart-delay",
        "0.1",
        "--restart-limit",
        "2",
        "--",
        *simagent("--duration", "0", "--exit-code", "1"),
    )
    assert done.returncode == 1, done.stderr
    record = json.loads(done.stdout)
    assert (record["run"], record["restarts"], record["next_restart_s"]) == (2, 1, None)


def test_restart_prints_the_next_run_and_queue_lists_a_pending_one(cli: CLI) -> None:
    sid = cli.ok("launch", "sleepy", "--", "sleep", "60").strip()
    out = cli.ok("restart", sid)
    assert out.startswith(f"{sid} restarted: run 2, pid ")
    flaky = cli.ok(
        "launch", "flaky", "--restart", "on-failure", "--restart-delay", "30", "--", "false"
    ).strip()
    deadline = time.monotonic() + 10
    while "restarting" not in (listing := cli.ok("queue")):
        assert time.monotonic() < deadline, listing
        time.sleep(0.05)
    assert flaky in listing
    assert "run 2 due in" in listing
    assert "(run 1 ended: exited)" in listing
    status = cli.ok("status")
    assert f"restarting: {flaky}" in status
    stopped = cli.json("stop", flaky)
    assert stopped["restart_cancelled"] is True
    cli.ok("stop", sid)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--restart", "sometimes"], "argument --restart: invalid choice: 'sometimes'"),
        (["--restart-delay", "-1"], "argument --restart-delay"),
        (["--restart-backoff", "0.5"], "argument --restart-backoff: '0.5' must be a factor >= 1"),
        (["--restart-limit", "0"], "argument --restart-limit"),
        (["--session-pattern", "id: (x+"], "launch.session_pattern = 'id: (x+' does not compile"),
        (["--session-pattern", "id: \\S+"], "has 0 groups; give exactly one"),
        (["--after", "x_000000000000"], "launch: after: no agent 'x_000000000000'"),
        (["--after", "a,,b"], "argument --after: 'a,,b': give subprocess ids"),
        (["--resume-command", "claude 'unclosed"], "argument --resume-command"),
    ],
)
def test_bad_restart_flags_are_refused_naming_them(cli: CLI, flags: list[str], named: str) -> None:
    done = cli("launch", "step", *flags, "--", "sleep", "1")
    assert done.returncode in (1, 2), done
    assert named in done.stderr
    assert json.loads(cli.ok("status", "--json"))["agents"] == []


def test_logs_follow_goes_on_through_the_restarts(cli: CLI) -> None:
    sid = cli.ok(
        "launch",
        "flaky",
        "--restart",
        "on-failure",
        "--restart-delay",
        "0.2",
        "--restart-limit",
        "2",
        "--",
        "sh",
        "-c",
        'echo "run $CLAUDE_PM_RUN of $CLAUDE_PM_RESTARTS"; sleep 0.5; exit 1',
    ).strip()
    out = cli.ok("logs", sid, "--follow", timeout_s=20)
    assert out.index("run 1 of 0") < out.index(f"{sid} run 2 (restart 1)") < out.index("run 2 of 1")
