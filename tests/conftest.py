"""Shared fixtures: a short-path home and a real daemon process serving it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import anyio
import pytest
import tomli_w

from supervisord.config.home import Home
from supervisord.config.settings import ENV_VARIABLES
from supervisord.control.client import AsyncClient, Client

AGENTS = Path(__file__).parent / "agents"
PYTHON = sys.executable
# Small limits so a hog needs ~200 MB, not GBs; a fast interval so tests finish quickly.
TEST_MEMORY = {
    "warning_mb": 100,
    "critical_mb": 150,
    "max_mb": 200,
    "check_interval_s": 0.2,
    "term_grace_s": 1.0,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory under /tmp: pytest's tmp_path can overflow AF_UNIX's 107-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="cpm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(home: Home, memory: dict[str, Any] | None = None, **sections: Any) -> None:
    home.config_file.parent.mkdir(parents=True, exist_ok=True)
    # The kernel ceiling 50% above max_mb (not 10%): tests of the graceful escalation must
    # not race the cgroup OOM; tests of the backstop set their own margin.
    sections.setdefault("cgroup", {"hard_margin_pct": 50})
    document = {"memory": {**TEST_MEMORY, **(memory or {})}, **sections}
    home.config_file.write_text(tomli_w.dumps(document))


@pytest.fixture
def home(short_tmp: Path) -> Home:
    home = Home(short_tmp / ".claude-pm")
    write_config(home)
    return home


class DaemonProcess:
    """``claude-pm daemon`` as a real child process, for tests that need the real thing."""

    def __init__(
        self, home: Home, env: dict[str, str] | None = None, wrapper: list[str] | None = None
    ) -> None:
        self.home = home
        # What the daemon's command runs behind (a shim that joins a cgroup, say).
        self.wrapper = wrapper or []
        self.env = {**os.environ, "CLAUDE_PM_HOME": str(home.root), **(env or {})}
        # The developer's own CLAUDE_PM_* settings must not leak into a test's daemon.
        for name in ENV_VARIABLES:
            if name not in (env or {}):
                self.env.pop(name, None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.home.default_socket

    @property
    def stderr_path(self) -> Path:
        # Beside the home, not in it: tests remove and recreate the home's directories.
        return self.home.root.parent / "daemon.stderr"

    def start(self, timeout_s: float = 15.0) -> DaemonProcess:
        self.home.root.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe nobody reads while the daemon runs: a full pipe blocks the daemon.
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [*self.wrapper, PYTHON, "-m", "supervisord", "daemon"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.stderr_path.read_text(errors="replace")
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {err}")
            try:
                with Client(self.socket, timeout_s=2) as client:
                    client.ping()
                return self
            except Exception:
                time.sleep(0.05)
        raise AssertionError("daemon did not answer in time")

    def client(self) -> Client:
        return Client(self.socket, timeout_s=30)

    def async_client(self) -> AsyncClient:
        return AsyncClient(self.socket)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()


@pytest.fixture
def daemon(home: Home) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(home).start()
    yield proc
    proc.close()


@pytest.fixture
async def aclient(daemon: DaemonProcess) -> AsyncIterator[AsyncClient]:
    async with daemon.async_client() as client:
        yield client


def simagent(*args: str) -> list[str]:
    return [PYTHON, "-m", "supervisord.simagent", *args]


def agent_script(name: str, *args: str) -> list[str]:
    return [PYTHON, str(AGENTS / f"{name}.py"), *args]


class Events:
    """A live subscription, opened before the agents start so no event can be missed."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.seen: list[dict[str, Any]] = []
        self._iter: AsyncIterator[dict[str, Any]] | None = None

    async def start(self) -> Events:
        self._iter = await self.client.subscribe()
        return self

    async def next_matching(self, timeout_s: float, **fields: Any) -> dict[str, Any]:
        for event in self.seen:
            if all(event.get(k) == v for k, v in fields.items()):
                return event
        assert self._iter is not None
        with anyio.fail_after(timeout_s):
            async for event in self._iter:
                self.seen.append(event)
                if all(event.get(k) == v for k, v in fields.items()):
                    return event
        raise AssertionError(f"subscription ended before an event with {fields}")

    async def exit_of(self, subprocess_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
        return await self.next_matching(timeout_s, type="exit", subprocess_id=subprocess_id)

    def alerts_of(self, subprocess_id: str) -> list[str]:
        return [
            e["event"]
            for e in self.seen
            if e.get("type") == "alert" and e.get("subprocess_id") == subprocess_id
        ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def wait_output(home: Home, subprocess_id: str, text: str, timeout_s: float = 10.0) -> None:
    """Until the agent's log shows ``text`` (a test agent prints once its handlers are set)."""
    path = home.agent_log(subprocess_id)
    with anyio.fail_after(timeout_s):
        while not (path.exists() and text in path.read_text(errors="replace")):
            await anyio.sleep(0.02)


def in_ci() -> bool:
    """CI runs the suite with CI=true (.ci/run), where every test must really run."""
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with ``reason`` on a developer's machine; under CI fail with it, since a skip there
    would leave a path untested while the build looks green."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this must not be skipped)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, why: str) -> str:
    """The path of the external tool ``name`` a test drives for real; ``why`` says what for.

    A missing tool skips the test locally (the reason is printed with -ra) and fails in CI."""
    # Also the usual places: CI environments sometimes run with a minimal PATH.
    usual = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    found = shutil.which(name) or shutil.which(name, path=usual)
    if found is None:
        skip_or_fail(f"{name} is not installed, needed for {why} (.ci/run installs it)")
    return found
