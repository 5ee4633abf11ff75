"""The kernel backstop (supervisord.host.cgroup): real cgroup v1 tests with real processes, the
v2 file protocol against a directory laid out like cgroupfs, and detection.

The v1 tests need root and the v1 memory hierarchy at /sys/fs/cgroup/memory; they skip only
when that directory does not exist. Every test removes its cgroups and kills its processes
(through pidfds taken at start, so a reused pid is never hit), even when it fails.

Measured figures (docs/cgroups.md) go to stderr:
``pytest -q -s tests/test_cgroup.py -k "hog or threshold or create_sets"`` shows them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from supervisord.config.cgroup import CgroupSettings
from supervisord.core.errors import CgroupError, CgroupUnavailable, ConfigError
from supervisord.core.units import MIB, mb_to_bytes
from supervisord.host.cgroup import base as cgroup_base
from supervisord.host.cgroup.base import SHIM_FAILED_EXIT, AgentCgroup, CgroupManager, drain
from supervisord.host.cgroup.detect import detect, group_name
from tests.cgroup_helpers import kill_group, shim_command

V1_MOUNT = Path("/sys/fs/cgroup/memory")
AGENTS = Path(__file__).parent / "agents"
PYTHON = sys.executable
HOG = [PYTHON, "-m", "supervisord.simagent", "--hold-mb", "10", "--rate", "1000", "--cap", "600"]
MAX_MB = 300
SETTINGS = CgroupSettings(hard_margin_pct=10)
CEILING = SETTINGS.ceiling_bytes(MAX_MB)

pytestmark = pytest.mark.anyio

needs_v1 = pytest.mark.skipif(
    not V1_MOUNT.is_dir(),
    reason=f"no cgroup v1 memory hierarchy at {V1_MOUNT} (these tests need a v1 machine)",
)


def report(text: str) -> None:
    """Measured figures, visible with ``pytest -s``."""
    sys.stderr.write(f"\n[cgroup] {text}\n")


# -- processes and groups that are always cleaned up -------------------------------------------


class Processes:
    """Every process a test starts, held by pidfd so teardown kills exactly those."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.pidfds: dict[int, int] = {}

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = None,
        env: dict[str, str] | None = None,
        as_nobody: bool = False,
    ) -> subprocess.Popen[bytes]:
        nobody = 65534 if as_nobody else None
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            user=nobody,
            group=nobody,
            extra_groups=[] if as_nobody else None,
        )
        self.popens.append(popen)
        self.track(popen.pid)
        return popen

    def track(self, pid: int) -> int:
        fd = os.pidfd_open(pid)
        self.pidfds[pid] = fd
        return fd

    def cleanup(self) -> None:
        for fd in self.pidfds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        for popen in self.popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)
        for fd in self.pidfds.values():
            os.close(fd)
        self.pidfds.clear()


@pytest.fixture
def procs() -> Iterator[Processes]:
    processes = Processes()
    try:
        yield processes
    finally:
        processes.cleanup()


def _remove_all(manager: CgroupManager) -> list[str]:
    """Kill and remove every agent group, then the daemon's group; returns what survived."""
    for subprocess_id in manager.agent_ids():
        group = manager.adopt(subprocess_id)
        kill_group(group, timeout_s=5)
        group.remove(timeout_s=5)
    manager.remove(timeout_s=5)
    return [str(manager.path)] if manager.path.exists() else []


@pytest.fixture
def v1() -> Iterator[CgroupManager]:
    name = f"claude-pm-test-{secrets.token_hex(4)}"
    detection = detect(None, "required", group=name)
    manager = detection.manager
    assert manager is not None
    assert manager.version == 1, f"expected v1 on this machine: {detection.reason}"
    try:
        yield manager
    finally:
        assert _remove_all(manager) == [], f"cgroup left behind: {manager.path}"


def _new_id() -> str:
    return f"test_{secrets.token_hex(6)}"


async def _wait_exit(pidfd: int, timeout_s: float = 10.0) -> float:
    """Wait until the process behind ``pidfd`` has ended; returns when (monotonic)."""
    with anyio.fail_after(timeout_s):
        await anyio.wait_readable(pidfd)
    return time.monotonic()


async def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    try:
        with anyio.fail_after(timeout_s):
            while not predicate():
                await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


# -- settings and detection ---------------------------------------------------------------------


def test_settings_parse_validate_and_ceiling() -> None:
    settings = CgroupSettings.from_table({"mode": "required", "hard_margin_pct": 25, "root": "/x"})
    assert settings == CgroupSettings(mode="required", hard_margin_pct=25.0, root="/x")
    assert CgroupSettings.from_table({}) == CgroupSettings()
    # 300 MB + 10% = 330 MiB exactly, already page-aligned.
    assert CEILING == 330 * MIB
    assert CgroupSettings(hard_margin_pct=0).ceiling_bytes(1.0001) % os.sysconf("SC_PAGE_SIZE") == 0
    for table, key in (
        ({"mode": "on"}, "cgroup.mode = 'on'"),
        ({"hard_margin_pct": -1}, "cgroup.hard_margin_pct = -1"),
        ({"hard_margin_pct": True}, "cgroup.hard_margin_pct = True"),
        ({"root": "relative/path"}, "cgroup.root = 'relative/path'"),
        ({"limit": 1}, "unknown key 'limit'"),
    ):
        with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
            CgroupSettings.from_table(table)


def test_group_name_is_per_home() -> None:
    assert group_name("/srv/a/.claude-pm") == group_name("/srv/a/.claude-pm")
    assert group_name("/srv/a/.claude-pm") != group_name("/srv/b/.claude-pm")
    assert group_name("/srv/a/.claude-pm").startswith("claude-pm-")


def test_detect_off_and_unavailable(tmp_path: Path) -> None:
    off = detect(None, "off", group="g")
    assert (off.manager, off.in_force, off.reason) == (None, "off", 'off: [cgroup] mode = "off"')

    # A cgroup2 mount without the memory controller and no v1 memory hierarchy.
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu io pids\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"35 24 0:30 / {unified} rw,nosuid - cgroup2 cgroup2 rw\n"
        "36 24 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    )
    own = tmp_path / "cgroup"
    own.write_text("1:cpu:/\n0::/\n")
    found = detect(None, "auto", group="g", mountinfo=str(mountinfo), proc_cgroup=str(own))
    assert found.manager is None
    assert found.reason == (
        f"off: cgroup v2 at {unified} has no memory controller "
        "and no v1 memory hierarchy is mounted"
    )
    assert found.as_dict() == {
        "mode": "auto",
        "in_force": "off",
        "path": None,
        "reason": found.reason,
    }
    with pytest.raises(CgroupUnavailable, match='mode = "required", but cgroup v2 at'):
        detect(None, "required", group="g", mountinfo=str(mountinfo), proc_cgroup=str(own))

    outside = detect("/srv/x", "auto", group="g", mountinfo=str(mountinfo), proc_cgroup=str(own))
    assert outside.reason.startswith("off: [cgroup] root /srv/x is not inside a cgroup v2")

    missing = detect(None, "auto", group="g", mountinfo=str(tmp_path / "nope"))
    assert missing.reason == f"off: cannot read {tmp_path / 'nope'} (cgroups need Linux)"


@needs_v1
def test_detect_on_this_machine_says_v1_and_why() -> None:
    """This machine: v2 mounted without memory, v1 memory mounted: v1, and the reason says so."""
    name = f"claude-pm-test-{secrets.token_hex(4)}"
    detection = detect(None, "auto", group=name)
    manager = detection.manager
    assert manager is not None
    try:
        own = next(
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":")[1].split(",")
        )
        expected = V1_MOUNT / own.lstrip("/") / name
        assert manager.path == expected
        assert detection.in_force == "v1"
        assert detection.reason.startswith(f"cgroup v1 memory controller at {expected}")
        unified = Path("/sys/fs/cgroup/unified")
        if unified.is_dir() and "memory" not in (unified / "cgroup.controllers").read_text():
            assert f"(cgroup v2 at {unified} has no memory controller)" in detection.reason
    finally:
        assert manager.remove()


# -- cgroup v1, real --------------------------------------------------------------------------


@needs_v1
def test_v1_create_sets_ceiling_and_disables_the_oom_killer(v1: CgroupManager) -> None:
    group = v1.create(_new_id(), CEILING)
    assert group.path.parent == v1.path
    assert group.limit_bytes() == CEILING
    memsw = group.path / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # Swap does not extend the ceiling.
        assert int(memsw.read_text()) == CEILING
    oom = (group.path / "memory.oom_control").read_text()
    assert "oom_kill_disable 1" in oom
    # Raising and lowering keep limit <= memsw in between (the kernel refuses otherwise).
    group.set_limit(500 * MIB)
    assert group.limit_bytes() == 500 * MIB
    group.set_limit(200 * MIB)
    assert group.limit_bytes() == 200 * MIB
    assert group.usage_bytes() == 0
    assert group.pids() == []
    assert group.empty()
    assert not group.contains(os.getpid())
    # The sampler's fast path: one pread of a kept-open file.
    start = time.perf_counter()
    for _ in range(2000):
        group.usage_bytes()
    per_read_us = (time.perf_counter() - start) / 2000 * 1e6
    report(f"usage_bytes(): {per_read_us:.1f} us per read")
    assert per_read_us < 100
    assert group.remove()
    assert not group.path.exists()
    # What a launch adds: create a group with its ceiling, and remove it at the end.
    start = time.perf_counter()
    for _ in range(50):
        assert v1.create(_new_id(), CEILING).remove()
    report(f"create() + remove(): {(time.perf_counter() - start) / 50 * 1e6:.0f} us per group")


@needs_v1
def test_v1_placement_happens_before_exec(v1: CgroupManager, procs: Processes) -> None:
    group = v1.create(_new_id(), CEILING)
    show = [PYTHON, "-c", "import os; print(os.getpid()); print(open('/proc/self/cgroup').read())"]
    popen = procs.start(shim_command(group, show), stdout=subprocess.PIPE)
    out, _ = popen.communicate(timeout=10)
    lines = out.decode().splitlines()
    assert int(lines[0]) == popen.pid  # The shim exec'd the agent: same pid, no extra process.
    assert f":memory:{group.proc_path}\n" in out.decode()

    # Through a descriptor the daemon opened: works after dropping to another user.
    # (A shell: the virtualenv's python may not be readable by that user.)
    script = "echo $$; readlink /proc/self/fd/0; id -u; cat /proc/self/cgroup"
    placement = group.placement(["/bin/sh", "-c", script])
    try:
        popen = procs.start(
            placement.argv,
            stdin=placement.stdin,
            stdout=subprocess.PIPE,
            as_nobody=True,
        )
    finally:
        placement.close()
    out, _ = popen.communicate(timeout=10)
    assert popen.returncode == 0, out
    pid, stdin, uid, *cgroups = out.decode().splitlines()
    assert (int(pid), stdin, uid) == (popen.pid, "/dev/null", "65534")
    assert any(line.endswith(f":memory:{group.proc_path}") for line in cgroups)

    # Where joining fails, the agent never runs (outside the group) and the exit says why.
    refused = procs.start(
        shim_command(group, ["/bin/true"]), as_nobody=True, stderr=subprocess.DEVNULL
    )
    assert refused.wait(timeout=10) == SHIM_FAILED_EXIT
    assert group.remove()


@needs_v1
async def test_v1_hog_never_exceeds_ceiling_and_oom_eventfd_kills_tree(
    v1: CgroupManager, procs: Processes
) -> None:
    """A hog growing 1 GB/s against max_mb = 300, margin 10%: the kernel holds it at 330 MiB,
    pauses it there (oom_kill_disable), the OOM eventfd fires and kill() ends the tree."""
    group = v1.create(_new_id(), CEILING)
    oom_fd = group.oom_eventfd()
    try:
        started = time.monotonic()
        hog = procs.start(shim_command(group, HOG))
        with anyio.fail_after(15):
            await anyio.wait_readable(oom_fd)
        at_oom = time.monotonic()
        assert drain(oom_fd) >= 1
        assert group.under_oom()
        usage = group.usage_bytes()
        assert usage <= CEILING
        assert hog.pid in group.pids()
        killed = await anyio.to_thread.run_sync(kill_group, group)
        gone = time.monotonic()
        assert killed
        assert hog.wait(timeout=5) == -signal.SIGKILL
        assert group.oom_killed()
        peak = group.peak_bytes()
        assert peak is not None
        assert peak <= CEILING, f"charged {peak / MIB:.1f} MiB over the {CEILING / MIB} ceiling"
        report(
            f"hog 1 GB/s, ceiling {CEILING / MIB:.0f} MiB: OOM event {at_oom - started:.2f} s "
            f"after launch at {usage / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, "
            f"tree gone {(gone - at_oom) * 1000:.0f} ms after the event"
        )
    finally:
        os.close(oom_fd)
    assert group.remove()
    assert not group.path.exists()


class UsageObserver(threading.Thread):
    """Reads usage in a tight loop, each reading as (began, ended, bytes), until one reaches
    ``threshold``.

    The hog's usage only grows until it is signalled, so a reading under the threshold that
    ended before the signal was taken before the kernel's crossing: the crossing came after
    its start (:meth:`last_under_before`), whether or not the thread ran again afterwards."""

    def __init__(self, group: AgentCgroup, threshold: int) -> None:
        super().__init__(daemon=True)
        self.group = group
        self.threshold = threshold
        self.readings: list[tuple[float, float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 15
        while not self.stop.is_set() and time.monotonic() < deadline:
            began = time.monotonic()
            usage = self.group.usage_bytes()
            self.readings.append((began, time.monotonic(), usage))
            if usage >= self.threshold:
                return
            time.sleep(0.0002)

    def last_under_before(self, moment: float) -> float | None:
        """When the last reading under the threshold that ended before ``moment`` began."""
        under = [b for b, e, usage in self.readings if usage < self.threshold and e < moment]
        return max(under, default=None)

    def first_over(self) -> float | None:
        """When the first reading at or over the threshold ended (after the crossing)."""
        return next((e for _, e, usage in self.readings if usage >= self.threshold), None)


@needs_v1
async def test_v1_threshold_eventfd_wakes_in_time_for_sigterm(
    v1: CgroupManager, procs: Processes
) -> None:
    """The usage-threshold eventfd wakes the loop so that SIGTERM goes out within 50 ms of
    usage crossing max_mb, with no polling by the daemon. Measured from the observer's last
    reading under the threshold, which precedes the kernel's crossing: the figure bounds the
    true latency from above, with no fallback to the wake-up itself."""
    group = v1.create(_new_id(), CEILING)
    threshold = mb_to_bytes(MAX_MB)
    term_fd = group.threshold_eventfd(threshold)
    observer = UsageObserver(group, threshold)
    try:
        observer.start()
        hog = procs.start(shim_command(group, HOG))
        hog_fd = procs.pidfds[hog.pid]
        with anyio.fail_after(15):
            await anyio.wait_readable(term_fd)
        woke = time.monotonic()
        usage_at_wake = group.usage_bytes()
        sent = group.signal_all(signal.SIGTERM)
        sent_at = time.monotonic()
        assert sent == [hog.pid]
        assert drain(term_fd) >= 1
        await _wait_exit(hog_fd)
        observer.stop.set()
        observer.join(timeout=5)
        assert not observer.is_alive()
        # Started before the hog, the observer read usage under the threshold at least once
        # before the signal: the reference always exists.
        below_at = observer.last_under_before(sent_at)
        assert below_at is not None, observer.readings[:3]
        latency_ms = (sent_at - below_at) * 1000
        over_at = observer.first_over()
        seen = (
            "the observer did not run between the crossing and the hog's end"
            if over_at is None
            else f"SIGTERM {(sent_at - over_at) * 1000:.2f} ms after the observer saw it over"
        )
        report(
            f"threshold {MAX_MB} MiB at 1 GB/s: eventfd woke {(woke - below_at) * 1000:.2f} "
            f"ms and SIGTERM went out {latency_ms:.2f} ms after the last reading under it "
            f"({seen}); usage at wake {usage_at_wake / MIB:.1f} MiB"
        )
        assert latency_ms < 50
        assert usage_at_wake >= threshold  # A real crossing, not a spurious wake-up.
        assert hog.wait(timeout=5) == -signal.SIGTERM
        peak = group.peak_bytes()
        assert peak is not None
        assert peak <= CEILING
    finally:
        observer.stop.set()
        os.close(term_fd)
    assert await anyio.to_thread.run_sync(kill_group, group)
    assert group.remove()


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _rss_anon_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for {pid}")


@needs_v1
async def test_v1_escaped_grandchild_is_counted_and_killed(
    v1: CgroupManager, procs: Processes, tmp_path: Path
) -> None:
    """A grandchild that setsid-escapes the agent's tree is still in the agent's cgroup: its
    memory is charged there and kill() ends it with the rest; then the group is removed."""
    group = v1.create(_new_id(), CEILING)
    pidfile = tmp_path / "escaped"
    agent = procs.start(
        shim_command(
            group,
            [
                PYTHON,
                str(AGENTS / "escaper.py"),
                "--leak-rate",
                "400",
                "--leak-cap",
                "80",
                "--delay",
                "0.1",
                "--pidfile",
                str(pidfile),
            ],
        ),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    await _wait_for(pidfile.exists, 10, "the escaper's pidfile")
    escaped = int(pidfile.read_text())
    escaped_fd = procs.track(escaped)
    # It really escaped: not the agent's child, and in a session of its own.
    ppid, session = _stat_fields(escaped)[1], _stat_fields(escaped)[3]
    assert int(ppid) != agent.pid
    assert int(session) != int(_stat_fields(agent.pid)[3])
    # ... and the kernel still counts it with the agent.
    assert set(group.pids()) == {agent.pid, escaped}
    assert group.contains(escaped)
    # Its private memory is charged here (shared library pages stay with whoever first
    # touched them, so compare anonymous memory, not RSS).
    await _wait_for(lambda: _rss_anon_bytes(escaped) >= 75 * MIB, 10, "the leak to grow")
    assert group.usage_bytes() >= _rss_anon_bytes(escaped) >= 75 * MIB
    killed = await anyio.to_thread.run_sync(kill_group, group)
    assert killed
    await _wait_exit(escaped_fd, 5)
    assert agent.wait(timeout=5) == -signal.SIGKILL
    assert group.empty()
    assert not group.oom_killed()  # Killed by us, not for hitting the ceiling.
    assert group.remove()
    assert not group.path.exists()


@needs_v1
async def test_v1_remove_waits_for_members_and_leftovers_are_sorted(
    v1: CgroupManager, procs: Processes
) -> None:
    busy_id, empty_id, known_id = _new_id(), _new_id(), _new_id()
    busy = v1.create(busy_id, CEILING)
    v1.create(empty_id, CEILING).close()
    v1.create(known_id, CEILING).close()
    sleeper = procs.start(shim_command(busy, ["sleep", "60"]))
    await _wait_for(lambda: sleeper.pid in busy.pids(), 5, "the sleeper to join")
    assert not busy.remove(timeout_s=0.05)  # EBUSY while a member lives; the group stays usable.
    assert busy.path.is_dir()
    assert busy.usage_bytes() > 0

    # A restarted daemon (same home, same group name) sorts out what its predecessor left.
    restarted = detect(None, "required", group=v1.path.name).manager
    assert restarted is not None
    assert restarted.path == v1.path
    leftovers = restarted.cleanup_leftovers(known_ids=[known_id])
    assert leftovers.removed == (empty_id,)
    assert leftovers.populated == (busy_id,)
    assert sorted(restarted.agent_ids()) == sorted([busy_id, known_id])
    adopted = restarted.adopt(busy_id)
    assert adopted.pids() == [sleeper.pid]
    assert not restarted.remove()  # Agent groups remain in it.
    assert await anyio.to_thread.run_sync(kill_group, adopted)
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert adopted.remove()
    busy.close()


@needs_v1
def test_v1_create_refuses_an_occupied_leftover(v1: CgroupManager, procs: Processes) -> None:
    subprocess_id = _new_id()
    group = v1.create(subprocess_id, CEILING)
    sleeper = procs.start(shim_command(group, ["sleep", "60"]))
    deadline = time.monotonic() + 5
    while sleeper.pid not in group.pids() and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(CgroupError, match="exists and has processes"):
        v1.create(subprocess_id, CEILING)
    assert kill_group(group)
    # An empty leftover of the same id is reused, with its ceiling set anew.
    again = v1.create(subprocess_id, 100 * MIB)
    assert again.limit_bytes() == 100 * MIB
    group.close()
    assert again.remove()


# -- cgroup v2 -----------------------------------------------------------------------------


def _cgroup2_mount_points() -> list[Path]:
    return [
        Path(line.split()[4])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if " - cgroup2 " in line
    ]


# Run in a private mount namespace: the cgroup2 mounts it inherited are unmounted there (never
# here), a fresh one is mounted on $1, and the rest of the arguments run against that.
_PRIVATE_CGROUP2 = (
    "set -eu; for point in $(awk '/ - cgroup2 /{print $5}' /proc/self/mountinfo); do "
    'umount -l "$point"; done; mount -t cgroup2 none "$1" || exit 77; shift; exec "$@"'
)
_PRIVATE_CGROUP2_REFUSED = 77
# What the daemon would do at start, in that namespace; it removes the group it created.
_DETECT_AND_REMOVE = """
import json, sys
from supervisord.host.cgroup.detect import detect
detection = detect(None, "auto", group=sys.argv[1])
manager = detection.manager
removed = manager is None or manager.remove()
path = None if manager is None else str(manager.path)
print(json.dumps({"in_force": detection.in_force, "reason": detection.reason, "path": path,
                  "removed": removed}))
"""


def _detect_in_a_private_cgroup2_mount(mount: Path, group: str) -> dict[str, Any] | str:
    """Detection as a child sees it with a fresh cgroup2 mount on ``mount`` as its only one;
    a string says why the kernel or this machine refuses such a mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "no unshare(1)"
    command = [unshare, "--mount", "--propagation", "private"]
    probe = subprocess.run([*command, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --mount: {probe.stderr.strip()}"
    in_namespace = ["sh", "-c", _PRIVATE_CGROUP2, "sh", str(mount)]
    done = subprocess.run(
        [*command, *in_namespace, PYTHON, "-c", _DETECT_AND_REMOVE, group],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == _PRIVATE_CGROUP2_REFUSED:
        return f"mount -t cgroup2: {done.stderr.strip()}"
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _assert_detection_of_a_cgroup2_mount(tmp_path: Path) -> None:
    """Detection names a cgroup2 mount it cannot use: one really mounted (in a private mount
    namespace) where the kernel allows it, else one laid out in files."""
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    group = f"claude-pm-test-{secrets.token_hex(4)}"
    found = _detect_in_a_private_cgroup2_mount(mount, group)
    if isinstance(found, dict):
        report(f"a fresh cgroup2 mount in a private namespace: {found['reason']}")
        assert found["removed"] is True, found
        if found["in_force"] == "v2":  # its memory controller is free on this machine
            assert found["reason"].startswith(f"cgroup v2 memory controller at {mount}/"), found
            return
        assert f"cgroup v2 at {mount} has no memory controller" in found["reason"], found
        if found["in_force"] == "v1":
            assert found["reason"].startswith("cgroup v1 memory controller at "), found
            assert not Path(found["path"]).exists(), found
        return
    # The file protocol instead: a cgroup2 mount as mountinfo and cgroupfs show it.
    report(f"no cgroup2 mount possible here ({found}): detection over files instead")
    (mount / "cgroup.controllers").write_text("cpu io pids\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"35 24 0:30 / {mount} rw,nosuid - cgroup2 cgroup2 rw\n")
    own = tmp_path / "cgroup"
    own.write_text("0::/\n")
    detection = detect(None, "auto", group=group, mountinfo=str(mountinfo), proc_cgroup=str(own))
    assert detection.manager is None
    assert detection.reason == (
        f"off: cgroup v2 at {mount} has no memory controller and no v1 memory hierarchy is mounted"
    )


def test_v2_detection_of_a_private_cgroup2_mount(tmp_path: Path) -> None:
    """Whatever the host mounts: detection finds a cgroup2 mount and says why it is not used."""
    _assert_detection_of_a_cgroup2_mount(tmp_path)


def test_v2_real_hierarchy_or_why_not(procs: Processes, tmp_path: Path) -> None:
    """On a machine where a cgroup2 hierarchy with the memory controller is delegated to us,
    hold a real hog at its ceiling; elsewhere (this machine) detection must say why not."""
    name = f"claude-pm-test-{secrets.token_hex(4)}"
    detection = detect(None, "auto", group=name)
    manager = detection.manager
    if manager is None or manager.version != 2:
        if manager is not None:
            assert manager.remove()
        mounted = _cgroup2_mount_points()
        if mounted:
            assert f"cgroup v2 at {mounted[0]}" in detection.reason, detection.reason
        else:  # No cgroup2 here: one of our own, so the v2 side is still checked.
            _assert_detection_of_a_cgroup2_mount(tmp_path)
        return
    try:
        group = manager.create(_new_id(), CEILING)
        oom_fd = group.oom_eventfd()
        try:
            hog = procs.start(shim_command(group, HOG))
            assert hog.wait(timeout=15) == -signal.SIGKILL  # memory.oom.group kills the tree.
            assert group.oom_killed()
            peak = group.peak_bytes()
            assert peak is None or peak <= CEILING
            assert drain(oom_fd) >= 1
        finally:
            os.close(oom_fd)
        assert kill_group(group)
        assert group.remove()
    finally:
        assert _remove_all(manager) == []


class FakeCgroupfs:
    """A directory laid out like a cgroup2 mount, with just enough kernel behaviour: mkdir
    creates the control files, cgroup.procs moves a pid, cgroup.kill empties the group, and
    the no-internal-processes rule refuses +memory where processes live. Records every write
    the code under test performs, relative to the mount."""

    MEMORY_FILES: ClassVar[dict[str, str]] = {
        "memory.max": "max\n",
        "memory.high": "max\n",
        "memory.current": "0\n",
        "memory.peak": "0\n",
        "memory.oom.group": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.stat": "anon 0\nfile 0\ninactive_file 0\n",
    }

    def __init__(self, mount: Path, daemon_group: str) -> None:
        self.mount = mount
        self.writes: list[tuple[str, str]] = []
        self._write = cgroup_base.write_file
        mount.mkdir()
        self._populate(mount, "cpu io memory pids")
        (mount / "cgroup.subtree_control").write_text("memory pids\n")
        self.daemon = mount / daemon_group
        self.daemon.mkdir(parents=True)
        self._populate(self.daemon, "memory pids")
        (self.daemon / "cgroup.procs").write_text(f"{os.getpid()}\n")
        (self.daemon / "cgroup.events").write_text("populated 1\nfrozen 0\n")

    def _populate(self, group: Path, controllers: str) -> None:
        files = {
            "cgroup.controllers": f"{controllers}\n",
            "cgroup.subtree_control": "\n",
            "cgroup.procs": "",
            "cgroup.events": "populated 0\nfrozen 0\n",
            "cgroup.kill": "",
        }
        if "memory" in controllers.split():
            files.update(self.MEMORY_FILES)
        for name, text in files.items():
            (group / name).write_text(text)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        enabled = (path.parent / "cgroup.subtree_control").read_text().split()
        self._populate(path, " ".join(enabled))

    def rmdir(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        shutil.rmtree(path)

    def write(self, path: Path, text: str) -> None:
        self.writes.append((str(path.relative_to(self.mount)), text))
        group, name = path.parent, path.name
        if name == "cgroup.subtree_control":
            if group != self.mount and (group / "cgroup.procs").read_text().split():
                raise OSError(errno.EBUSY, "Device or resource busy", str(path))
            words = set(path.read_text().split()) | {text.lstrip("+")}
            path.write_text(" ".join(sorted(words)) + "\n")
        elif name == "cgroup.procs":
            for procs in self.mount.rglob("cgroup.procs"):
                pids = [p for p in procs.read_text().split() if p != text]
                self.set_procs(procs.parent, pids)
            self.set_procs(group, [*(group / "cgroup.procs").read_text().split(), text])
        elif name == "cgroup.kill":
            self.set_procs(group, [])
        else:
            self._write(path, text)

    def set_procs(self, group: Path, pids: list[str]) -> None:
        (group / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        (group / "cgroup.events").write_text(f"populated {int(bool(pids))}\nfrozen 0\n")

    def set_memory(self, group: Path, **values: int) -> None:
        path = group / "memory.events"
        events = dict(line.split() for line in path.read_text().splitlines())
        events.update({k: str(v) for k, v in values.items() if k in events})
        path.write_text("".join(f"{k} {v}\n" for k, v in events.items()))


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupfs:
    fs = FakeCgroupfs(tmp_path / "fs", "system.slice/claude-pm.service")
    monkeypatch.setattr(cgroup_base, "write_file", fs.write)
    monkeypatch.setattr(cgroup_base, "make_dir", fs.mkdir)
    monkeypatch.setattr(cgroup_base, "remove_dir", fs.rmdir)
    (tmp_path / "mountinfo").write_text(
        f"30 25 0:26 / {fs.mount} rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    (tmp_path / "cgroup").write_text("0::/system.slice/claude-pm.service\n")
    return fs


def _detect_fake(tmp_path: Path, mode: str = "auto", root: str | None = None) -> CgroupManager:
    detection = detect(
        root,
        "required" if mode == "required" else "auto",
        group="claude-pm-abc",
        mountinfo=str(tmp_path / "mountinfo"),
        proc_cgroup=str(tmp_path / "cgroup"),
    )
    assert detection.manager is not None, detection.reason
    assert detection.in_force == "v2"
    return detection.manager


def test_v2_setup_moves_the_daemon_to_a_leaf_and_enables_memory(
    fake: FakeCgroupfs, tmp_path: Path
) -> None:
    manager = _detect_fake(tmp_path)
    service = "system.slice/claude-pm.service"
    assert manager.path == fake.daemon / "claude-pm-abc"
    assert fake.writes == [
        (f"{service}/cgroup.subtree_control", "+memory"),  # EBUSY: the daemon lives there.
        (f"{service}/claude-pm-abc.daemon/cgroup.procs", str(os.getpid())),
        (f"{service}/cgroup.subtree_control", "+memory"),
        (f"{service}/claude-pm-abc/cgroup.subtree_control", "+memory"),
    ]
    assert manager.reason == (
        f"cgroup v2 memory controller at {manager.path} "
        f"(the daemon moved into {fake.daemon / 'claude-pm-abc.daemon'})"
    )
    # A restart finds it all in place and writes nothing.
    fake.writes.clear()
    assert _detect_fake(tmp_path).path == manager.path
    assert fake.writes == []


def test_v2_setup_refuses_a_group_shared_with_other_processes(
    fake: FakeCgroupfs, tmp_path: Path
) -> None:
    (fake.daemon / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")
    found = detect(
        None,
        "auto",
        group="g",
        mountinfo=str(tmp_path / "mountinfo"),
        proc_cgroup=str(tmp_path / "cgroup"),
    )
    assert found.manager is None
    assert "holds processes" in found.reason
    assert "Delegate=yes" in found.reason
    # With an explicit, delegated root nothing has to move.
    delegated = fake.mount / "delegated"
    fake.mkdir(delegated)
    fake.writes.clear()
    manager = _detect_fake(tmp_path, root=str(delegated))
    assert manager.path == delegated / "claude-pm-abc"
    assert fake.writes == [
        ("delegated/cgroup.subtree_control", "+memory"),
        ("delegated/claude-pm-abc/cgroup.subtree_control", "+memory"),
    ]


async def test_v2_agent_protocol(fake: FakeCgroupfs, tmp_path: Path, procs: Processes) -> None:
    manager = _detect_fake(tmp_path)
    fake.writes.clear()
    group = manager.create("engineer_0123456789ab", CEILING)
    rel = "system.slice/claude-pm.service/claude-pm-abc/agent-engineer_0123456789ab"
    assert group.path == fake.mount / rel
    assert group.proc_path == f"/{rel}"
    assert fake.writes == [(f"{rel}/memory.oom.group", "1"), (f"{rel}/memory.max", str(CEILING))]
    assert group.limit_bytes() == CEILING

    fake.writes.clear()
    group.set_limit(400 * MIB)
    assert fake.writes == [(f"{rel}/memory.max", str(400 * MIB))]

    # Usage comes from the kept-open memory.current.
    (group.path / "memory.current").write_text(f"{123 * MIB}\n")
    assert group.usage_bytes() == 123 * MIB
    assert group.peak_bytes() == 0

    # The threshold is memory.high; the fd wakes when memory.events changes.
    fake.writes.clear()
    term_fd = group.threshold_eventfd(mb_to_bytes(MAX_MB))
    oom_fd = group.oom_eventfd()
    try:
        assert fake.writes == [(f"{rel}/memory.high", str(300 * MIB))]
        assert drain(term_fd) == 0
        fake.set_memory(group.path, high=1)
        with anyio.fail_after(5):
            await anyio.wait_readable(term_fd)
        assert drain(term_fd) >= 1
        assert not group.under_oom()
        assert not group.oom_killed()
        fake.set_memory(group.path, oom=1, oom_kill=1, oom_group_kill=1)
        with anyio.fail_after(5):
            await anyio.wait_readable(oom_fd)
        assert group.under_oom()
        assert group.oom_killed()

        # Placement: the shim writes its own pid, then execs the agent (same pid).
        popen = procs.start(
            shim_command(group, ["/bin/sh", "-c", "echo $$"]), stdout=subprocess.PIPE
        )
        out, _ = popen.communicate(timeout=10)
        assert int(out) == popen.pid
        assert (group.path / "cgroup.procs").read_text().split() == [str(popen.pid)]
        placement = group.placement(["/bin/sh", "-c", "echo $$; readlink /proc/self/fd/0"])
        (group.path / "cgroup.procs").write_text("")
        try:
            popen = procs.start(placement.argv, stdin=placement.stdin, stdout=subprocess.PIPE)
        finally:
            placement.close()
        out, _ = popen.communicate(timeout=10)
        pid, stdin = out.decode().split()
        assert int(pid) == popen.pid
        assert stdin == "/dev/null"
        assert (group.path / "cgroup.procs").read_text().split() == [pid]

        # Members are cgroup.procs; emptiness is cgroup.events' "populated".
        fake.set_procs(group.path, ["4000001", "4000002"])
        assert group.pids() == [4000001, 4000002]
        assert not group.empty()
        fake.set_procs(group.path, [])
        assert group.empty()
    finally:
        for fd in (term_fd, oom_fd):
            os.close(fd)
    assert group.remove()
    assert not group.path.exists()
    assert manager.remove()


def test_v2_leftovers_and_bounded_waits(fake: FakeCgroupfs, tmp_path: Path) -> None:
    manager = _detect_fake(tmp_path)
    manager.create("a_000000000001", CEILING).close()
    busy = manager.create("a_000000000002", CEILING)
    fake.set_procs(busy.path, ["4000003"])
    leftovers = _detect_fake(tmp_path).cleanup_leftovers(known_ids=())
    assert leftovers.removed == ("a_000000000001",)
    assert leftovers.populated == ("a_000000000002",)
    assert not busy.remove(timeout_s=0.02)  # EBUSY, bounded.
    # The fake pid is not in the group according to /proc, so nothing is signalled.
    assert busy.signal_all(signal.SIGKILL) == []
    fake.set_procs(busy.path, [])
    assert busy.remove()
    assert manager.remove()


# -- the async pieces used together, as the supervisor will ------------------------------------


@pytest.fixture
async def v1_group(v1: CgroupManager) -> AsyncIterator[AgentCgroup]:
    group = v1.create(_new_id(), CEILING)
    try:
        yield group
    finally:
        await anyio.to_thread.run_sync(kill_group, group)
        group.remove(timeout_s=5)


@needs_v1
async def test_v1_eventfds_fire_on_removal_and_close_cleanly(v1_group: AgentCgroup) -> None:
    """After rmdir the kernel signals registered eventfds one last time (so a waiter wakes)."""
    fd = v1_group.threshold_eventfd(mb_to_bytes(50))
    try:
        assert drain(fd) == 0
        assert v1_group.remove()
        with anyio.fail_after(5):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)
