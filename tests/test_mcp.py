"""``claude-pm mcp``, driven as an orchestrating agent drives it: the SDK's own stdio client
talking to the real command, which starts and talks to a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from mcp.types import CallToolResult, TextResourceContents

from supervisord.config.home import Home
from supervisord.config.settings import ENV_VARIABLES
from supervisord.control.client import Client as DaemonClient
from supervisord.core.errors import DaemonNotRunning
from supervisord.mcpserver import resources, server
from supervisord.mcpserver.daemon import Daemon
from tests.conftest import alive, simagent
from tests.test_security import as_nobody, shared_daemon  # noqa: F401 - a fixture

CLAUDE_PM = str(Path(sys.executable).with_name("claude-pm"))
TOOLS = {
    "launch_agent",
    "list_agents",
    "agent_stats",
    "stop_agent",
    "kill_agent",
    "restart_agent",
    "agent_log",
    "host_memory",
    "wait_agent",
    "recent_alerts",
}
# 100 MB/s to a cap far past max_mb (200 MB): killed at its limit about 2 s in.
LEAKER = simagent("--rate", "100", "--cap", "400")


def mcp_env(home: Home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    return {**env, "CLAUDE_PM_HOME": str(home.root)}


def params(home: Home) -> StdioServerParameters:
    return StdioServerParameters(command=CLAUDE_PM, args=["mcp"], env=mcp_env(home))


def daemon_pid(home: Home) -> int | None:
    try:
        with DaemonClient(home.default_socket, timeout_s=5) as client:
            return int(client.hello()["pid"])
    except (DaemonNotRunning, OSError):
        return None


def shut_down(home: Home) -> None:
    """Stop the daemon the server started (detached: not our child), by its own pid."""
    pid = daemon_pid(home)
    if pid is None:
        return
    with DaemonClient(home.default_socket, timeout_s=30) as client:
        client.shutdown()
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
    assert not alive(pid), f"daemon {pid} did not stop"


@pytest.fixture
def mcp_home(home: Home) -> Iterator[Home]:
    yield home
    shut_down(home)


@asynccontextmanager
async def connected(home: Home, mode: str = "auto") -> AsyncIterator[Client]:
    """``mode`` "legacy": the initialize handshake of the protocol before 2026-07-28, as
    older clients connect."""
    with anyio.fail_after(30):
        async with Client(params(home), mode=mode) as client:
            yield client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """A tool's structured result; the test fails with the tool's error text otherwise."""
    with anyio.fail_after(40):
        result = await client.call_tool(tool, args)
    assert not result.is_error, error_text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


async def refused(client: Client, tool: str, **args: Any) -> str:
    with anyio.fail_after(20):
        result = await client.call_tool(tool, args)
    assert result.is_error, result.structured_content
    return error_text(result)


async def read_text(client: Client, uri: str) -> str:
    with anyio.fail_after(20):
        (contents,) = (await client.read_resource(uri)).contents
    assert isinstance(contents, TextResourceContents), contents
    return contents.text


def error_text(result: CallToolResult) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


@pytest.mark.anyio
async def test_an_orchestrator_launches_watches_and_collects_a_leaker(mcp_home: Home) -> None:
    async with connected(mcp_home) as client:
        listed = (await client.list_tools()).tools
        assert {tool.name for tool in listed} == TOOLS
        for tool in listed:
            assert len(tool.description or "") > 60, tool.name
            assert tool.input_schema["type"] == "object"
        launch_schema = next(t for t in listed if t.name == "launch_agent").input_schema
        assert launch_schema["properties"]["max_mb"]["anyOf"][0]["type"] == "number"
        assert launch_schema["required"] == ["agent_type"]

        launched = await call(client, "launch_agent", agent_type="leaker", command=LEAKER)
        sid, pid = launched["subprocess_id"], launched["pid"]
        assert launched["queued"] is False
        assert alive(pid)
        assert launched["limits"]["max_mb"] == 200  # the home's default, none given

        running = await call(client, "list_agents")
        assert sid in [row["subprocess_id"] for row in running["agents"]]

        ended = await call(client, "wait_agent", subprocess_id=sid, timeout_s=30)
        assert ended["ended"] is True
        record = ended["record"]
        assert (record["subprocess_id"], record["reason"]) == (sid, "memory_limit")
        assert record["memory_stats"]["aborted"] is True
        assert record["memory_stats"]["peak_mb"] >= 190
        assert not alive(pid)

        log = await call(client, "agent_log", subprocess_id=sid, lines=5)
        assert f"simagent pid {pid}" in log["text"]
        assert 1 <= log["lines"] <= 5

        alerts = await call(client, "recent_alerts", subprocess_id=sid)
        events = [alert["event"] for alert in alerts["alerts"]]
        assert "memory_critical" in events
        assert "sigterm_sent" in events

        # Waiting for an agent that already ended gives its record at once, from the log.
        again = await call(client, "wait_agent", subprocess_id=sid, timeout_s=1)
        assert again["record"]["reason"] == "memory_limit"


@pytest.mark.anyio
async def test_bad_calls_are_tool_errors_and_the_server_carries_on(mcp_home: Home) -> None:
    async with connected(mcp_home, mode="legacy") as client:
        assert client.protocol_version < "2026"
        for tool in ("stop_agent", "kill_agent", "agent_stats", "restart_agent", "wait_agent"):
            text = await refused(client, tool, subprocess_id="nobody_000000000000")
            assert "not_found:" in text, (tool, text)
            assert "nobody_000000000000" in text, (tool, text)
        assert "not_found: no output log" in await refused(
            client, "agent_log", subprocess_id="nobody_000000000000"
        )

        # An id is never a path: agent_log builds one from it.
        escape = await refused(client, "agent_log", subprocess_id="../../../etc/passwd")
        assert "subprocess_id" in escape
        assert "String should match pattern" in escape
        wrong_type = await refused(client, "agent_log", subprocess_id=42)
        assert "subprocess_id" in wrong_type
        assert "valid string" in wrong_type
        not_a_number = await refused(client, "wait_agent", subprocess_id="x", timeout_s="long")
        assert "timeout_s" in not_a_number
        assert "valid number" in not_a_number
        out_of_range = await refused(client, "agent_log", subprocess_id="x", lines=10**6)
        assert "lines" in out_of_range
        assert "2000" in out_of_range
        bad_choice = await refused(
            client, "launch_agent", agent_type="x", command=["true"], restart={"mode": "often"}
        )
        assert "restart.mode" in bad_choice
        assert "on-failure" in bad_choice
        typo = await refused(
            client, "launch_agent", agent_type="x", command=["true"], restart={"mdoe": "always"}
        )
        assert "restart.mdoe" in typo
        assert "Extra inputs are not permitted" in typo

        # The daemon's own refusals carry its code and message.
        missing = await refused(client, "launch_agent", agent_type="x", command=["/no/such"])
        assert "launch_failed:" in missing
        assert "/no/such" in missing
        falling = await refused(
            client, "launch_agent", agent_type="x", command=["true"], warning_mb=300
        )
        assert "bad_request:" in falling or "invalid_config:" in falling
        assert "warning_mb" in falling

        # After all of that, it still answers.
        assert (await call(client, "host_memory"))["host"]["budget_mb"] > 0


@pytest.mark.anyio
async def test_a_restart_policy_is_waited_through_to_the_last_run(mcp_home: Home) -> None:
    async with connected(mcp_home) as client:
        launched = await call(
            client,
            "launch_agent",
            agent_type="flaky",
            command=["/bin/sh", "-c", "exit 3"],
            restart={"mode": "on-failure", "delay_s": 0, "limit": 3, "window_s": 600},
        )
        ended = await call(
            client, "wait_agent", subprocess_id=launched["subprocess_id"], timeout_s=30
        )
    record = ended["record"]
    assert (record["reason"], record["exit_code"]) == ("exited", 3)
    assert (record["run"], record["restarts"], record["next_restart_s"]) == (3, 2, None)


@pytest.mark.anyio
async def test_a_daemon_restart_between_calls_is_survived(mcp_home: Home) -> None:
    async with connected(mcp_home) as client:
        await call(client, "list_agents")
        first = daemon_pid(mcp_home)
        assert first is not None  # started by the server, as `claude-pm init` starts it
        shut_down(mcp_home)

        # The next call starts a daemon again, and the server has not crashed meanwhile.
        assert (await call(client, "list_agents"))["agent_count"] == 0
        second = daemon_pid(mcp_home)
        assert second is not None
        assert second != first


@pytest.mark.anyio
async def test_a_broken_config_is_said_by_each_call_and_the_server_serves_on(
    mcp_home: Home,
) -> None:
    good = mcp_home.config_file.read_text()
    mcp_home.config_file.write_text('[memory]\nmax_mb = "lots"\n')
    async with connected(mcp_home) as client:
        for _ in range(2):
            text = await refused(client, "list_agents")
            assert "invalid_config:" in text
            assert "max_mb" in text
        assert daemon_pid(mcp_home) is None  # none was started on a config it would refuse
        mcp_home.config_file.write_text(good)
        assert (await call(client, "list_agents"))["agent_count"] == 0


def test_the_server_ends_when_its_client_goes_away(mcp_home: Home) -> None:
    # An empty standard input: the client connected and left without a word.
    done = subprocess.run(
        [CLAUDE_PM, "mcp"],
        env=mcp_env(mcp_home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""  # nothing but the protocol may go to stdout
    assert b"Traceback" not in done.stderr


@pytest.mark.anyio
async def test_resources_and_their_change_notifications(mcp_home: Home) -> None:
    async with connected(mcp_home) as client:
        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        assert uris == {resources.ALERTS_URI, resources.AGENTS_URI}
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == [resources.STATS_URI]

        launched = await call(client, "launch_agent", agent_type="leaker", command=LEAKER)
        sid = launched["subprocess_id"]
        stats_uri = resources.STATS_URI.format(subprocess_id=sid)
        async with client.listen(resource_subscriptions=[resources.ALERTS_URI]) as sub:
            with anyio.fail_after(20):
                event = await sub.__anext__()  # its first alert, as it passes warning_mb
        assert isinstance(event, ResourceUpdated)
        assert event.uri == resources.ALERTS_URI

        await call(client, "wait_agent", subprocess_id=sid, timeout_s=30)
        alerts = await read_text(client, resources.ALERTS_URI)
        lines = [json.loads(line) for line in alerts.splitlines()]
        assert any(a.get("subprocess_id") == sid for a in lines)
        final = json.loads(await read_text(client, stats_uri))
        assert (final["state"], final["reason"]) == ("ended", "memory_limit")


async def in_process(home: Home, target: str) -> dict[str, Any]:
    """list_agents, then stop_agent and kill_agent of ``target``, through an in-process
    client of the server (the SDK's own), as whoever runs this."""
    mcp = server.build(Daemon(home), InMemorySubscriptionBus())
    async with Client(mcp) as client:
        listing = await client.call_tool("list_agents", {})
        stop = await client.call_tool("stop_agent", {"subprocess_id": target})
        kill = await client.call_tool("kill_agent", {"subprocess_id": target})
    return {
        "seen": [a["subprocess_id"] for a in (listing.structured_content or {})["agents"]],
        "stop": error_text(stop) if stop.is_error else "stopped",
        "kill": error_text(kill) if kill.is_error else "killed",
    }


def test_a_user_sees_and_ends_only_their_own_agents_through_mcp(
    shared_daemon: Any,  # noqa: F811 - the fixture imported above
) -> None:
    """The server runs as its user: the daemon authorises each call by who that is."""
    home: Home = shared_daemon.home
    with shared_daemon.client() as root:
        roots = root.launch("roots", ["/bin/sleep", "60"])["subprocess_id"]
    # Once as root on an id that is not there: nobody cannot read the interpreter's files
    # (under /root), so every module the calls import lazily must be loaded before the fork.
    warm = anyio.run(in_process, home, "gone_000000000000")
    assert roots in warm["seen"]
    assert "not_found:" in warm["stop"]

    outcome = as_nobody(lambda: anyio.run(in_process, home, roots))
    assert "result" in outcome, outcome
    seen = outcome["result"]
    assert roots not in seen["seen"]
    for verb in ("stop", "kill"):
        assert "permission_denied:" in seen[verb], seen
    with shared_daemon.client() as root:
        assert root.stats(roots)["pid"]  # still running: nobody could not end it
        root.kill(roots)


def test_without_the_sdk_the_command_says_what_to_install(home: Home) -> None:
    # None in sys.modules makes `import mcp` fail as it does where the extra is not installed.
    code = (
        "import sys; sys.modules['mcp'] = None; "
        "from supervisord.cli.main import main; sys.exit(main(['mcp']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=mcp_env(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "pip install 'claude-pm-supervisord[mcp]'" in done.stderr
    assert "Traceback" not in done.stderr
