"""The systemd watchdog hears from the sampling loop: an idle daemon (cgroup backstop on, so
full scans 30 s apart) still pings well within half of WatchdogSec, and a wedged loop stops."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisord.config.home import Home
from supervisord.config.settings import load_config
from supervisord.daemon import open_backstop, prepare_home
from supervisord.entry import Heartbeat
from supervisord.host.sampler import ScanResult
from supervisord.host.sdnotify import Notifier
from supervisord.observe.eventlog import EventLog
from supervisord.supervise.supervisor import Supervisor
from tests.conftest import write_config

pytestmark = pytest.mark.anyio
WATCHDOG_S = 4.0  # WATCHDOG_USEC=4000000
OBSERVE_S = 20.0


async def pings_until(receiver: socket.socket, until: float) -> list[float]:
    """Arrival times (monotonic) of WATCHDOG=1 datagrams until ``until``."""
    arrivals: list[float] = []
    while (left := until - time.monotonic()) > 0:
        with anyio.move_on_after(left):
            await anyio.wait_readable(receiver)
            while True:
                try:
                    message = receiver.recv(4096)
                except BlockingIOError:
                    break
                if b"WATCHDOG=1" in message:
                    arrivals.append(time.monotonic())
    return arrivals


async def test_idle_daemon_pings_every_2_s_and_a_wedged_loop_stops(
    home: Home, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(home, cgroup={"mode": "required"})
    config = load_config(home.config_file)
    prepare_home(home)
    backstop, status = open_backstop(config, home, [])
    assert backstop is not None, status  # mode "required": cgroups are there, or this raised
    eventlog = EventLog(home, config.daemon.log_max_bytes, config.daemon.log_backups)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(short_tmp / "notify.sock"))
        receiver.setblocking(False)
        heartbeat = Heartbeat(Notifier(str(short_tmp / "notify.sock")), WATCHDOG_S)
        supervisor = Supervisor(
            config,
            home,
            eventlog,
            on_tick=heartbeat,
            tick_at_least_every_s=heartbeat.every_s,
            backstop=backstop,
        )
        gate = threading.Event()
        try:
            async with anyio.create_task_group() as tg:
                started = time.monotonic()
                await tg.start(supervisor.run)
                healthy = await pings_until(receiver, started + OBSERVE_S)
                # Nothing to sample, and no full scan due for 30 s: the loop turns anyway.
                assert supervisor.full_scans == 1
                gaps = [b - a for a, b in zip([started, *healthy], healthy, strict=False)]
                assert len(healthy) >= OBSERVE_S / (WATCHDOG_S / 2)
                assert max(gaps) <= WATCHDOG_S / 2, gaps

                # Wedge the loop where real ones wedge: a /proc scan that never returns.
                def stuck(*_: Any) -> ScanResult:
                    gate.wait(30)
                    return ScanResult(trees={})

                monkeypatch.setattr(supervisor._sampler, "sample", stuck)
                supervisor.request_full_scan()
                await anyio.sleep(0.2)  # the turn that ran the scan may still ping once
                quiet_from = time.monotonic()
                wedged = await pings_until(receiver, quiet_from + WATCHDOG_S + 1)
                assert wedged == []
                gate.set()
                tg.cancel_scope.cancel()
        finally:
            gate.set()
            eventlog.close()
            backstop.close()
