"""``claude-pm run`` as PID 1 of a container: a new PID namespace (``unshare --pid --fork
--mount-proc``) inside a memory cgroup limited to 400 MB, as a pod's limit encloses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from supervisord.host import procfs
from tests.cgroup_helpers import JOIN_THEN_EXEC, limited_v1_group
from tests.conftest import PYTHON, require_tool, simagent, skip_or_fail
from tests.test_cli import clean_environ

LIMIT_MB = 400
# Orphans ten grandchildren a second (double-forked sleeps), and says when SIGTERM reaches it.
ORPHANS = (
    'trap "echo got TERM; exit 143" TERM; echo ready; '
    "while :; do ( (sleep 0.05 &) ); sleep 0.1; done"
)


@pytest.fixture
def pod(short_tmp: Path) -> Iterator[tuple[Path, Path]]:
    """(a memory group limited to 400 MB, a home whose config has the tests' fast cadence)."""
    home = short_tmp / ".claude-pm"
    (home / "config").mkdir(parents=True)
    memory = {"check_interval_s": 0.2, "term_grace_s": 1}
    (home / "config" / "supervisord.toml").write_text(tomli_w.dumps({"memory": memory}))
    try:
        with limited_v1_group(f"cpm-pod-{os.getpid()}-{short_tmp.name}", LIMIT_MB) as group:
            yield group, home
    except LookupError as exc:
        skip_or_fail(str(exc))


def start_pod(group: Path, home: Path, command: list[str]) -> subprocess.Popen[str]:
    unshare = require_tool("unshare", "a PID namespace of its own, as a container has")
    entry = [unshare, "--pid", "--fork", "--mount-proc", PYTHON, "-m", "supervisord", "run"]
    shim = ["/bin/sh", "-c", JOIN_THEN_EXEC, str(group / "cgroup.procs")]
    env = {**clean_environ(None), "CLAUDE_PM_HOME": str(home)}
    return subprocess.Popen(
        [*shim, *entry, "--max-mb", "auto", "--", *command],
        env=env,
        cwd=home.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def records(home: Path) -> list[dict[str, object]]:
    path = home / "logs" / "memory" / "subprocess-stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_pid_1_stops_a_leaker_near_90_percent_of_the_pod_and_exits_with_its_status(
    pod: tuple[Path, Path],
) -> None:
    group, home = pod
    proc = start_pod(group, home, simagent("--hold-mb", "10", "--rate", "150", "--cap", "420"))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode in (143, 137), output
    assert "simagent pid" in output  # the agent's output is the container's
    (record,) = records(home)
    stats = record["memory_stats"]
    assert isinstance(stats, dict)
    assert record["reason"] == "memory_limit"
    assert 0.9 * LIMIT_MB <= stats["peak_mb"] < LIMIT_MB
    assert int((group / "memory.oom_control").read_text().split("oom_kill ")[1].split()[0]) == 0


def test_pid_1_reaps_orphans_and_passes_sigterm_on(pod: tuple[Path, Path]) -> None:
    group, home = pod
    proc = start_pod(group, home, ["/bin/sh", "-c", ORPHANS])
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while not (init := _namespace_init(proc.pid)) or not _agent_ready(home):
        assert proc.poll() is None, "the pod ended before its agent was ready"
        assert time.monotonic() < deadline, "the pod did not start"
        time.sleep(0.05)
    time.sleep(1.0)  # a few dozen orphaned grandchildren have come and gone meanwhile
    lingering = [e for e in procfs.scan().values() if e.ppid == init and e.zombie]
    assert len(lingering) <= 2, lingering  # reaped as they end (one may be ending now)
    os.kill(init, signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert "got TERM" in output
    assert proc.returncode == 143, output
    (record,) = records(home)
    assert record["exit_code"] == 143
    assert record["reason"] == "exited"


def _namespace_init(unshare_pid: int) -> int | None:
    """The host pid of the namespace's PID 1: unshare --fork's child."""
    children = procfs.children_of(unshare_pid)
    return children[0] if children else None


def _agent_ready(home: Path) -> bool:
    logs = home / "logs" / "agents"
    return logs.is_dir() and any("ready" in p.read_text() for p in logs.glob("*.log"))
