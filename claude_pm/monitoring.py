"""The guide's ``claude_pm.monitoring`` API: thin wrappers over ``supervisord.control.client``.

Everything answers with no daemon running: system memory is read locally, the daemon is
reported absent, and there are simply no subprocesses to report.
"""

from __future__ import annotations

from typing import Any

import psutil

from supervisord.config.home import Home, find_home
from supervisord.control.client import Client, resolve_socket
from supervisord.core.errors import DaemonNotRunning, NotFoundError
from supervisord.core.units import MIB
from supervisord.host.sysmem import system_memory
from supervisord.observe.logread import iter_records


def _client() -> Client:
    return Client(resolve_socket(Home(find_home())))


def _agents() -> list[dict[str, Any]]:
    try:
        with _client() as client:
            return list(client.stats()["agents"])
    except DaemonNotRunning:
        return []


class MemoryMonitor:
    """System memory, the daemon's own process, and its agents as children."""

    def get_memory_status(self) -> dict[str, Any]:
        home = Home(find_home())
        daemon: dict[str, Any] = {"running": False, "pid": None, "socket": None}
        try:
            with Client(resolve_socket(home)) as client:
                hello = client.hello()
                agents = list(client.stats()["agents"])
            daemon = {"running": True, "pid": hello["pid"], "socket": str(client.socket_path)}
        except DaemonNotRunning:
            agents = []
        return {
            "system": system_memory().as_dict(),
            "process": _process(daemon["pid"]),
            "daemon": daemon,
            "home": str(home.root),
            "children": agents,
            "child_count": len(agents),
            "total_child_memory_mb": round(sum(a["current_mb"] for a in agents), 1),
        }


def _process(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {"pid": None, "memory_mb": 0.0, "running": False}
    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return {"pid": pid, "memory_mb": 0.0, "running": False}
    return {"pid": pid, "memory_mb": round(rss / MIB, 1), "running": True}


class SubprocessMemoryMonitor:
    """Per-agent figures, as the daemon measures them."""

    def get_all_subprocess_stats(self) -> dict[str, dict[str, Any]]:
        return {agent["subprocess_id"]: agent for agent in _agents()}

    def check_memory(self, subprocess_id: str) -> tuple[float, str]:
        """``(current_mb, status)``: OK, WARNING, CRITICAL, ABORTED or NOT_MONITORED."""
        try:
            with _client() as client:
                stats = client.stats(subprocess_id)
            return float(stats["current_mb"]), str(stats["status"])
        except (DaemonNotRunning, NotFoundError):
            pass
        # Ended already: the stats log says whether the daemon aborted it.
        for _, record in iter_records(Home(find_home()).stats_log):
            memory = record.get("memory_stats")
            if (
                record.get("subprocess_id") == subprocess_id
                and isinstance(memory, dict)
                and memory.get("aborted") is True
            ):
                return float(memory.get("end_mb") or 0.0), "ABORTED"
        return 0.0, "NOT_MONITORED"

    def stop_monitoring(self, subprocess_id: str) -> dict[str, Any] | None:
        """Terminate that agent with the usual escalation; its final stats record, or None."""
        try:
            with Client(resolve_socket(Home(find_home())), timeout_s=None) as client:
                return client.stop(subprocess_id)
        except (DaemonNotRunning, NotFoundError):
            return None


def get_memory_monitor() -> MemoryMonitor:
    return MemoryMonitor()


def get_subprocess_memory_monitor() -> SubprocessMemoryMonitor:
    return SubprocessMemoryMonitor()
