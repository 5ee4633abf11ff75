"""What an orchestrator and a shell pay: a tool call through ``claude-pm mcp`` (the SDK's stdio
client to the real command), against the same request straight to the socket with the
project's AsyncClient; and one TAB of shell completion, against the floor of any Python
command (``python -c pass``: the interpreter starting and stopping).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from bench.common import PYTHON, BenchResult, Daemon, Figure, clean_env, log, percentile
from bench.overhead import MEMORY

CLAUDE_PM = str(Path(sys.executable).with_name("claude-pm"))
SLEEPER = ["/bin/sleep", "120"]


def run(quick: bool = False) -> BenchResult:
    calls, tabs = (30, 5) if quick else (300, 30)
    result = BenchResult("orchestrate")
    with Daemon(MEMORY, "or") as daemon, daemon.client() as client:
        daemon.launch(client, "sleeper", SLEEPER)
        env = clean_env(CLAUDE_PM_HOME=str(daemon.home.root))
        via_mcp = anyio.run(_mcp_calls, env, calls)
        direct = anyio.run(_socket_calls, daemon, calls)
        log(f"orchestrate: list_agents p50 {percentile(via_mcp, 50):.2f} ms via MCP")
        # The second asks the daemon for the running agents' ids.
        lines = (("command", "claude-pm st"), ("ids", "claude-pm stop "))
        tabs_ms = [(name, line, _tab_ms(env, line, tabs, daemon.dir)) for name, line in lines]
    floor = _floor_ms(tabs)
    result.details = {"calls": calls, "tabs": tabs, "floor_ms": floor}
    result.figures = [
        *(
            Figure(
                key=f"orchestrate.mcp_list_agents_{name}_ms",
                label=f"MCP list_agents (status + queue), {name}, 1 agent",
                unit="ms",
                value=round(percentile(via_mcp, pct), 2),
                baseline=round(percentile(direct, pct), 2),
                baseline_label="AsyncClient status + queue",
            )
            for name, pct in (("p50", 50), ("p99", 99))
        ),
        *(
            Figure(
                key=f"orchestrate.tab_{name}_ms",
                label=f"completion of `{line}`, median",
                unit="ms",
                value=round(ms, 1),
                baseline=round(floor, 1),
                baseline_label="python -c pass",
            )
            for name, line, ms in tabs_ms
        ),
    ]
    return result


async def _mcp_calls(env: dict[str, str], calls: int) -> list[float]:
    params = StdioServerParameters(command=CLAUDE_PM, args=["mcp"], env=env)
    times = []
    async with Client(params) as client:
        await client.call_tool("list_agents", {})  # the first call: nothing warmed yet
        for _ in range(calls):
            start = time.perf_counter()
            answer = await client.call_tool("list_agents", {})
            times.append((time.perf_counter() - start) * 1000)
            if answer.is_error:
                raise RuntimeError(f"list_agents failed: {answer.content}")
    return times


async def _socket_calls(daemon: Daemon, calls: int) -> list[float]:
    """What list_agents asks, a connection each as the server opens: the layer's floor."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        async with daemon.async_client() as client:
            await client.status()
        async with daemon.async_client() as client:
            await client.queue()
        times.append((time.perf_counter() - start) * 1000)
    return times


def tab_env(env: dict[str, str], line: str, out: Path) -> dict[str, str]:
    """The environment argcomplete's shell scripts give ``claude-pm`` at a TAB after ``line``:
    the candidates go to ``out``, one a line (tests/test_completion.py runs it so too)."""
    return {
        **env,
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
    }


def _tab_ms(env: dict[str, str], line: str, tabs: int, scratch: Path) -> float:
    """``claude-pm`` run as the completion scripts run it at a TAB; the median wall time."""
    out = scratch / "candidates"
    at_tab = tab_env(env, line, out)
    times = []
    for _ in range(tabs):
        start = time.perf_counter()
        subprocess.run([CLAUDE_PM], env=at_tab, stdin=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - start) * 1000)
        if not out.read_text().strip():
            raise RuntimeError(f"completing {line!r} offered nothing")
    os.unlink(out)
    return statistics.median(times)


def _floor_ms(tabs: int) -> float:
    times: list[float] = []
    for _ in range(tabs):
        start = time.perf_counter()
        subprocess.run([PYTHON, "-c", "pass"], check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
