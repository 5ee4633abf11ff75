"""The daemon as a systemd service: sd_notify messages, watchdog pings, socket activation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord.config.home import Home
from supervisord.control.client import Client
from tests.conftest import AGENTS, PYTHON, DaemonProcess, simagent

WAIT_S = 15.0


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_tmp / "notify"))
    sock.settimeout(WAIT_S)
    yield sock
    sock.close()


def messages_until(sock: socket.socket, wanted: str) -> list[dict[str, str]]:
    """Datagrams as dicts, up to and including the first that has ``wanted`` (KEY=VALUE)."""
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        seen.append(fields)
        key, value = wanted.split("=", 1)
        if fields.get(key) == value:
            return seen
    raise AssertionError(f"no {wanted} within {WAIT_S} s; got {seen}")


def test_ready_status_watchdog_and_stopping(
    home: Home, short_tmp: Path, notify: socket.socket
) -> None:
    daemon = DaemonProcess(
        home,
        env={
            "NOTIFY_SOCKET": str(short_tmp / "notify"),
            "WATCHDOG_USEC": "400000",  # ping every 0.2 s at the latest (half the interval)
        },
    )
    try:
        daemon.start()
        ready = messages_until(notify, "READY=1")
        # READY=1 came once the socket answered: start() could ping before returning.
        assert "listening on" in ready[-1].get("STATUS", "")
        with daemon.client() as client:
            client.launch("idle", simagent("--hold-mb", "1"))
        status = messages_until(notify, "STATUS=supervising 1 agent(s)")
        assert status
        pings = 0
        deadline = time.monotonic() + 2.0
        while pings < 3 and time.monotonic() < deadline:
            pings += notify.recv(4096).decode().count("WATCHDOG=1")
        assert pings >= 3, "the monitoring loop must ping the watchdog at its interval"
        daemon.signal(signal.SIGTERM)
        messages_until(notify, "STOPPING=1")
        assert daemon.wait(WAIT_S) == 0
    finally:
        daemon.close()


def test_agents_do_not_inherit_the_notify_socket(
    home: Home, short_tmp: Path, notify: socket.socket
) -> None:
    daemon = DaemonProcess(home, env={"NOTIFY_SOCKET": str(short_tmp / "notify")})
    try:
        daemon.start()
        with daemon.client() as client:
            agent = client.launch("idle", simagent("--hold-mb", "1"))
        environ = Path(f"/proc/{agent['pid']}/environ").read_bytes().split(b"\0")
        assert not [e for e in environ if e.startswith((b"NOTIFY_SOCKET=", b"LISTEN_"))]
    finally:
        daemon.close()


def test_socket_activation_with_an_inherited_listener(home: Home) -> None:
    """The socket unit's contract: systemd binds, the daemon accepts on fd 3 and leaves the
    file alone (it is systemd's); with no daemon running the socket still exists."""
    path = home.default_socket
    home.run.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PM_")}
    env["CLAUDE_PM_HOME"] = str(home.root)
    proc = subprocess.Popen(
        [
            PYTHON,
            str(AGENTS / "activator.py"),
            str(listener.fileno()),
            "--",
            PYTHON,
            "-m",
            "supervisord",
            "daemon",
        ],
        pass_fds=[listener.fileno()],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    listener.close()  # only the daemon holds it now, as with systemd's copy
    inode = path.stat().st_ino
    try:
        # A client may connect before the daemon is up: the kernel queues it on the socket.
        with Client(path, timeout_s=WAIT_S) as client:
            hello = client.hello()
            assert hello["pid"] == proc.pid
            status = client.status()
        assert status["daemon"]["socket"] == str(path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        assert path.exists()
        assert path.stat().st_ino == inode
        log = [json.loads(line) for line in home.daemon_log.read_text().splitlines()]
        assert any(r["event"] == "daemon_started" and r["socket"] == str(path) for r in log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        if proc.stderr is not None:
            proc.stderr.close()
