"""The guide's ``TaskToolHelper``: launch agents through the daemon, starting it if needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisord.config.home import Home, find_home
from supervisord.control.background import start_daemon
from supervisord.control.client import Client, resolve_socket
from supervisord.core.errors import SupervisordError


@dataclass
class TaskToolConfiguration:
    """None means "as the daemon is configured" (defaults 1024, 2048, 4096 MB)."""

    enable_memory_monitoring: bool = True
    memory_warning_mb: float | None = None
    memory_critical_mb: float | None = None
    memory_max_mb: float | None = None
    timeout_seconds: float | None = None

    def limits(self) -> dict[str, Any]:
        given = {
            "warning_mb": self.memory_warning_mb,
            "critical_mb": self.memory_critical_mb,
            "max_mb": self.memory_max_mb,
            "timeout_s": self.timeout_seconds,
        }
        limits = {key: value for key, value in given.items() if value is not None}
        if not self.enable_memory_monitoring:
            limits["enabled"] = False
        return limits


class TaskToolHelper:
    def __init__(self, config: TaskToolConfiguration | None = None) -> None:
        self.config = config or TaskToolConfiguration()

    def create_agent_subprocess(
        self,
        agent_type: str,
        task_description: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Launch ``agent_type`` on ``task_description`` under supervision.

        The command is the type's ``[agents.<type>]`` template with ``{task}`` replaced, unless
        ``command`` is given. Returns ``{success, subprocess_id, pid, memory_monitoring}``, or
        ``{success: False, error}`` saying what to fix (e.g. the config key to set). A launch
        that must wait for room in the host's memory budget is queued: ``queued`` is True,
        ``pid`` None, and ``position`` and ``reason`` say where it waits and why.
        """
        home = Home(find_home())
        try:
            start_daemon(home)
            with Client(resolve_socket(home)) as client:
                launch = self._launch_args(task_description, cwd, env, command, force)
                result = client.launch(agent_type, command, **launch)
        except SupervisordError as exc:
            return {
                "success": False,
                "error": str(exc),
                "subprocess_id": None,
                "pid": None,
                "memory_monitoring": self.config.enable_memory_monitoring,
            }
        answer = {
            "success": True,
            "subprocess_id": result["subprocess_id"],
            "pid": result["pid"],
            "memory_monitoring": self.config.enable_memory_monitoring,
            "queued": bool(result.get("queued")),
            "log": result["log"],
        }
        if answer["queued"]:
            answer.update(position=result["position"], reason=result["reason"])
        else:
            answer["limits"] = result["limits"]
        return answer

    def run_agent_subprocess(
        self,
        agent_type: str,
        task_description: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Launch as ``create_agent_subprocess`` does, then wait until the agent's tree is
        gone: ``{success, subprocess_id, record}``, success meaning it exited with code 0."""
        home = Home(find_home())
        try:
            start_daemon(home)
            with Client(resolve_socket(home), timeout_s=None) as client:
                launch = self._launch_args(task_description, cwd, env, command, force)
                launched, record = client.launch_and_wait(agent_type, command, **launch)
        except SupervisordError as exc:
            return {"success": False, "error": str(exc), "subprocess_id": None, "record": None}
        ok = record.get("reason") == "exited" and record.get("exit_code") == 0
        return {"success": ok, "subprocess_id": launched["subprocess_id"], "record": record}

    def _launch_args(
        self,
        task_description: str,
        cwd: str | None,
        env: dict[str, str] | None,
        command: list[str] | None,
        force: bool,
    ) -> dict[str, Any]:
        """The client's launch arguments for this helper's configuration."""
        return {
            "task": None if command else task_description,
            "cwd": cwd,
            "env": env,
            "limits": self.config.limits() or None,
            "force": force or None,
        }
