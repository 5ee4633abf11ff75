"""The operational guide works verbatim against a live daemon.

One scenario runs first: agents that crossed warning and critical and were killed, ones that
exited normally (one above 1000 MB), and one large agent still running. Then every command,
``jq`` filter and script of the guide runs exactly as written (from docs/operational-guide.md,
a copy of the guide users have), in a project directory holding ``.claude-pm/``, and each
must exit 0 and print the figures the agents really produced. Only the parts that need the
network or Prometheus are left out, and `pkill -f` (the emergency step) is replaced by a
SIGTERM to the daemon's own pid.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisord.config.home import Home
from supervisord.config.settings import ENV_VARIABLES
from supervisord.control.client import Client
from tests.conftest import alive, read_jsonl, require_tool, simagent, skip_or_fail, write_config
from tests.guide import GUIDE, SEED, block, heredocs, python_c_commands, shell_lines, under

BIN = Path(sys.executable).parent
AGENT_MEMORY = {
    "warning_mb": 100,
    "critical_mb": 150,
    "max_mb": 200,
    "check_interval_s": 0.2,
    "term_grace_s": 1.0,
}


@dataclass
class Scenario:
    project: Path
    home: Home
    env: dict[str, str]
    ids: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        command: str,
        timeout_s: float = 60,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.project,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"{command!r} exited {done.returncode}: {done.stderr}"
        return done

    def client(self) -> Client:
        return Client(self.home.default_socket, timeout_s=60)

    @property
    def stats(self) -> list[dict[str, Any]]:
        return read_jsonl(self.home.stats_log)

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return read_jsonl(self.home.alerts_log)


def guide_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    env.pop("CLAUDE_PM_HOME", None)  # The guide finds .claude-pm/ from the current directory.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python`, `claude-pm`: ours.
    return env


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    project = Path(tempfile.mkdtemp(prefix="cpm-guide-", dir="/tmp"))
    home = Home(project / ".claude-pm")
    big = {"warning_mb": 1500, "critical_mb": 1800, "max_mb": 2000}
    write_config(
        home,
        AGENT_MEMORY,
        agents={
            "engineer": {
                "command": [*simagent("--hold-mb", "5", "--duration", "1"), "--task", "{task}"]
            },
            "big": big,
            "bigtask": big,
        },
    )
    s = Scenario(project, home, guide_env())
    s.run("claude-pm init")
    plan = {
        "leaker-1": ("leaker", simagent("--hold-mb", "10", "--rate", "150")),
        "leaker-2": ("leaker", simagent("--hold-mb", "10", "--rate", "200")),
        "stubborn": (
            "stubborn",
            simagent("--hold-mb", "10", "--rate", "150", "--in-child", "--ignore-term"),
        ),
        "slow": (
            "slow",
            simagent("--hold-mb", "10", "--rate", "100", "--cap", "170", "--duration", "3"),
        ),
        "steady-1": ("steady", simagent("--hold-mb", "20", "--duration", "0.5")),
        "steady-2": ("steady", simagent("--hold-mb", "40", "--duration", "0.5")),
        "bigtask": ("bigtask", simagent("--hold-mb", "1100", "--duration", "2")),
        "big": ("big", simagent("--hold-mb", "1100")),
    }
    with s.client() as client, s.client() as watcher:
        events = watcher.subscribe(types=["exit"])
        for name, (agent_type, command) in plan.items():
            s.ids[name] = client.launch(agent_type, command)["subprocess_id"]
        waiting = {sid for name, sid in s.ids.items() if name != "big"}
        deadline = time.monotonic() + 60
        for event in events:
            waiting.discard(event["subprocess_id"])
            if not waiting or time.monotonic() > deadline:
                break
        assert not waiting, f"agents did not end: {waiting}"
        while client.stats(s.ids["big"])["current_mb"] < 1000:
            time.sleep(0.1)
    yield s
    s.run("claude-pm shutdown", check=False)
    shutil.rmtree(project, ignore_errors=True)


def test_guide_copy_is_the_guide_users_have() -> None:
    if not SEED.is_file():
        skip_or_fail(f"the guide users have ({SEED}) is missing: {GUIDE} cannot be checked")
    assert GUIDE.read_text() == SEED.read_text()


def test_scenario_really_escalated(scenario: Scenario) -> None:
    by_id = {r["subprocess_id"]: r for r in scenario.stats}
    assert by_id[scenario.ids["leaker-1"]]["reason"] == "memory_limit"
    assert by_id[scenario.ids["stubborn"]]["signal"] == "SIGKILL"
    slow = [a["event"] for a in scenario.alerts if a["subprocess_id"] == scenario.ids["slow"]]
    assert slow[:2] == ["memory_warning", "memory_critical"]


# -- Quick start --------------------------------------------------------------------------------


def test_enable_memory_monitoring(scenario: Scenario) -> None:
    active, status = python_c_commands(block("Enable Memory Monitoring").text)
    assert scenario.run(active).stdout == "Memory monitoring active\n"
    report = json.loads(scenario.run(status).stdout)
    assert report["daemon"]["running"] is True
    assert report["system"]["total_mb"] > 0
    assert report["child_count"] == 1
    assert report["total_child_memory_mb"] > 1000


def test_monitor_active_subprocesses(scenario: Scenario) -> None:
    all_stats, check = python_c_commands(block("Monitor Active Subprocesses").text)
    stats = json.loads(scenario.run(all_stats).stdout)
    assert list(stats) == [scenario.ids["big"]]
    assert stats[scenario.ids["big"]]["current_mb"] > 1000
    assert scenario.run(check).stdout == "(0.0, 'NOT_MONITORED')\n"  # the guide's placeholder
    real = check.replace("subprocess_id_here", scenario.ids["big"])
    current, status = ast.literal_eval(scenario.run(real).stdout)
    assert current > 1000
    assert status == "OK"
    aborted = check.replace("subprocess_id_here", scenario.ids["leaker-1"])
    assert ast.literal_eval(scenario.run(aborted).stdout)[1] == "ABORTED"


@pytest.mark.parametrize(
    "heading",
    ["Low Memory System (4GB RAM)", "High Memory System (32GB+ RAM)", "Development/Testing"],
)
def test_configuration_examples_are_valid(scenario: Scenario, heading: str) -> None:
    exports = block(heading).text
    check = (
        "claude-pm init --no-start >/dev/null && python -c "
        "'from supervisord.config.settings import load_config; from pathlib import Path; "
        'print(load_config(Path(".claude-pm/config/supervisord.toml")).limits.max_mb)\''
    )
    out = scenario.run(exports + check).stdout
    wanted = [line.split("=")[1] for line in shell_lines(exports, "export CLAUDE_PM_MEMORY_MAX_MB")]
    assert float(out.strip()) == float(wanted[0])


# -- Monitoring operations ----------------------------------------------------------------------


def test_real_time_monitoring_filters(scenario: Scenario) -> None:
    require_tool("jq", "the guide's jq filters, run verbatim")
    text = block("Real-time Monitoring").text
    lines = [line for line in text.splitlines() if line.startswith("tail -f")]
    assert len(lines) == 3
    # `tail -f` never ends by itself: give each a few seconds, as a user would watch it.
    outputs = [scenario.run(f"timeout 3 {line}", check=False).stdout for line in lines]
    last = scenario.alerts[-10:]
    assert [json.loads(x) for x in outputs[0].splitlines()] == last
    assert json.loads("[" + outputs[1].replace("}\n{", "},{") + "]") == last
    critical = [a for a in last if a["level"] == "CRITICAL"]
    assert critical
    assert outputs[2].count('"level": "CRITICAL"') == len(critical)


def test_subprocess_statistics_jq_filters(scenario: Scenario) -> None:
    require_tool("jq", "the guide's jq filters, run verbatim")
    text = block("Subprocess Statistics Analysis").text
    view, intensive, average, aborted = [
        line for line in text.splitlines() if line.startswith("cat ")
    ]
    stats = scenario.stats
    assert len(scenario.run(view).stdout.split('"subprocess_id"')) - 1 == len(stats)
    big = [r["subprocess_id"] for r in stats if r["memory_stats"]["peak_mb"] > 1000]
    assert big == [scenario.ids["bigtask"]]
    assert scenario.ids["bigtask"] in scenario.run(intensive).stdout
    mean = sum(r["memory_stats"]["peak_mb"] for r in stats) / len(stats)
    assert float(scenario.run(average).stdout) == pytest.approx(mean)
    out = scenario.run(aborted).stdout
    for name in ("leaker-1", "leaker-2", "stubborn"):
        assert scenario.ids[name] in out
    assert scenario.ids["steady-1"] not in out


def test_system_memory_health_check(scenario: Scenario) -> None:
    out = scenario.run(block("System Memory Health Check").text).stdout
    assert "Total Memory:" in out
    assert "Child Processes: 1\n" in out
    child_mb = float(out.split("Total Child Memory: ")[1].split(" MB")[0])
    assert child_mb > 1000
    assert "Memory usage is healthy" in out or "WARNING" in out


# -- Troubleshooting ----------------------------------------------------------------------------


def test_identify_problem_subprocess(scenario: Scenario) -> None:
    (command,) = python_c_commands(under("High Memory Usage Investigation")[0].text)
    out = scenario.run(command).stdout
    assert out.startswith(f"{scenario.ids['big']}: 11")
    assert "(Peak: 11" in out


def test_check_alert_history(scenario: Scenario) -> None:
    recent, specific = shell_lines(under("High Memory Usage Investigation")[1].text, "grep")
    out = scenario.run(recent).stdout.splitlines()
    assert out
    assert all('"CRITICAL"' in line or "CRITICAL" in line for line in out)
    sid = scenario.ids["leaker-1"]
    assert scenario.run(specific, check=False).returncode == 1  # the placeholder matches nothing
    mine = scenario.run(specific.replace("subprocess_id_here", sid)).stdout.splitlines()
    assert [json.loads(line)["event"] for line in mine] == [
        "memory_warning",
        "memory_critical",
        "sigterm_sent",
    ]


def test_analyze_memory_growth(scenario: Scenario) -> None:
    text = under("High Memory Usage Investigation")[2].text
    assert scenario.run(text).stdout == ""  # run as written: "[subprocess_id]" matches nothing
    (script,) = heredocs(text)
    everything = scenario.run(f"python {script}").stdout
    assert everything.count("System Available:") == len(scenario.alerts)
    sid = scenario.ids["leaker-1"]
    mine = scenario.run(f"python {script} {sid}").stdout
    messages = [a["message"] for a in scenario.alerts if a["subprocess_id"] == sid]
    assert [
        line.split(": ", 1)[1]
        for line in mine.splitlines()
        if "MB" in line and "System" not in line
    ] == messages


def test_memory_leak_detection(scenario: Scenario) -> None:
    out = scenario.run(block("Memory Leak Detection").text).stdout
    assert "Memory Usage Trends by Agent Type" in out
    leakers = [r["memory_stats"]["peak_mb"] for r in scenario.stats if r["agent_type"] == "leaker"]
    assert "\nleaker:\n  Runs: 2\n" in out
    assert f"Max Peak: {max(leakers):.1f} MB" in out


def test_weekly_report(scenario: Scenario) -> None:
    out = scenario.run(block("Weekly Analysis").text).stdout
    stats = scenario.stats
    assert f"Total Subprocesses: {len(stats)}\n" in out
    aborted = sum(1 for r in stats if r["memory_stats"]["aborted"])
    assert aborted == 3
    assert f"Aborted Subprocesses: {aborted}\n" in out
    assert "WARNING: " in out.split("Warnings Summary:")[1]


def test_optimize_memory_thresholds(scenario: Scenario) -> None:
    script = scenario.project / "tune.py"
    script.write_text(block("Optimize Memory Thresholds").text)
    out = scenario.run(f"python {script.name}").stdout
    ok = [r for r in scenario.stats if not r["memory_stats"]["aborted"]]
    assert out.startswith(f"Recommended Thresholds based on {len(ok)} successful runs:")
    claude_pm_report = scenario.run("claude-pm report thresholds --json").stdout
    assert json.loads(claude_pm_report)["p90_mb"] == pytest.approx(
        float(_numpy_percentile([r["memory_stats"]["peak_mb"] for r in ok], 90))
    )


def _numpy_percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def test_daily_maintenance_rotation_snippet(scenario: Scenario) -> None:
    before = scenario.home.stats_log.read_text()
    scenario.run(block("Daily Maintenance").text)
    assert scenario.home.stats_log.read_text() == before  # under 100 MB: nothing to rotate


def test_stuck_subprocess_placeholder_is_harmless(scenario: Scenario) -> None:
    script = scenario.project / "stuck.py"
    script.write_text(block("2. Subprocess Stuck in High Memory State").text)
    scenario.run(f"python {script.name}")  # engineer_abc123 does not exist: no error


def test_memory_efficient_task_patterns(scenario: Scenario) -> None:
    script = scenario.project / "batches.py"
    script.write_text(block("Memory-Efficient Task Patterns").text)
    before = {r["subprocess_id"] for r in scenario.stats}
    scenario.run(f"python {script.name}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = [r for r in scenario.stats if r["subprocess_id"] not in before]
        if len(new) == 10:
            break
        time.sleep(0.1)
    assert len(new) == 10
    assert {r["agent_type"] for r in new} == {"engineer"}
    assert {r["reason"] for r in new} == {"exited"}
    tasks = sorted(r["command"][-1] for r in new)
    assert tasks == sorted(f"Process files {i} to {i + 100}" for i in range(0, 1000, 100))


def test_disable_memory_monitoring(scenario: Scenario) -> None:
    text = block("3. Disable Memory Monitoring (Emergency Only)").text
    python_part = text.split("# Or in Python\n")[1]
    scenario.run(f"python -c '{python_part}'")
    export = shell_lines(text, "export ")[0]
    scenario.run(f"{export} && claude-pm reload")
    status = json.loads(scenario.run("claude-pm status --json").stdout)
    assert status["monitoring"].startswith("disabled")
    scenario.run("claude-pm reload")  # without the variable: enabled again
    assert json.loads(scenario.run("claude-pm status --json").stdout)["monitoring"] == "enabled"


def test_emergency_procedure(scenario: Scenario) -> None:
    """Stop the daemon by signal, clear the logs, restart with a lower limit: in force."""
    text = block("1. System Running Out of Memory").text
    assert shell_lines(text, "pkill -f")  # replaced here: signal the daemon by its own pid
    old_pid = int(scenario.home.pid_file.read_text())
    with scenario.client() as client:
        big_pid = client.stats(scenario.ids["big"])["pid"]
    os.kill(old_pid, signal.SIGTERM)
    rest = text.split('pkill -f "claude-pm"\n')[1]
    scenario.run(rest, timeout_s=90)
    assert not alive(big_pid), "an agent of the old daemon is still running unsupervised"
    with scenario.client() as client:
        status = client.status()
    assert status["daemon"]["pid"] != old_pid
    assert status["config"]["memory"]["max_mb"] == 1024
    assert status["config"]["memory"]["warning_mb"] < 1024
    # The old daemon writes the big agent's record when its tree is gone, which may be after
    # the logs were cleared: then it opens the files anew, and nothing is lost either way.
    with scenario.client() as client:
        sid = client.launch("leaker", simagent("--duration", "0.2"))["subprocess_id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
        r["subprocess_id"] == sid for r in scenario.stats
    ):
        time.sleep(0.1)
    records = [(r["subprocess_id"], r["reason"]) for r in scenario.stats]
    assert records[-1] == (sid, "exited")
    assert records[:-1] in ([], [(scenario.ids["big"], "daemon_shutdown")])
