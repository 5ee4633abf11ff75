"""The guide's claude_pm API beyond what the guide runs: launching and waiting for an agent."""

from __future__ import annotations

import os

import pytest

from claude_pm.utils.task_tool_helper import TaskToolConfiguration, TaskToolHelper
from supervisord.config.home import Home
from tests.conftest import DaemonProcess, simagent


@pytest.fixture
def in_home(home: Home, daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> Home:
    monkeypatch.setenv("CLAUDE_PM_HOME", str(home.root))
    return home


def test_run_agent_subprocess_waits_for_the_record(in_home: Home) -> None:
    helper = TaskToolHelper(TaskToolConfiguration(memory_max_mb=300, memory_warning_mb=100))
    done = helper.run_agent_subprocess(
        "steady", "", command=simagent("--hold-mb", "5", "--duration", "0.3")
    )
    assert done["success"] is True
    record = done["record"]
    assert record["subprocess_id"] == done["subprocess_id"]
    assert (record["reason"], record["exit_code"]) == ("exited", 0)


def test_run_agent_subprocess_reports_a_kill_as_failure(in_home: Home) -> None:
    helper = TaskToolHelper(
        TaskToolConfiguration(memory_warning_mb=20, memory_critical_mb=40, memory_max_mb=60)
    )
    done = helper.run_agent_subprocess("hog", "", command=simagent("--rate", "200", "--cap", "150"))
    assert done["success"] is False
    assert done["record"]["reason"] == "memory_limit"
    assert not os.path.exists(f"/proc/{done['record']['pid']}/status")


def test_run_agent_subprocess_names_what_is_wrong(in_home: Home) -> None:
    done = TaskToolHelper().run_agent_subprocess("ghost", "", command=["/nonexistent/agent"])
    assert done["success"] is False
    assert "not found" in done["error"]
