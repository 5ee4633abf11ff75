"""``claude-pm run`` as a container's entrypoint (PID 1): the supervision and the init.

PID 1 must stay to reap every orphan of the namespace and to pass signals on, so it cannot
become the agent as ``run`` otherwise does. Instead it runs the daemon in this process,
launches CMD as its agent (its child), copies the agent's output to the container's stdout,
forwards SIGTERM, SIGINT and SIGHUP to the agent's process group, and once the tree is gone
and its stats record written, exits with the agent's status (128 + the signal number when a
signal ended it), so the runtime sees what it would have without claude-pm.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from supervisord import daemon
from supervisord.config.home import Home
from supervisord.config.settings import load_config
from supervisord.control.client import AsyncClient
from supervisord.core.kinds import EventType
from supervisord.host.sysmem import enclosing_mb
from supervisord.observe.eventlog import configure_daemon_log

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
OUTPUT_POLL_S = 0.1


def is_init() -> bool:
    return os.getpid() == 1


def run_as_init(
    home: Home, agent_type: str, command: Sequence[str], limits: Mapping[str, Any]
) -> int:
    """Supervise CMD from PID 1 until its tree is gone; its exit status."""
    home.root.mkdir(parents=True, exist_ok=True)
    pod_mb = enclosing_mb()
    config = load_config(home.config_file, enclosing_mb=pod_mb)
    if pod_mb is not None and config.host.budget_mb is None:
        # One agent per pod, the pod's limit its budget: the host-wide reserve (at least
        # 512 MB) would leave nothing of a small pod, and max_mb guards the agent already.
        config = replace(config, host=replace(config.host, budget_mb=pod_mb, reserve_mb=0.0))
    configure_daemon_log(home, config.daemon.log_max_bytes, config.daemon.log_backups, echo=False)
    record: dict[str, Any] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            serve = partial(daemon.serve, config, home, reap_orphans=True, handle_signals=False)
            socket_path = await tg.start(serve)
            async with AsyncClient(socket_path) as client, AsyncClient(socket_path) as sub:
                events = await sub.subscribe(types=[EventType.EXIT])
                # The pod's limit is the budget here: the agent starts, whatever the queue.
                started = await client.launch(
                    agent_type, list(command), limits=dict(limits) or None, force=True
                )
                inner = anyio.create_task_group()
                async with inner:
                    inner.start_soon(_forward, started["pid"])
                    inner.start_soon(_copy_output, home, started["subprocess_id"])
                    async for event in events:
                        if event.get("subprocess_id") == started["subprocess_id"]:
                            record.update(event)
                            break
                    _stop(inner)
                await client.shutdown()

    anyio.run(main)
    return _status(record)


def _stop(tg: TaskGroup) -> None:
    tg.cancel_scope.cancel()


async def _forward(pid: int) -> None:
    """The runtime's signals, to the agent's process group (its own session)."""
    with anyio.open_signal_receiver(*FORWARDED) as received:
        async for signum in received:
            try:
                os.killpg(pid, signum)
            except ProcessLookupError:
                return


async def _copy_output(home: Home, subprocess_id: str) -> None:
    """The agent's log, as it grows, to stdout (what `kubectl logs` shows)."""
    path = home.agent_log(subprocess_id)
    offset = 0
    try:
        while True:
            offset = _copy_from(path, offset)
            await anyio.sleep(OUTPUT_POLL_S)
    finally:
        _copy_from(path, offset)


def _copy_from(path: os.PathLike[str], offset: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return offset + len(data)


def _status(record: Mapping[str, Any]) -> int:
    """As a shell reports it: the exit code, or 128 + the signal that ended it."""
    if record.get("exit_code") is not None:
        return int(record["exit_code"])
    if record.get("signal"):
        return 128 + int(signal.Signals[str(record["signal"])])
    return 1
