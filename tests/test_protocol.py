"""The control socket from the outside: raw bytes against a real daemon, good and bad clients."""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisord.config.home import Home
from supervisord.control.protocol import COMMANDS, PROTOCOL_VERSION
from tests.conftest import TEST_MEMORY, DaemonProcess, simagent, wait_output, write_config

pytestmark = pytest.mark.anyio

MAX_LINE = 4096
LINE_TIMEOUT_S = 0.5
IDLE_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 20
SMALL_DAEMON = {
    "max_line_bytes": MAX_LINE,
    "line_timeout_s": LINE_TIMEOUT_S,
    "idle_timeout_s": IDLE_TIMEOUT_S,
    "max_connections": MAX_CONNECTIONS,
}
SUBPROCESS_ID = re.compile(r"^[a-z][a-z0-9-]*_[0-9a-f]{12}$")
STATS_KEYS = {
    "subprocess_id",
    "current_mb",
    "peak_mb",
    "level",
    "pid",
    "tree_pids",
    "duration_seconds",
    "warnings_count",
    "limits",
}


@pytest.fixture
def small(home: Home) -> Iterator[DaemonProcess]:
    """A daemon with tight client limits, so abusive clients are dealt with in test time."""
    write_config(home, daemon=SMALL_DAEMON)
    proc = DaemonProcess(home).start()
    yield proc
    proc.close()


class Raw:
    """One raw connection: bytes out, response lines in, no help from the real client."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.ids = 0
        self.events: list[dict[str, Any]] = []  # What a subscription has streamed so far.

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(await anyio.connect_unix(path))

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def response(self, timeout_s: float = 10.0) -> dict[str, Any]:
        with anyio.fail_after(timeout_s):
            line = await self.reader.receive_until(b"\n", 1 << 20)
        message = json.loads(line)
        assert isinstance(message, dict), message
        return message

    async def request(self, cmd: str, timeout_s: float = 10.0, **args: Any) -> dict[str, Any]:
        self.ids += 1
        await self.send(json.dumps({"id": self.ids, "cmd": cmd, "args": args}).encode() + b"\n")
        response = await self.response(timeout_s)
        assert response["id"] == self.ids, response
        return response

    async def result(self, cmd: str, timeout_s: float = 10.0, **args: Any) -> Any:
        response = await self.request(cmd, timeout_s, **args)
        assert response["ok"] is True, response
        return response["result"]

    async def at_eof(self, timeout_s: float = 5.0) -> bool:
        """True once the daemon has closed the connection (EOF or reset), with nothing more."""
        with anyio.fail_after(timeout_s):
            try:
                data = await self.reader.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                return True
        raise AssertionError(f"expected the connection closed, got {data!r}")

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def raw(small: DaemonProcess) -> AsyncIterator[Raw]:
    conn = await Raw.open(small.socket)
    yield conn
    await conn.aclose()


def error_of(response: dict[str, Any]) -> tuple[str, str]:
    assert response["ok"] is False, response
    error = response["error"]
    assert set(error) >= {"code", "message"}, error
    return str(error["code"]), str(error["message"])


async def ping_fresh(path: Path, within_s: float = 0.1) -> None:
    """A new client is served promptly: connect, ping and get the pong within ``within_s``."""
    with anyio.fail_after(within_s):
        conn = await Raw.open(path)
        try:
            assert await conn.result("ping") == {"pong": True}
        finally:
            await conn.aclose()


async def next_event(sub: Raw, timeout_s: float, **fields: Any) -> dict[str, Any]:
    """The first event on a subscription (seen already, or still to come) with all ``fields``."""

    def wanted(event: dict[str, Any]) -> bool:
        return all(event.get(k) == v for k, v in fields.items())

    for event in sub.events:
        if wanted(event):
            return event
    with anyio.fail_after(timeout_s):
        while True:
            event = dict((await sub.response(timeout_s))["event"])
            sub.events.append(event)
            if wanted(event):
                return event


async def subscribe(path: Path) -> Raw:
    sub = await Raw.open(path)
    response = await sub.request("subscribe")
    assert response == {"id": 1, "ok": True, "result": {"subscribed": True}}
    return sub


# -- every command ------------------------------------------------------------------------------


async def test_every_command_answers_with_the_contract_shape(
    small: DaemonProcess, raw: Raw
) -> None:
    hello = await raw.result("hello")
    assert hello["protocol"] == PROTOCOL_VERSION
    assert isinstance(hello["version"], str)
    assert hello["version"]
    assert small.proc is not None
    assert hello["pid"] == small.proc.pid
    assert await raw.result("ping") == {"pong": True}

    status = await raw.result("status")
    assert set(status) >= {"daemon", "config", "system_memory", "agent_count"}
    assert status["daemon"]["pid"] == small.proc.pid
    assert status["config"]["memory"]["max_mb"] == TEST_MEMORY["max_mb"]
    assert status["system_memory"]["total_mb"] > 0
    assert status["agent_count"] == 0
    assert await raw.result("stats") == {"agents": []}

    sub = await subscribe(small.socket)
    try:
        # The id is echoed whatever its JSON type.
        await raw.send(b'{"id": "abc", "cmd": "ping"}\n{"cmd": "ping"}\n')
        assert await raw.response() == {"id": "abc", "ok": True, "result": {"pong": True}}
        assert await raw.response() == {"id": None, "ok": True, "result": {"pong": True}}

        launched = await raw.result(
            "launch", agent_type="idle-worker", command=simagent("--hold-mb", "5")
        )
        sid = launched["subprocess_id"]
        assert SUBPROCESS_ID.match(sid)
        assert sid.startswith("idle-worker_")
        assert isinstance(launched["pid"], int)
        assert launched["pid"] > 0
        event = await next_event(sub, 5, type="launch", subprocess_id=sid)
        assert event["pid"] == launched["pid"]

        (agent,) = (await raw.result("stats"))["agents"]
        assert agent["subprocess_id"] == sid
        one = await raw.result("stats", subprocess_id=sid)
        assert set(one) >= STATS_KEYS
        assert one["pid"] == launched["pid"]
        assert one["level"] == "OK"
        assert one["limits"]["max_mb"] == TEST_MEMORY["max_mb"]
        assert isinstance(one["tree_pids"], list)
        assert one["warnings_count"] == 0
        assert one["duration_seconds"] >= 0
        assert (await raw.result("status"))["agent_count"] == 1

        # A leaking agent: alerts stream as it climbs, then its exit at max_mb.
        hog = await raw.result(
            "launch",
            agent_type="hog",
            command=simagent("--hold-mb", "10", "--rate", "150"),
            limits={"max_mb": 180},
        )
        alert = await next_event(sub, 10, type="alert", subprocess_id=hog["subprocess_id"])
        assert alert["event"] == "memory_warning"
        assert alert["level"] == "WARNING"
        end = await next_event(sub, 15, type="exit", subprocess_id=hog["subprocess_id"])
        assert end["reason"] == "memory_limit"
        assert end["memory_stats"]["peak_mb"] >= 180

        reloaded = await raw.result("reload")
        assert reloaded["reloaded"] is True
        assert reloaded["config"]["memory"]["max_mb"] == TEST_MEMORY["max_mb"]

        stopped = await raw.result("stop", subprocess_id=sid, grace_s=2)
        assert (stopped["subprocess_id"], stopped["reason"]) == (sid, "stopped")
        assert stopped["signal"] == "SIGTERM"
        assert (await next_event(sub, 5, type="exit", subprocess_id=sid))["reason"] == "stopped"

        victim = await raw.result("launch", agent_type="victim", command=simagent("--hold-mb", "1"))
        killed = await raw.result("kill", subprocess_id=victim["subprocess_id"])
        assert (killed["reason"], killed["signal"]) == ("stopped", "SIGKILL")
        assert await raw.result("stats") == {"agents": []}
    finally:
        await sub.aclose()

    assert await raw.result("shutdown") == {"stopping": True, "agents": 0, "leave_agents": False}
    assert await raw.at_eof()
    assert small.wait(timeout_s=10) == 0
    assert not small.socket.exists()


# -- bad input on a connection that stays usable ------------------------------------------------

ALL_COMMANDS = sorted(COMMANDS)
BAD_LINES: list[tuple[bytes, str, Any, list[str]]] = [
    # line, error code, echoed id, words the message must contain
    (b"this is not json", "bad_request", None, ["not valid JSON"]),
    (b"[1, 2, 3]", "bad_request", None, ["JSON object", "array"]),
    (b'"ping"', "bad_request", None, ["JSON object", "string"]),
    (b'{"id": 5}', "bad_request", 5, ['"cmd"']),
    (b'{"id": 6, "cmd": 7}', "bad_request", 6, ['"cmd"']),
    (b'{"id": 7, "cmd": "explode"}', "unknown_command", 7, ["'explode'", *ALL_COMMANDS]),
    (
        b'{"id": 8, "cmd": "stop", "args": {"subprocess_id": 3}}',
        "bad_request",
        8,
        ["'subprocess_id'", "string"],
    ),
    (
        b'{"id": 9, "cmd": "launch", "args": {"agent_type": "x", "command": "ls"}}',
        "bad_request",
        9,
        ["'command'", "list of strings"],
    ),
    (
        b'{"id": 10, "cmd": "launch", "args": {"agent_type": "x", "command": ["ls"], '
        b'"limits": [1]}}',
        "bad_request",
        10,
        ["'limits'", "object"],
    ),
    (
        b'{"id": 11, "cmd": "launch", "args": {"agent_type": "x", "command": ["ls", 1]}}',
        "bad_request",
        11,
        ["'command'"],
    ),
    (
        b'{"id": 12, "cmd": "ping", "args": {"loud": true}}',
        "bad_request",
        12,
        ["unknown argument 'loud'"],
    ),
    (
        b'{"id": 13, "cmd": "stop", "args": {}}',
        "bad_request",
        13,
        ["missing required argument 'subprocess_id'"],
    ),
    (b'{"id": 14, "cmd": "ping", "args": [1]}', "bad_request", 14, ['"args"', "object"]),
    (
        b'{"id": 15, "cmd": "stop", "args": {"subprocess_id": "x_1", "grace_s": 1e999}}',
        "bad_request",
        15,
        ["'grace_s'"],
    ),
    (
        b'{"id": 16, "cmd": "stop", "args": {"subprocess_id": "x_1", "grace_s": true}}',
        "bad_request",
        16,
        ["'grace_s'"],
    ),
    (
        b'{"id": 17, "cmd": "stop", "args": {"subprocess_id": "x_1", "grace_s": -1}}',
        "bad_request",
        17,
        ["grace_s"],
    ),
    (
        b'{"id": 18, "cmd": "stats", "args": {"subprocess_id": "engineer_3f9a0c12b7de"}}',
        "not_found",
        18,
        ["no agent engineer_3f9a0c12b7de"],
    ),
    (
        b'{"id": 19, "cmd": "kill", "args": {"subprocess_id": "engineer_3f9a0c12b7de"}}',
        "not_found",
        19,
        ["no agent"],
    ),
    (
        b'{"id": 20, "cmd": "launch", "args": {"agent_type": "x", '
        b'"command": ["/nonexistent/agent-binary"]}}',
        "launch_failed",
        20,
        ["/nonexistent/agent-binary", "not found"],
    ),
    (
        b'{"id": 21, "cmd": "launch", "args": {"agent_type": "x", "command": ["true"], '
        b'"limits": {"warning_mb": 500, "max_mb": 300}}}',
        "invalid_config",
        21,
        ["warning_mb"],
    ),
    (
        b'{"id": 22, "cmd": "launch", "args": {"agent_type": "x", "command": ["true"], '
        b'"limits": {"max_gb": 3}}}',
        "bad_request",
        22,
        ["'max_gb'"],
    ),
    (b'{"id": 23, "cmd": "launch", "args": {"agent_type": "x"}}', "bad_request", 23, ["command"]),
    (
        b'{"id": 24, "cmd": "launch", "args": {"agent_type": "Bad Type", "command": ["true"]}}',
        "invalid_config",
        24,
        ["'Bad Type'"],
    ),
    (
        b'{"id": 25, "cmd": "reload", "args": {"env": {"CLAUDE_PM_MEMORY_MAX_MB": "lots"}}}',
        "invalid_config",
        25,
        ["CLAUDE_PM_MEMORY_MAX_MB"],
    ),
    (b'{"id": 1, "cmd": "p\xffing"}', "bad_request", None, ["not valid JSON"]),
    (b"\xff\xfe\x00\x80 garbage", "bad_request", None, []),
    (b'{"id": 1, "cmd": "ping"', "bad_request", None, ["not valid JSON"]),
    # Nested past Python's recursion limit: once this crashed the whole daemon.
    (b"[" * 3000, "bad_request", None, ["nested too deeply"]),
    (
        b'{"id": 26, "cmd": "ping", "args": {"a": ' + b"[" * 1500 + b"]" * 1500 + b"}}",
        "bad_request",
        None,
        ["nested too deeply"],
    ),
]


async def test_bad_requests_get_errors_and_the_connection_stays_usable(
    small: DaemonProcess, raw: Raw
) -> None:
    for line, code, request_id, words in BAD_LINES:
        await raw.send(line + b"\n")
        response = await raw.response()
        got_code, message = error_of(response)
        assert (got_code, response["id"]) == (code, request_id), (line[:80], response)
        for word in words:
            assert word in message, (line[:80], message)
        assert await raw.result("ping") == {"pong": True}, line[:80]
    # Blank lines get no answer; pipelined requests are answered in order.
    await raw.send(b"\n  \r\n" + b'{"id": "a", "cmd": "ping"}\n{"id": "b", "cmd": "hello"}\n')
    assert (await raw.response())["id"] == "a"
    assert (await raw.response())["id"] == "b"
    # Nothing above launched anything.
    assert await raw.result("stats") == {"agents": []}


async def test_a_line_of_exactly_max_line_bytes_is_accepted(raw: Raw) -> None:
    body = b'{"id": 1, "cmd": "ping"}'
    await raw.send(body + b" " * (MAX_LINE - len(body)) + b"\n")
    assert await raw.response() == {"id": 1, "ok": True, "result": {"pong": True}}


@pytest.mark.parametrize("newline", [True, False], ids=["with-newline", "without-newline"])
async def test_an_over_long_line_gets_an_error_then_a_closed_connection(
    small: DaemonProcess, raw: Raw, newline: bool
) -> None:
    line = b'{"id": 1, "cmd": "ping", "pad": "' + b"x" * MAX_LINE + b'"}'
    await raw.send(line + (b"\n" if newline else b""))
    code, message = error_of(await raw.response())
    assert code == "bad_request"
    assert f"over {MAX_LINE} bytes" in message
    assert await raw.at_eof()
    await ping_fresh(small.socket)


async def test_a_request_then_an_over_long_line_in_one_write_gets_both_answers(
    small: DaemonProcess, raw: Raw
) -> None:
    """The complete request is answered first; then the refusal, then the close."""
    over = b'{"id": 2, "cmd": "ping", "pad": "' + b"x" * MAX_LINE + b'"}\n'
    await raw.send(b'{"id": 1, "cmd": "hello"}\n' + over)
    first = await raw.response()
    assert (first["id"], first["ok"]) == (1, True)
    assert first["result"]["protocol"] == 1
    code, message = error_of(await raw.response())
    assert code == "bad_request"
    assert f"over {MAX_LINE} bytes" in message
    assert await raw.at_eof()
    await ping_fresh(small.socket)


async def test_a_half_line_is_closed_after_line_timeout(small: DaemonProcess, raw: Raw) -> None:
    started = time.monotonic()
    await raw.send(b'{"id": 1, "cmd": "pi')
    code, message = error_of(await raw.response(timeout_s=LINE_TIMEOUT_S + 3))
    elapsed = time.monotonic() - started
    assert code == "timeout"
    assert "finish its request line" in message
    assert LINE_TIMEOUT_S * 0.8 <= elapsed < LINE_TIMEOUT_S + 1.5
    assert await raw.at_eof()


async def test_a_trickled_line_is_closed_after_line_timeout(raw: Raw) -> None:
    """One byte now and then must not keep a line open forever."""

    async def trickle() -> None:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            for byte in b'{"id": 1, "cmd": "ping", "args": {"x": "' + b"y" * 1000:
                await raw.send(bytes([byte]))
                await anyio.sleep(LINE_TIMEOUT_S / 5)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(trickle)
        response = await raw.response(timeout_s=LINE_TIMEOUT_S + 1.5)
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < LINE_TIMEOUT_S + 1.0
    code, message = error_of(response)
    assert code == "timeout"
    assert f"{LINE_TIMEOUT_S:g} s" in message
    assert await raw.at_eof()


async def test_idle_clients_are_closed_but_busy_ones_are_not(small: DaemonProcess) -> None:
    idle = await Raw.open(small.socket)
    busy = await Raw.open(small.socket)
    pings = 0

    async def keep_asking() -> None:
        nonlocal pings
        while time.monotonic() - started < IDLE_TIMEOUT_S * 1.25:
            assert await busy.result("ping") == {"pong": True}
            pings += 1
            await anyio.sleep(IDLE_TIMEOUT_S / 4)

    started = time.monotonic()
    try:
        with anyio.fail_after(IDLE_TIMEOUT_S + 3):
            async with anyio.create_task_group() as tg:
                # Meanwhile a client that keeps asking keeps its connection past the idle limit.
                tg.start_soon(keep_asking)
                code, message = error_of(await idle.response(timeout_s=IDLE_TIMEOUT_S + 3))
                elapsed = time.monotonic() - started
        assert code == "timeout"
        assert "send a request" in message
        assert IDLE_TIMEOUT_S * 0.9 <= elapsed < IDLE_TIMEOUT_S + 1.5
        assert await idle.at_eof()
        assert pings >= 5
        assert await busy.result("ping") == {"pong": True}
    finally:
        await idle.aclose()
        await busy.aclose()


# -- abuse does not stop supervision ------------------------------------------------------------


async def _half_line_then_hang_up(path: Path) -> None:
    conn = await Raw.open(path)
    await conn.send(b'{"id": 1, "cmd": "sta')
    await conn.aclose()


async def _stop_then_hang_up(path: Path, subprocess_id: str) -> None:
    conn = await Raw.open(path)
    line = {"id": 1, "cmd": "stop", "args": {"subprocess_id": subprocess_id, "grace_s": 0.5}}
    await conn.send(json.dumps(line).encode() + b"\n")
    await conn.aclose()


async def _over_long(path: Path, newline: bool) -> None:
    conn = await Raw.open(path)
    try:
        await conn.send(b"[" * (MAX_LINE + 10) + (b"\n" if newline else b""))
        assert error_of(await conn.response())[0] == "bad_request"
        assert await conn.at_eof()
    finally:
        await conn.aclose()


async def _never_finishes(path: Path) -> None:
    conn = await Raw.open(path)
    try:
        await conn.send(b'{"id": 1')
        assert error_of(await conn.response(LINE_TIMEOUT_S + 3))[0] == "timeout"
        assert await conn.at_eof()
    finally:
        await conn.aclose()


async def _idle(path: Path) -> None:
    conn = await Raw.open(path)
    try:
        assert error_of(await conn.response(IDLE_TIMEOUT_S + 3))[0] == "timeout"
        assert await conn.at_eof()
    finally:
        await conn.aclose()


async def _poison(path: Path) -> None:
    conn = await Raw.open(path)
    try:
        await conn.send(b"[" * 2000 + b"\n" + b"\xc3\x28\n")
        assert error_of(await conn.response())[0] == "bad_request"
        assert error_of(await conn.response())[0] == "bad_request"
    finally:
        await conn.aclose()


async def test_abusive_clients_do_not_stop_supervision(small: DaemonProcess) -> None:
    path = small.socket
    sub = await subscribe(path)
    control = await Raw.open(path)
    try:
        hog = await control.result(
            "launch", agent_type="hog", command=simagent("--hold-mb", "10", "--rate", "150")
        )
        stubborn = await control.result(
            "launch",
            agent_type="stubborn",
            command=simagent("--hold-mb", "5", "--ignore-term"),
        )
        await wait_output(small.home, stubborn["subprocess_id"], "simagent pid")
        abuses: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("half line, hang up", lambda: _half_line_then_hang_up(path)),
            ("stop, hang up", lambda: _stop_then_hang_up(path, stubborn["subprocess_id"])),
            ("over-long with newline", lambda: _over_long(path, True)),
            ("over-long without newline", lambda: _over_long(path, False)),
            ("never finishes its line", lambda: _never_finishes(path)),
            ("idle", lambda: _idle(path)),
            ("poison lines", lambda: _poison(path)),
        ]
        served: list[str] = []

        async def abuse(name: str, run: Callable[[], Awaitable[None]]) -> None:
            await run()
            await ping_fresh(path)  # Within 100 ms of each abuse, a new client is served.
            served.append(name)

        with anyio.fail_after(IDLE_TIMEOUT_S + 10):
            async with anyio.create_task_group() as tg:
                for name, run in abuses:
                    tg.start_soon(abuse, name, run)
        assert sorted(served) == sorted(name for name, _ in abuses)

        end = await next_event(sub, 20, type="exit", subprocess_id=hog["subprocess_id"])
        assert end["reason"] == "memory_limit"
        assert end["memory_stats"]["peak_mb"] >= TEST_MEMORY["max_mb"]
        # The stop whose client hung up was still carried out, to SIGKILL.
        ended = await next_event(sub, 10, type="exit", subprocess_id=stubborn["subprocess_id"])
        assert (ended["reason"], ended["signal"]) == ("stopped", "SIGKILL")
        async with small.async_client() as client:
            assert await client.stats() == {"agents": []}
        await ping_fresh(path)
    finally:
        await sub.aclose()
        await control.aclose()


# -- connection limit ---------------------------------------------------------------------------


async def test_connections_over_max_connections_are_refused_then_served_again(
    small: DaemonProcess,
) -> None:
    held: list[Raw] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            conn = await Raw.open(small.socket)
            held.append(conn)
            assert await conn.result("ping") == {"pong": True}
        for _ in range(3):
            extra = await Raw.open(small.socket)
            try:
                code, message = error_of(await extra.response())
                assert code == "too_many_connections"
                assert str(MAX_CONNECTIONS) in message
                assert await extra.at_eof()
            finally:
                await extra.aclose()
        # The held ones are still served.
        assert await held[-1].result("ping") == {"pong": True}
        for conn in held[:5]:
            await conn.aclose()
        del held[:5]
        with anyio.fail_after(5):
            while True:
                conn = await Raw.open(small.socket)
                try:
                    await conn.send(b'{"id": 1, "cmd": "ping"}\n')
                    if (await conn.response())["ok"]:
                        break
                finally:
                    await conn.aclose()
                await anyio.sleep(0.02)
        # Up to the limit again, and no further.
        for _ in range(5):
            conn = await Raw.open(small.socket)
            held.append(conn)
            assert await conn.result("ping") == {"pong": True}
        extra = await Raw.open(small.socket)
        try:
            assert error_of(await extra.response())[0] == "too_many_connections"
        finally:
            await extra.aclose()
    finally:
        for conn in held:
            await conn.aclose()


# -- fuzz ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonProcess]:
    """One daemon for every fuzz example, with the default 1 MiB line limit."""
    root = Path(tempfile.mkdtemp(prefix="cpm-fz-", dir="/tmp"))
    home = Home(root / ".claude-pm")
    write_config(home)
    proc = DaemonProcess(home).start()
    yield proc
    proc.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fuzz_socket(fuzz_daemon: DaemonProcess) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(fuzz_daemon.socket))
    yield sock
    sock.close()


def _read_line(sock: socket.socket, pending: bytearray) -> bytes:
    while b"\n" not in pending:
        chunk = sock.recv(65536)
        assert chunk, "the daemon closed the connection"
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line


# Commands that cannot end the daemon or the connection; random args make most of them fail.
SAFE_COMMANDS = sorted(set(COMMANDS) - {"shutdown", "subscribe"})
ARG_NAMES = sorted({name for spec in COMMANDS.values() for name in spec})
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"cmd": st.sampled_from(SAFE_COMMANDS) | st.text(max_size=10)},
    optional={
        "id": json_values,
        "args": st.dictionaries(
            st.sampled_from(ARG_NAMES) | st.text(max_size=8), json_values, max_size=4
        )
        | json_values,
    },
)
lines = st.one_of(
    st.binary(max_size=200),
    json_values.map(json.dumps).map(str.encode),
    requests.map(json.dumps).map(str.encode),
).map(lambda line: line.replace(b"\n", b" "))


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(line=lines)
@example(line=b"[" * 100_000)
@example(line=b"1" * 5000)
@example(line=b'{"id": ' + b"9" * 5000 + b', "cmd": "ping"}')
@example(line=b'{"id": NaN, "cmd": "ping"}')
@example(line=b'{"cmd": "launch", "args": {"agent_type": "a", "command": ["\\u0000"]}}')
@example(
    line=b'{"cmd": "launch", "args": {"agent_type": "a", "command": ["x"], "env": {"A=B": "1"}}}'
)
@example(
    line=b'{"cmd": "launch", "args": {"agent_type": "a", "command": ["x"], "cwd": "/nonexistent"}}'
)
@example(line=b'{"cmd": "launch", "args": {"agent_type": "a", "task": "t"}}')
def test_fuzzed_lines_always_get_a_response(fuzz_socket: socket.socket, line: bytes) -> None:
    pending = bytearray()
    fuzz_socket.sendall(line + b"\n" + b'{"id": "after", "cmd": "ping"}\n')
    if line.strip():
        response = json.loads(_read_line(fuzz_socket, pending))
        assert isinstance(response, dict), response
        assert response["ok"] in (True, False), response
        if response["ok"] is False:
            assert isinstance(response["error"]["code"], str)
            assert isinstance(response["error"]["message"], str)
    pong = json.loads(_read_line(fuzz_socket, pending))
    assert pong == {"id": "after", "ok": True, "result": {"pong": True}}
    assert not pending


def test_fuzz_daemon_survived(fuzz_daemon: DaemonProcess) -> None:
    assert fuzz_daemon.proc is not None
    assert fuzz_daemon.proc.poll() is None
    with fuzz_daemon.client() as client:
        assert client.ping()
        assert client.hello()["pid"] == fuzz_daemon.proc.pid


# -- who may connect ----------------------------------------------------------------------------


def _as_nobody(path: Path, lines: list[bytes]) -> dict[str, Any]:
    """In a forked child running as ``nobody``: connect, send ``lines``, report what happened."""
    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        report: dict[str, Any] = {}
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            report["uid"] = os.getuid()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(str(path))
            except OSError as exc:
                report["connect_errno"] = exc.errno
            else:
                received = b""
                try:
                    for line in lines:
                        sock.sendall(line + b"\n")
                except OSError as exc:
                    report["send_errno"] = exc.errno
                try:
                    while chunk := sock.recv(65536):
                        received += chunk
                except OSError as exc:
                    report["recv_errno"] = exc.errno
                report["responses"] = [json.loads(x) for x in received.splitlines()]
        except BaseException as exc:
            report["child_error"] = repr(exc)
        finally:
            os.write(write_fd, json.dumps(report).encode())
            os._exit(0)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        chunks.append(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, Any] = json.loads(b"".join(chunks))
    assert "child_error" not in result, result
    assert result["uid"] == nobody.pw_uid
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
async def test_other_users_are_refused(small: DaemonProcess, short_tmp: Path) -> None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    home = small.home
    socket_path = small.socket
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.run.stat().st_mode) == 0o700
    async with small.async_client() as client:
        target = await client.launch("target", simagent("--hold-mb", "1"))
    marker = short_tmp / "launched-by-nobody"
    lines = [
        json.dumps(
            {
                "id": 1,
                "cmd": "launch",
                "args": {"agent_type": "evil", "command": ["touch", str(marker)]},
            }
        ).encode(),
        json.dumps(
            {"id": 2, "cmd": "stop", "args": {"subprocess_id": target["subprocess_id"]}}
        ).encode(),
    ]
    # Let `nobody` walk down to the run directory, so only its own mode keeps it out.
    walk = [p for p in (home.run.parent, home.root.parent) if p != Path("/tmp")]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [*walk, home.run, socket_path]}
    try:
        for directory in walk:
            directory.chmod(0o711)
        # (a) As the daemon leaves them: the 0700 run directory refuses the connect itself.
        outer = await anyio.to_thread.run_sync(_as_nobody, socket_path, lines)
        assert outer.get("connect_errno") == errno.EACCES, outer
        # (b) With the path opened up, SO_PEERCRED is what refuses it.
        home.run.chmod(0o777)
        socket_path.chmod(0o777)
        inner = await anyio.to_thread.run_sync(_as_nobody, socket_path, lines)
        assert "connect_errno" not in inner, inner
        assert inner["responses"], inner
        (refusal,) = inner["responses"]
        assert refusal["ok"] is False
        assert refusal["error"]["code"] == "permission_denied"
        assert str(pwd.getpwnam("nobody").pw_uid) in refusal["error"]["message"]
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert stat.S_IMODE(home.run.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    async with small.async_client() as client:
        agents = (await client.stats())["agents"]
        assert [a["subprocess_id"] for a in agents] == [target["subprocess_id"]]
        await client.kill(target["subprocess_id"])
    assert not marker.exists()
    assert not any(p.name.startswith("evil_") for p in home.agent_logs.iterdir())
