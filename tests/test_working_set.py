"""metric = "auto": an agent in a memory cgroup is charged the group's working set.

The working set is usage less the inactive file cache, the kubelet's figure (v1:
``memory.usage_in_bytes - total_inactive_file``, v2: ``memory.current - inactive_file``).
The parsing is tested on files laid out like each version's; the rest with real processes,
a real v1 memory hierarchy and real daemons. Every process and cgroup made here is removed,
even when a test fails. The measured figures go to stderr (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.control.client import AsyncClient
from supervisord.core.units import MIB
from supervisord.host.cgroup.base import AgentCgroup, CgroupManager
from supervisord.host.cgroup.v1 import V1AgentCgroup
from supervisord.host.cgroup.v2 import V2AgentCgroup
from tests.cgroup_helpers import kill_group, shim_command
from tests.conftest import (
    PYTHON,
    DaemonProcess,
    agent_script,
    alive,
    skip_or_fail,
    wait_output,
    write_config,
)
from tests.test_cgroup import v1  # noqa: F401 (a fixture)

pytestmark = pytest.mark.anyio
V1_MOUNT = Path("/sys/fs/cgroup/memory")
PAGE = os.sysconf("SC_PAGE_SIZE")
needs_v1 = pytest.mark.skipif(
    not V1_MOUNT.is_dir(),
    reason=f"no cgroup v1 memory hierarchy at {V1_MOUNT} (these tests need a v1 machine)",
)
# Above the RSS sum of 1,000 sleeps (~1.8 GB): whatever the metric, no threshold ends them.
ROOMY = {"warning_mb": 3000, "critical_mb": 3500, "max_mb": 4000}


def report(text: str) -> None:
    sys.stderr.write(f"\n[working set] {text}\n")


def kernel_working_set(group: Path) -> tuple[int, int]:
    """(usage, total_inactive_file) of a v1 group, read here independently of the code."""
    usage = int((group / "memory.usage_in_bytes").read_text())
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    return usage, int(stat["total_inactive_file"])


def rss_sum(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone meanwhile
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


# -- parsing, on files laid out like cgroupfs ---------------------------------------------------

V1_STAT = (
    "cache 9000000\nrss 1000\ninactive_anon 4096\nactive_anon 8192\n"
    "inactive_file 1048576\nactive_file 2097152\nhierarchical_memory_limit 9223372036854771712\n"
    "total_cache 9000000\ntotal_inactive_anon 4096\ntotal_inactive_file 31457280\n"
    "total_active_file 2097152\ntotal_unevictable 0\n"
)
V2_STAT = (
    "anon 1000\nfile 9000000\nkernel 4096\ninactive_anon 4096\nactive_anon 8192\n"
    "inactive_file 31457280\nactive_file 2097152\nunevictable 0\nworkingset_refault_file 3\n"
)


def _group(cls: type[AgentCgroup], path: Path, usage: int, stat: str) -> AgentCgroup:
    path.mkdir()
    (path / cls.usage_file).write_text(f"{usage}\n")
    (path / "memory.stat").write_text(stat)
    return cls(path, "x", "/x")


@pytest.mark.parametrize("cls", [V1AgentCgroup, V2AgentCgroup], ids=["v1", "v2"])
def test_working_set_is_usage_less_the_inactive_file_cache(
    tmp_path: Path, cls: type[AgentCgroup]
) -> None:
    # v1 subtracts total_inactive_file (30 MiB here), not the group's own inactive_file.
    group = _group(cls, tmp_path / "g", 100 * MIB, V1_STAT if cls.version == 1 else V2_STAT)
    try:
        assert group.working_set_bytes() == 70 * MIB
        assert group.working_set_bytes(usage=40 * MIB) == 10 * MIB
        # Both files stay open and are read again: new contents, same descriptors.
        (group.path / cls.usage_file).write_text(f"{20 * MIB}\n")
        assert group.working_set_bytes() == 0  # clamped: cache above usage is a race, not < 0
        key = cls.inactive_file_key.decode()
        (group.path / "memory.stat").write_text(f"{key} {5 * MIB}\nanon 1\n")  # first line
        assert group.working_set_bytes() == 15 * MIB
        (group.path / "memory.stat").write_text("anon 1\nfile 2\n")
        assert group.working_set_bytes() == 20 * MIB  # no figure: all of usage counts
        # A memory.stat longer than one read: the key past the first 16 KB is still found.
        filler = "".join(f"padding_{n} {n}\n" for n in range(2000))
        (group.path / "memory.stat").write_text(f"{filler}{key} {MIB}\n")
        assert group.working_set_bytes() == 19 * MIB
    finally:
        group.close()
    assert (group._usage_fd, group._stat_fd) == (-1, -1)


# -- a real v1 group ------------------------------------------------------------------------------

# 50 MB anonymous, then a 64 MB file read once into the page cache, so its pages are charged
# to this group and sit on the inactive list (written, synced and dropped first: the writer's
# pages would otherwise be charged at write time and marked accessed).
CACHER = """
import os, sys, time
keep = bytearray(50 << 20)
keep[::4096] = b"\\1" * len(range(0, len(keep), 4096))
with open(sys.argv[1], "wb") as f:
    f.write(os.urandom(1 << 20) * 64)
    f.flush()
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
fd = os.open(sys.argv[1], os.O_RDONLY)
buf = bytearray(1 << 20)
while os.readv(fd, [buf]):
    pass
print("ready", flush=True)
time.sleep(120)
"""


@needs_v1
def test_v1_working_set_matches_the_kernel_files(
    v1: CgroupManager,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    group = v1.create(f"test_{secrets.token_hex(6)}", 1024 * MIB)
    command = shim_command(group, [PYTHON, "-c", CACHER, str(tmp_path / "cached")])
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # bounded: pytest's timeout
        usage0, inactive0 = kernel_working_set(group.path)
        working_set = group.working_set_bytes()
        usage1, inactive1 = kernel_working_set(group.path)
        report(
            f"v1 group: usage {usage1 / MIB:.1f} MiB, total_inactive_file "
            f"{inactive1 / MIB:.1f} MiB, working set {working_set / MIB:.1f} MiB"
        )
        # The group moves a little between reads (the idle interpreter, kernel objects).
        low = min(usage0 - inactive0, usage1 - inactive1) - 2 * PAGE
        high = max(usage0 - inactive0, usage1 - inactive1) + 2 * PAGE
        assert low <= working_set <= high
        assert inactive1 >= 32 * MIB  # most of the file read once
        assert working_set < usage1 - 32 * MIB
        assert working_set >= 50 * MIB  # the anonymous memory is all in it
    finally:
        kill_group(group)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        assert group.remove(timeout_s=5)


# -- through a real daemon ------------------------------------------------------------------------


@pytest.fixture
def start_daemon(short_tmp: Path) -> Iterator[Any]:
    """``start(memory, **sections)``: a daemon for this test's config, stopped at the end
    (which ends any agent still running, and the whole tree of each)."""
    started: list[DaemonProcess] = []

    def start(memory: dict[str, Any], **sections: Any) -> DaemonProcess:
        home = Home(short_tmp / ".claude-pm")
        write_config(home, memory, **sections)
        started.append(DaemonProcess(home).start())
        return started[-1]

    try:
        yield start
    finally:
        for daemon in started:
            daemon.close()


async def _launch_sleepers(
    client: AsyncClient, home: Home, count: int
) -> tuple[str, dict[str, Any]]:
    """The sleepers agent, once the daemon's own sample counts it and every sleep."""
    command = agent_script("sleepers", "--count", str(count), "--seconds", "120")
    sid = str((await client.launch("sleepers", command))["subprocess_id"])
    await wait_output(home, sid, f"ready {count}", timeout_s=30)
    with anyio.fail_after(30):
        while (stats := await client.stats(sid))["process_count"] < count + 1:
            await anyio.sleep(0.1)
    return sid, stats


async def _stop(client: AsyncClient, sid: str, pids: list[int]) -> None:
    with anyio.fail_after(20):
        await client.stop(sid, grace_s=2)
    assert [pid for pid in pids if alive(pid)] == []


async def _in_force(client: AsyncClient) -> dict[str, Any]:
    cgroups: dict[str, Any] = (await client.status())["cgroups"]
    if cgroups["in_force"] != "v1":
        skip_or_fail(f"needs the v1 memory backstop: {cgroups['reason']}")
    return cgroups


@needs_v1
async def test_1000_sleeps_are_charged_their_cgroup_working_set(start_daemon: Any) -> None:
    daemon: DaemonProcess = start_daemon(ROOMY)
    async with daemon.async_client() as client:
        cgroups = await _in_force(client)
        sid, stats = await _launch_sleepers(client, daemon.home, 1000)
        group = Path(cgroups["path"]) / f"agent-{sid}"
        usage, inactive = kernel_working_set(group)
        stats = await client.stats(sid)
        rss = rss_sum(stats["tree_pids"])
        kernel_mb = (usage - inactive) / MIB
        report(
            f"1,000 sleeps: daemon {stats['current_mb']:.1f} MB, kernel working set "
            f"{kernel_mb:.1f} MiB (usage {usage / MIB:.1f}, inactive file "
            f"{inactive / MIB:.1f}), RSS sum {rss / MIB:.1f} MiB ({rss / (usage - inactive):.1f}x)"
        )
        assert abs(stats["current_mb"] - kernel_mb) <= 0.2 * kernel_mb
        assert rss > 3 * (usage - inactive)
        assert stats["level"] == "OK"
        # stats shows the three counts side by side; PSS only when asked for.
        assert stats["measured"] == "working_set"
        assert abs(stats["working_set_mb"] - kernel_mb) <= 0.2 * kernel_mb
        assert abs(stats["rss_mb"] - rss / MIB) <= 0.1 * rss / MIB
        assert "pss_mb" not in stats
        with_pss = await client.stats(sid, pss=True)
        report(f"1,000 sleeps: PSS {with_pss['pss_mb']:.1f} MB")
        # Shared pages divided among the sharers: between the cgroup's count and the RSS sum.
        assert 0.25 * kernel_mb < with_pss["pss_mb"] < with_pss["rss_mb"] / 3
        shown = _cli(daemon.home, "stats", sid, "--pss")
        line = next(x for x in shown.splitlines() if x.startswith("memory: "))
        assert line.startswith("memory: rss "), line
        assert "| working set " in line
        assert "| pss " in line
        assert line.endswith("(current_mb is the working set)"), line
        await _stop(client, sid, stats["tree_pids"])


def _cli(home: Home, *args: str) -> str:
    env = {**os.environ, "CLAUDE_PM_HOME": str(home.root)}
    done = subprocess.run(
        [PYTHON, "-m", "supervisord", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_v1
@pytest.mark.parametrize(
    ("metric", "cgroup"),
    [("rss", {"mode": "auto", "hard_margin_pct": 50}), ("auto", {"mode": "off"})],
    ids=["rss-with-cgroup", "auto-without-cgroup"],
)
async def test_the_rss_sum_where_selected_or_without_a_cgroup(
    start_daemon: Any, metric: str, cgroup: dict[str, Any]
) -> None:
    daemon: DaemonProcess = start_daemon({**ROOMY, "metric": metric}, cgroup=cgroup)
    async with daemon.async_client() as client:
        cgroups = (await client.status())["cgroups"]
        if cgroup["mode"] == "off":
            assert cgroups["in_force"] == "off", cgroups
        else:
            cgroups = await _in_force(client)
        sid, stats = await _launch_sleepers(client, daemon.home, 200)
        rss_mb = rss_sum(stats["tree_pids"]) / MIB
        report(
            f"{metric}, cgroup {cgroups['in_force']}: daemon {stats['current_mb']:.1f} MB, "
            f"RSS sum {rss_mb:.1f} MiB"
        )
        assert abs(stats["current_mb"] - rss_mb) <= 0.1 * rss_mb
        if cgroups["in_force"] != "off":
            usage, inactive = kernel_working_set(Path(cgroups["path"]) / f"agent-{sid}")
            assert stats["current_mb"] > 3 * (usage - inactive) / MIB
        await _stop(client, sid, stats["tree_pids"])
