"""The systemd and launchd units, and the sd_notify / socket-activation client they rely on."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from supervisord.host import sdnotify
from supervisord.host.sdnotify import Notifier
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = ROOT / "systemd"
PLIST = ROOT / "launchd" / "com.claude-pm.supervisord.plist"
SYSTEM_UNITS = ["claude-pm-supervisord.service", "claude-pm-supervisord.socket"]
USER_UNITS = ["claude-pm-supervisord-user.service", "claude-pm-supervisord-user.socket"]
WAIT_S = 10.0


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory under /tmp: AF_UNIX paths are limited to 107 bytes, tmp_path often is not."""
    path = Path(tempfile.mkdtemp(prefix="cpm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _systemd_analyze() -> str:
    exe = require_tool("systemd-analyze", "verifying the unit files (`apt-get install systemd`)")
    version = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=WAIT_S, check=False
    )
    assert version.returncode == 0, f"`systemd-analyze --version` failed: {version.stderr}"
    return exe


def _real_daemon_executable() -> str:
    # The installed console script when the package is installed into this venv, so verify
    # also checks that ExecStart names something executable; /bin/true before installation.
    script = Path(sys.executable).parent / "claude-pm-supervisord"
    return str(script) if os.access(script, os.X_OK) else "/bin/true"


@pytest.fixture
def verifiable_units(short_tmp: Path) -> Path:
    """The units copied to a temp dir with ExecStart pointing at a binary that exists here."""
    exe = _real_daemon_executable()
    for unit in SYSTEMD_DIR.iterdir():
        text = unit.read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.MULTILINE)
        (short_tmp / unit.name).write_text(text)
    return short_tmp


# --------------------------------------------------------------------------- systemd units


def test_unit_files_present() -> None:
    assert sorted(p.name for p in SYSTEMD_DIR.iterdir()) == sorted(SYSTEM_UNITS + USER_UNITS)


@pytest.mark.parametrize("unit", SYSTEM_UNITS + USER_UNITS)
def test_systemd_analyze_verify(unit: str, verifiable_units: Path, short_tmp: Path) -> None:
    exe = _systemd_analyze()
    command = [exe]
    env = dict(os.environ)
    if unit in USER_UNITS:
        # A user manager needs a runtime directory even to verify; containers have none.
        runtime = short_tmp / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        command.append("--user")
    command += ["verify", str(verifiable_units / unit)]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    # verify exits 0 on unknown keys and unparsable values, only warning: fail on those too.
    ours = [
        line
        for line in output.splitlines()
        if str(verifiable_units) in line or "claude-pm-supervisord" in line
    ]
    assert result.returncode == 0, output
    assert ours == [], output


@pytest.mark.parametrize("unit", ["claude-pm-supervisord.service", USER_UNITS[0]])
def test_service_settings(unit: str) -> None:
    settings = _unit_settings(SYSTEMD_DIR / unit)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/claude-pm-supervisord",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed",
        "TimeoutStopSec": "30",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "2",
        "Delegate": "yes",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    home = "/var/lib/claude-pm/.claude-pm" if unit in SYSTEM_UNITS else "%h/.claude-pm"
    assert settings["Environment"] == [f"CLAUDE_PM_HOME={home}"]
    assert "OOMScoreAdjust" in settings
    if unit in SYSTEM_UNITS:
        assert settings["OOMScoreAdjust"] == ["-500"]
        # Agents run as other users in their homes and may use sudo or bubblewrap.
        for forbidden in ("ProtectHome", "PrivateTmp", "NoNewPrivileges", "RestrictNamespaces"):
            assert forbidden not in settings, forbidden
        assert settings.get("ProtectSystem") in (None, ["full"], ["yes"])


@pytest.mark.parametrize(
    ("unit", "path"),
    [
        ("claude-pm-supervisord.socket", "/var/lib/claude-pm/.claude-pm/run/supervisord.sock"),
        ("claude-pm-supervisord-user.socket", "%h/.claude-pm/run/supervisord.sock"),
    ],
)
def test_socket_settings(unit: str, path: str) -> None:
    settings = _unit_settings(SYSTEMD_DIR / unit)
    assert settings["ListenStream"] == [path]
    assert settings["SocketMode"] == ["0600"]
    assert settings["DirectoryMode"] == ["0700"]
    # The socket activates the service of the same name; that pairing is the only link.
    assert (SYSTEMD_DIR / unit.replace(".socket", ".service")).is_file()
    assert "Service" not in settings


# --------------------------------------------------------------------------- launchd


def test_launchd_plist() -> None:
    with PLIST.open("rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "com.claude-pm.supervisord"
    assert PLIST.name == plist["Label"] + ".plist"
    assert plist["ProgramArguments"] == ["/usr/local/bin/claude-pm-supervisord"]
    assert plist["RunAtLoad"] is True
    # Restart after a crash, not after a requested shutdown.
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["EnvironmentVariables"]["CLAUDE_PM_HOME"] == "__HOME__/.claude-pm"
    assert "/usr/local/bin" in plist["EnvironmentVariables"]["PATH"].split(":")
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith("__HOME__/"), key
    assert plist["ExitTimeOut"] >= 30


# --------------------------------------------------------------------------- sd_notify


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, named by NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        if request.param == "path":
            address = str(short_tmp / "notify.sock")
            receiver.bind(address)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
        else:
            name = f"claude-pm-test-{uuid.uuid4().hex}"
            receiver.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        receiver.settimeout(WAIT_S)
        yield receiver


def _assert_nothing_queued(receiver: socket.socket) -> None:
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(4096)


def test_notifier_messages(notify_socket: socket.socket) -> None:
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.ready("serving /tmp/x.sock")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving /tmp/x.sock\n"
    assert notifier.ready()
    assert notify_socket.recv(4096) == b"READY=1\n"
    assert notifier.status("3 agents, 812.4 MB")
    assert notify_socket.recv(4096) == b"STATUS=3 agents, 812.4 MB\n"
    assert notifier.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1\n"
    assert notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1\n"
    assert notifier.stopping("stopping 3 agents")
    assert notify_socket.recv(4096) == b"STOPPING=1\nSTATUS=stopping 3 agents\n"
    assert notifier.extend_timeout(2.5)
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000\n"
    assert notifier.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+\n", notify_socket.recv(4096))
    assert notifier.notify(MAINPID=42, STATUS="a\nb")
    # A newline in a value would start a forged field: it becomes a space.
    assert notify_socket.recv(4096) == b"MAINPID=42\nSTATUS=a b\n"
    _assert_nothing_queued(notify_socket)


def test_notifier_rejects_bad_field_name(notify_socket: socket.socket) -> None:
    with pytest.raises(ValueError, match="field name"):
        Notifier.from_env().notify(ready="1")
    _assert_nothing_queued(notify_socket)


def test_notifier_unset_environment(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = Notifier.from_env(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.ready()
    assert notify_socket.recv(4096) == b"READY=1\n"


def test_notifier_absent_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env()
    assert not notifier.enabled
    with capture_logs() as logs:
        assert notifier.ready("x") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    assert logs == []


def test_notifier_unsupported_address_is_noop() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert [entry["event"] for entry in logs] == ["sd_notify_unsupported_address"]


def test_notifier_send_failure_is_logged_not_raised(short_tmp: Path) -> None:
    notifier = Notifier(str(short_tmp / "nobody-listens.sock"))
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("sd_notify_failed", "warning"),
        ("sd_notify_failed", "debug"),
    ]
    assert logs[0]["fields"] == ["READY"]
    # Once systemd is back the next message goes through and the recovery is logged.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(short_tmp / "nobody-listens.sock"))
        receiver.settimeout(WAIT_S)
        with capture_logs() as logs:
            assert notifier.watchdog() is True
        assert receiver.recv(4096) == b"WATCHDOG=1\n"
    assert [e["event"] for e in logs] == ["sd_notify_recovered"]


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({"WATCHDOG_PID": "{pid}"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    pid = os.getpid()
    environ = {k: v.format(pid=pid, other=pid + 1) for k, v in env.items()}
    assert sdnotify.watchdog_interval_s(environ) == expected
    assert environ.keys() == env.keys()


def test_watchdog_interval_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 20.0
    assert sdnotify.watchdog_interval_s(unset_environment=True) == 20.0
    assert "WATCHDOG_USEC" not in os.environ
    assert "WATCHDOG_PID" not in os.environ
    assert sdnotify.watchdog_interval_s() is None


# --------------------------------------------------------------------------- socket activation


def test_listen_fds_other_pid_is_ignored_and_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "control")
    assert sdnotify.listen_fds() == []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert name not in os.environ


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "many"},
        {"LISTEN_PID": "nobody", "LISTEN_FDS": "1"},
    ],
)
def test_listen_fds_nothing_passed(env: dict[str, str]) -> None:
    environ = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert sdnotify.listen_fds(environ) == []
    assert sdnotify.inherited_unix_listener(environ=dict(environ)) is None
    assert environ == {}


# The child a socket-activating service manager would start: it adopts the inherited
# listener, reports what it saw, then serves one echo connection.
_ACTIVATED_CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    from structlog.testing import capture_logs
    from supervisord.host import sdnotify

    expected = sys.argv[1] if len(sys.argv) > 1 else None
    with capture_logs() as logs:
        listener = sdnotify.inherited_unix_listener(expected)
    report = {
        "found": listener is not None,
        "fd": None if listener is None else listener.fileno(),
        "inheritable": None if listener is None else os.get_inheritable(listener.fileno()),
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "events": [(e["event"], e.get("name")) for e in logs],
    }
    sys.stdout.write(json.dumps(report) + "\\n")
    sys.stdout.flush()
    if listener is None:
        sys.exit(0)
    listener.settimeout(10)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        data = b""
        while not data.endswith(b"\\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"echo:" + data)
    listener.close()
    """
)

# Puts the passed sockets at fds 3, 4, ... and execs the child with LISTEN_PID set to its
# own pid, as systemd does between fork and exec (exec keeps the pid).
_ACTIVATOR = textwrap.dedent(
    """
    import os, sys
    fds = [int(fd) for fd in sys.argv[1].split(",")]
    names = sys.argv[2]
    # Stage every source fd above the 3.. range first, so no dup2 clobbers a later source.
    staged = []
    for i, fd in enumerate(fds):
        staged.append(os.dup2(fd, 100 + i))
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(staged):
        os.dup2(fd, 3 + i)  # inheritable by default
        os.close(fd)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
    if names:
        env["LISTEN_FDNAMES"] = names
    os.execve(sys.executable, [sys.executable, "-c", sys.argv[3], *sys.argv[4:]], env)
    """
)


def _activate(fds: list[int], names: str, child_args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _ACTIVATOR,
            ",".join(map(str, fds)),
            names,
            _ACTIVATED_CHILD,
            *child_args,
        ],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _echo_through(path: Path, proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        report: dict[str, object] = json.loads(line)
        if report["found"]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(WAIT_S)
                client.connect(str(path))
                client.sendall(b"hello\n")
                reply = b""
                while chunk := client.recv(4096):
                    reply += chunk
            report["reply"] = reply.decode()
        _, stderr = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, stderr
        return report
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=WAIT_S)


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


def test_socket_activation_end_to_end(short_tmp: Path) -> None:
    path = short_tmp / "supervisord.sock"
    with _listener(path) as listener:
        proc = _activate([listener.fileno()], "control", [])
    # The child holds the only copy now, so an answer can only come from it.
    report = _echo_through(path, proc)
    assert report == {
        "found": True,
        "fd": 3,
        "inheritable": False,
        "env_left": [],
        "events": [["listen_fd_adopted", "control"]],
        "reply": "echo:hello\n",
    }


def test_socket_activation_picks_the_unix_listener(short_tmp: Path) -> None:
    path = short_tmp / "supervisord.sock"
    # fd 3: a pipe (ListenFIFO= style), fd 4: a datagram socket, fd 5: a stream socket that
    # is not listening, fd 6: ours.
    read_end, write_end = os.pipe()
    try:
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle,
            _listener(path) as listener,
        ):
            fds = [read_end, dgram.fileno(), idle.fileno(), listener.fileno()]
            proc = _activate(fds, "fifo:notify:idle:control", [str(path)])
    finally:
        os.close(read_end)
        os.close(write_end)
    report = _echo_through(path, proc)
    assert report["fd"] == 6
    assert report["reply"] == "echo:hello\n"
    assert report["env_left"] == []
    # The others are closed, and said so: systemd keeps its own copies.
    assert report["events"] == [
        ["listen_fd_not_socket", "fifo"],
        ["listen_fd_unused", "notify"],
        ["listen_fd_unused", "idle"],
        ["listen_fd_adopted", "control"],
    ]


def test_socket_activation_wrong_path_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "supervisord.sock"
    with _listener(path) as listener:
        proc = _activate([listener.fileno()], "", [str(short_tmp / "elsewhere.sock")])
    report = _echo_through(path, proc)
    assert report["found"] is False
    assert report["env_left"] == []
    assert report["events"] == [["listen_fd_path_mismatch", "unknown"]]
