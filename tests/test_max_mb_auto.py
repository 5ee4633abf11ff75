"""``max_mb = "auto"``: 90% of the memory limit around the daemon (a container's, a slice's).

The daemon runs in a cgroup v1 memory group of the test's own, limited to 400 MB, joined by a
shim before it starts: the way a container's limit encloses it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord.config.home import Home
from supervisord.control.client import Client
from supervisord.core.errors import RemoteError
from tests.cgroup_helpers import JOIN_THEN_EXEC, limited_v1_group
from tests.conftest import DaemonProcess, skip_or_fail, write_config
from tests.test_cli import CLI

LIMIT_MB = 400


@pytest.fixture
def limited(short_tmp: Path) -> Iterator[Path]:
    """A memory group limited to 400 MB, removed with whatever ran in it."""
    try:
        with limited_v1_group(f"cpm-auto-{os.getpid()}-{short_tmp.name}", LIMIT_MB) as group:
            yield group
    except LookupError as exc:
        skip_or_fail(str(exc))


def test_launch_max_mb_auto_takes_90_percent_of_the_enclosing_limit(
    home: Home, limited: Path
) -> None:
    # The default reserve (10%, at least 512 MB) would leave no budget inside 400 MB.
    write_config(home, host={"budget_mb": 300, "reserve_mb": 20})
    shim = ["/bin/sh", "-c", JOIN_THEN_EXEC, str(limited / "cgroup.procs")]
    daemon = DaemonProcess(home, wrapper=shim).start()
    try:
        with Client(daemon.socket, timeout_s=30) as client:
            started = client.launch("pod", ["sleep", "30"], limits={"max_mb": "auto"})
            limits = client.stats(started["subprocess_id"])["limits"]
            client.kill(started["subprocess_id"])
        # The tests' 100/150 MB thresholds fit below it, so they stay (they follow a max_mb
        # they would not fit under: see test_config).
        assert (limits["warning_mb"], limits["critical_mb"], limits["max_mb"]) == (
            100.0,
            150.0,
            360.0,
        )
        cli = CLI(home)
        out = cli.ok("launch", "pod", "--max-mb", "auto", "--json", "--", "sleep", "30")
        assert '"max_mb": 360.0' in out
    finally:
        daemon.close()


def test_max_mb_auto_outside_any_limit_is_refused_saying_so(daemon: DaemonProcess) -> None:
    with Client(daemon.socket, timeout_s=30) as client, pytest.raises(RemoteError) as caught:
        client.launch("pod", ["sleep", "30"], limits={"max_mb": "auto"})
    assert 'limits.max_mb = "auto" needs an enclosing memory limit' in str(caught.value)
    done = CLI(daemon.home)("launch", "pod", "--max-mb", "auto", "--", "sleep", "1")
    assert done.returncode == 1  # the daemon refused it (a local config error would be 2)
    assert "the daemon runs inside none; give max_mb in MB" in done.stderr
