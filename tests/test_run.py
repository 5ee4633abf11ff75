"""``claude-pm run``: an agent started in a terminal, supervised like a launched one, with the
terminal, Ctrl-C and the exit status its own. Driven in a real tmux pane (send-keys,
capture-pane), as a person would type it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisord.config.home import Home
from tests.conftest import (
    AGENTS,
    PYTHON,
    TEST_MEMORY,
    read_jsonl,
    require_tool,
    simagent,
)
from tests.test_cli import CLI, clean_environ

BIN = Path(PYTHON).parent


class Pane:
    """A tmux server of the test's own with one bash pane, in the test's home."""

    def __init__(self, home: Home) -> None:
        self.tmux = require_tool("tmux", "typing into a terminal as a person does")
        self.socket = f"cpm-{os.getpid()}-{time.monotonic_ns()}"
        env = clean_environ(home)
        env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PS1"] = "$ "
        subprocess.run(
            [
                self.tmux,
                "-L",
                self.socket,
                "new-session",
                "-d",
                "-x",
                "160",
                "-y",
                "40",
                "bash --norc --noprofile",
            ],
            env=env,
            cwd=home.root.parent,
            check=True,
        )

    def type(self, *keys: str) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "send-keys", *keys], check=True)

    def screen(self) -> str:
        done = subprocess.run(
            [self.tmux, "-L", self.socket, "capture-pane", "-p", "-J", "-S", "-200"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def wait_for(self, pattern: str, timeout_s: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            if found := re.search(pattern, self.screen()):
                return found
            assert time.monotonic() < deadline, f"never on screen: {pattern}\n{self.screen()}"
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], check=False)


@pytest.fixture
def pane(home: Home) -> Iterator[Pane]:
    pane = Pane(home)
    cli = CLI(home)
    yield pane
    pane.close()
    cli.daemon_pids.update(_daemon_pid(home))
    cli.cleanup()


def _daemon_pid(home: Home) -> set[int]:
    return {int(home.pid_file.read_text())} if home.pid_file.exists() else set()


def test_typed_lines_reach_the_agent_and_ctrl_c_ends_it_with_130(pane: Pane, home: Home) -> None:
    echoer = shlex.join([PYTHON, str(AGENTS / "echoer.py")])
    # No daemon runs yet: `run` starts one, as `init` does.
    pane.type(f"claude-pm run --type echo -- {echoer}", "Enter")
    pane.wait_for(r"(?m)^ready$")
    pane.type("hello there", "Enter")
    pane.wait_for(r"answer: hello there")
    agents = CLI(home).json("stats")["agents"]  # `claude-pm stats` lists it while it runs
    assert [(a["agent_type"], a["command"][-1]) for a in agents] == [
        ("echo", str(AGENTS / "echoer.py"))
    ]
    pane.type("C-c")
    pane.wait_for(r"KeyboardInterrupt")
    time.sleep(0.3)  # the shell's prompt again
    # Asked on its own line: bash drops the rest of a list that Ctrl-C interrupted.
    pane.type('echo "status $?"', "Enter")
    pane.wait_for(r"(?m)^status 130$")
    record = _records(home)[-1]
    assert record["subprocess_id"] == agents[0]["subprocess_id"]
    assert record["reason"] == "exited"


def test_a_leaker_is_stopped_with_its_reason_on_screen_and_status_143(
    pane: Pane, home: Home
) -> None:
    leaker = shlex.join(simagent("--hold-mb", "10", "--rate", "150", "--cap", "260"))
    pane.type(f'claude-pm run --max-mb 150 -- {leaker}; echo "status $?"', "Enter")
    line = pane.wait_for(r"claude-pm: (\S+) stopped: memory [\d.]+ MB exceeds hard limit 150 MB")
    pane.wait_for(r"status 14[37]")  # 143: SIGTERM; 137 had it ignored SIGTERM
    record = next(r for r in _records(home) if r["subprocess_id"] == line.group(1))
    assert record["reason"] == "memory_limit"
    assert record["memory_stats"]["peak_mb"] >= 150
    assert record["memory_stats"]["peak_mb"] < TEST_MEMORY["max_mb"] + 100


def _records(home: Home) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while not (records := read_jsonl(home.stats_log)):
        assert time.monotonic() < deadline, "no stats record"
        time.sleep(0.05)
    return records


def test_run_of_a_missing_executable_exits_127_as_a_shell_does(home: Home) -> None:
    done = CLI(home)("run", "--", "no-such-agent-cli")
    assert done.returncode == 127
    assert "claude-pm: no-such-agent-cli: command not found" in done.stderr
