"""Who may use the daemon, and as whom agents run: checked by really dropping privileges.

CI runs as root, so each test forks a child that becomes ``nobody`` and talks to the daemon
from there (the venv's interpreter lives under /root, which nobody may not exec, so the
child keeps the already-loaded client code instead of starting a new Python).
"""

from __future__ import annotations

import json
import os
import pwd
import select
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from supervisord.config.home import Home
from supervisord.config.settings import ENV_DISABLE
from supervisord.control import authz
from supervisord.control.client import Client
from supervisord.core.errors import SupervisordError
from supervisord.core.identity import MARKER_ENV
from supervisord.core.limits import Limits
from tests.conftest import DaemonProcess, read_jsonl, write_config

NOBODY = pwd.getpwnam("nobody")
AGENT = ["/bin/sh", "-c", "id -u; id -g; exec sleep 60"]
# A child that wedges (a subscription that never ends) is killed by its own alarm.
CHILD_TIMEOUT_S = 30


def as_nobody(action: Callable[[], Any]) -> Any:
    """Run ``action`` in a forked child that dropped to nobody; its result or its error."""
    return as_nobody_with(lambda _handoff: action())


def as_nobody_with(
    action: Callable[[Callable[[], None]], Any], meanwhile: Callable[[], None] | None = None
) -> Any:
    """Like :func:`as_nobody`; when ``action`` calls its argument, ``meanwhile`` runs in the
    parent (as root), and the child carries on once it returns."""
    result_r, result_w = os.pipe()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        _nobody_child(action, result_w, ready_w, go_r)
    for fd in (result_w, ready_w, go_r):
        os.close(fd)
    try:
        if meanwhile is not None and _readable(ready_r) and os.read(ready_r, 1):
            meanwhile()
    finally:
        with suppress(BrokenPipeError):
            os.write(go_w, b"g")
        os.close(go_w)
        os.close(ready_r)
    data = _read_all(result_r) if _readable(result_r) else b""
    os.close(result_r)
    os.waitpid(pid, 0)
    assert data, "the child that dropped to nobody ended without a result"
    return json.loads(data)


def _nobody_child(
    action: Callable[[Callable[[], None]], Any], result_w: int, ready_w: int, go_r: int
) -> None:  # pragma: no cover - runs in the child
    # pytest-timeout's SIGALRM handler would carry on running the test session in here.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(CHILD_TIMEOUT_S)

    def handoff() -> None:
        os.write(ready_w, b"r")
        os.read(go_r, 1)

    try:
        os.setgroups([])
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)
        outcome: dict[str, Any] = {"result": action(handoff)}
    except SupervisordError as exc:
        outcome = {"error": exc.code, "message": str(exc)}
    except BaseException as exc:  # Whatever happens, the child must not return into pytest.
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    finally:
        with suppress(BaseException):
            os.write(result_w, json.dumps(outcome).encode())
        os._exit(0)


def _readable(fd: int) -> bool:
    ready, _, _ = select.select([fd], [], [], CHILD_TIMEOUT_S + 5)
    return bool(ready)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def attempt(call: Callable[[], Any]) -> dict[str, Any]:
    """One request's result or error, so a child can report several."""
    try:
        return {"result": call()}
    except SupervisordError as exc:
        return {"error": exc.code, "message": str(exc)}


def environ_of(pid: int) -> dict[str, str]:
    """Its environment, once readable: mid-exec (the cgroup shim becoming the agent) the
    kernel shows an empty one for a moment."""
    deadline = time.monotonic() + 5
    while True:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
        env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        if MARKER_ENV in env or time.monotonic() > deadline:
            return env
        time.sleep(0.01)


def denials(home: Home, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The daemon log's auth_denied lines, once there are at least ``count``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in read_jsonl(home.daemon_log) if r.get("event") == "auth_denied"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def shared_daemon(home: Home) -> Any:
    # "bounded" has a timeout in force, for the tests that try to loosen or remove it.
    write_config(
        home, daemon={"allowed_groups": ["nogroup"]}, agents={"bounded": {"timeout_s": 30}}
    )
    # nobody must be able to reach the socket: /tmp/cpm-*/ is 0700 from mkdtemp.
    os.chmod(home.root.parent, 0o755)
    daemon = DaemonProcess(home).start()
    yield daemon
    daemon.close()


def test_socket_and_run_dir_modes_for_an_allowed_group(shared_daemon: DaemonProcess) -> None:
    home = shared_daemon.home
    assert oct(home.default_socket.stat().st_mode & 0o777) == "0o660"
    assert home.default_socket.stat().st_gid == NOBODY.pw_gid
    assert oct(home.run.stat().st_mode & 0o777) == "0o710"


def test_root_daemon_runs_agents_as_the_requesting_user(shared_daemon: DaemonProcess) -> None:
    socket_path = shared_daemon.socket

    def launch() -> dict[str, Any]:
        with Client(socket_path) as client:
            return client.launch("mine", AGENT, cwd="/tmp", env={"TASK_NOTE": "theirs"})

    outcome = as_nobody(launch)
    assert "result" in outcome, outcome
    pid = outcome["result"]["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
    assert uid_line.split()[1:] == [str(NOBODY.pw_uid)] * 4
    assert gid_line.split()[1:] == [str(NOBODY.pw_gid)] * 4
    log = shared_daemon.home.agent_log(outcome["result"]["subprocess_id"])
    assert log.stat().st_uid == NOBODY.pw_uid
    # Their login's environment, never the root daemon's (its HOME, its CLAUDE_PM_HOME).
    env = environ_of(pid)
    assert env["HOME"] == NOBODY.pw_dir
    assert env["USER"] == env["LOGNAME"] == "nobody"
    assert env["SHELL"] == NOBODY.pw_shell
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert "CLAUDE_PM_HOME" not in env
    assert env["TASK_NOTE"] == "theirs"
    assert env[MARKER_ENV] == outcome["result"]["subprocess_id"]

    sid = outcome["result"]["subprocess_id"]

    def stop_own() -> dict[str, Any]:
        with Client(socket_path, timeout_s=30) as client:
            return client.stop(sid, grace_s=1)

    stopped = as_nobody(stop_own)
    assert stopped["result"]["reason"] == "stopped"


def test_a_user_may_not_end_someone_elses_agent(shared_daemon: DaemonProcess) -> None:
    with shared_daemon.client() as client:
        roots = client.launch("roots", AGENT)
    socket_path = shared_daemon.socket

    def kill() -> dict[str, Any]:
        with Client(socket_path) as client:
            return client.kill(roots["subprocess_id"])

    outcome = as_nobody(kill)
    assert outcome["error"] == "permission_denied"
    assert f"launched by uid {os.getuid()}" in outcome["message"]
    with shared_daemon.client() as client:
        assert client.stats(roots["subprocess_id"])["pid"] == roots["pid"]  # still running
        client.kill(roots["subprocess_id"])


def test_a_user_outside_the_allowed_groups_is_refused(daemon: DaemonProcess) -> None:
    # The default daemon allows no groups: even with the directory made reachable,
    # SO_PEERCRED refuses nobody before any command runs.
    os.chmod(daemon.home.root.parent, 0o755)
    os.chmod(daemon.home.run, 0o755)
    os.chmod(daemon.socket, 0o666)
    socket_path = daemon.socket

    def launch() -> dict[str, Any]:
        with Client(socket_path) as client:
            return client.launch("sneaky", AGENT, cwd="/tmp")

    try:
        outcome = as_nobody(launch)
    finally:
        os.chmod(daemon.home.run, 0o700)
        os.chmod(daemon.socket, 0o600)
    assert outcome["error"] == "permission_denied"
    with daemon.client() as client:
        assert client.stats()["agents"] == []


# -- authorisation: what a user may do that is not an administrator -------------------------


def test_a_user_may_not_reload_or_shut_down(shared_daemon: DaemonProcess) -> None:
    socket_path = shared_daemon.socket

    def administer() -> list[dict[str, Any]]:
        with Client(socket_path) as client:
            return [
                attempt(lambda: client.reload({ENV_DISABLE: "true"})),
                attempt(lambda: client.shutdown()),
            ]

    reload_, shutdown = as_nobody(administer)["result"]
    assert reload_["error"] == shutdown["error"] == "permission_denied"
    assert "uid 65534 may not reload this daemon; only root may" in reload_["message"]
    assert "may not shutdown" in shutdown["message"]
    with shared_daemon.client() as client:
        assert client.ping()  # still up
        status = client.status()
    assert status["monitoring"] == "enabled"
    assert status["config"]["monitoring_enabled"] is True
    logged = denials(shared_daemon.home, 2)
    assert [(r["uid"], r["cmd"], r["refused"]) for r in logged] == [
        (NOBODY.pw_uid, "reload", ["reload"]),
        (NOBODY.pw_uid, "shutdown", ["shutdown"]),
    ]
    assert all(r["level"] == "warning" and r["pid"] > 0 for r in logged)


LOOSER: dict[str, tuple[str, dict[str, Any]]] = {
    "enabled": ("mine", {"limits": {"enabled": False}}),
    "warning_mb": ("mine", {"limits": {"warning_mb": 120}}),
    "critical_mb": ("mine", {"limits": {"critical_mb": 180}}),
    "max_mb": ("mine", {"limits": {"max_mb": 10_000_000}}),
    "term_grace_s": ("mine", {"limits": {"term_grace_s": 30}}),
    "metric": ("mine", {"limits": {"metric": "pss"}}),
    "force": ("mine", {"force": True}),
    "timeout_s": ("bounded", {"timeout_s": 60}),
    "no timeout_s": ("bounded", {"limits": {"timeout_s": None}}),
}


def test_a_user_may_only_tighten_limits(shared_daemon: DaemonProcess) -> None:
    socket_path = shared_daemon.socket

    def launches() -> dict[str, Any]:
        with Client(socket_path) as client:

            def launch(agent_type: str, **kw: Any) -> dict[str, Any]:
                return attempt(lambda: client.launch(agent_type, AGENT, cwd="/tmp", **kw))

            refused = {name: launch(agent_type, **kw) for name, (agent_type, kw) in LOOSER.items()}
            allowed = launch("mine", limits={"max_mb": 150, "predict_s": 5})
            return {"refused": refused, "allowed": allowed}

    outcome = as_nobody(launches)["result"]
    for name, refused in outcome["refused"].items():
        assert refused.get("error") == "permission_denied", (name, refused)
        assert name.split()[-1] in refused["message"], (name, refused)
        assert "only root may (other users may only tighten limits)" in refused["message"]
    max_mb = outcome["refused"]["max_mb"]["message"]
    assert "uid 65534 may not raise max_mb above 200 MB in force" in max_mb
    assert "remove timeout_s (30 s in force)" in outcome["refused"]["no timeout_s"]["message"]
    sid = outcome["allowed"]["result"]["subprocess_id"]
    with shared_daemon.client() as client:
        limits = client.stats(sid)["limits"]
        assert [a["subprocess_id"] for a in client.stats()["agents"]] == [sid]  # none other
        client.kill(sid)
    # In force, with the thresholds that followed the lower max_mb below it.
    assert limits["max_mb"] == 150
    assert limits["critical_mb"] < 150
    assert limits["predict_s"] == 5
    logged = denials(shared_daemon.home, len(LOOSER))
    assert [r["cmd"] for r in logged] == ["launch"] * len(LOOSER)
    assert {"uid": NOBODY.pw_uid, "refused": ["max_mb"]}.items() <= logged[3].items()


def test_a_user_sees_and_ends_only_their_own_agents(shared_daemon: DaemonProcess) -> None:
    socket_path = shared_daemon.socket
    with shared_daemon.client() as client:
        roots = client.launch("roots", AGENT)["subprocess_id"]

    def look_and_end() -> dict[str, Any]:
        with Client(socket_path, timeout_s=30) as client:
            own = client.launch("mine", AGENT, cwd="/tmp")["subprocess_id"]
            return {
                "own": own,
                "stats": [a["subprocess_id"] for a in client.stats()["agents"]],
                "status": client.status(),
                "stats_of_roots": attempt(lambda: client.stats(roots)),
                "stop_roots": attempt(lambda: client.stop(roots, grace_s=1)),
                "kill_roots": attempt(lambda: client.kill(roots)),
                "long_grace": attempt(lambda: client.stop(own, grace_s=30)),
                "kill_own": attempt(lambda: client.kill(own)),
            }

    seen = as_nobody(look_and_end)["result"]
    own = seen["own"]
    assert seen["stats"] == [own]
    assert seen["status"]["agent_count"] == 1
    assert [row["subprocess_id"] for row in seen["status"]["agents"]] == [own]
    for key in ("stats_of_roots", "stop_roots", "kill_roots"):
        assert seen[key]["error"] == "permission_denied", seen[key]
        assert f"{roots}: it was launched by uid 0" in seen[key]["message"]
    assert "may not see" in seen["stats_of_roots"]["message"]
    # A grace beyond term_grace_s would hold off max_mb and timeout_s meanwhile.
    assert seen["long_grace"]["error"] == "permission_denied"
    assert "grace_s 30 s, beyond its term_grace_s 1 s" in seen["long_grace"]["message"]
    assert seen["kill_own"]["result"]["reason"] == "stopped"
    with shared_daemon.client() as client:
        agents = client.stats()["agents"]
        assert [a["subprocess_id"] for a in agents] == [roots]  # root sees it, still running
        # Root's own agents keep the daemon's environment.
        assert environ_of(agents[0]["pid"])["CLAUDE_PM_HOME"] == str(shared_daemon.home.root)
        client.kill(roots)


def test_a_user_hears_only_of_their_own_agents(shared_daemon: DaemonProcess) -> None:
    socket_path = shared_daemon.socket
    roots: list[str] = []

    def root_launches_and_kills() -> None:
        with shared_daemon.client() as client:
            roots.append(client.launch("roots", AGENT)["subprocess_id"])
            client.kill(roots[0])  # its exit is published before kill answers

    def listen(handoff: Callable[[], None]) -> dict[str, Any]:
        with Client(socket_path, timeout_s=30) as watcher, Client(socket_path) as client:
            events = watcher.subscribe(types=["launch", "exit"])
            own = client.launch("mine", AGENT, cwd="/tmp")["subprocess_id"]
            handoff()
            client.kill(own)
            heard = []
            for event in events:
                heard.append([event["type"], event["subprocess_id"]])
                if event["type"] == "exit" and event["subprocess_id"] == own:
                    return {"own": own, "heard": heard}
        raise AssertionError("the subscription ended early")

    outcome = as_nobody_with(listen, root_launches_and_kills)
    own = outcome["result"]["own"]
    assert roots, "root's agent never ran"
    assert outcome["result"]["heard"] == [["launch", own], ["exit", own]]


# -- authorisation: the decisions alone ---------------------------------------------------

IN_FORCE = Limits(warning_mb=100, critical_mb=150, max_mb=200, term_grace_s=1, timeout_s=30)


def test_tightening_is_no_weakening() -> None:
    tighter = Limits(
        warning_mb=50, critical_mb=75, max_mb=150, term_grace_s=0.5, timeout_s=10, predict_s=5
    )
    assert authz.weakened(IN_FORCE, tighter) == []
    assert authz.weakened(IN_FORCE, IN_FORCE) == []
    # Monitoring switched off by the administrator: a user turning it on tightens.
    off = Limits(enabled=False)
    assert authz.weakened(off, Limits()) == []


def test_each_loosened_limit_is_named() -> None:
    looser = Limits(
        warning_mb=120,
        critical_mb=180,
        max_mb=400,
        term_grace_s=9,
        timeout_s=None,
        enabled=False,
        metric="pss",
    )
    keys = [key for key, _ in authz.weakened(IN_FORCE, looser)]
    assert keys == [
        "enabled",
        "warning_mb",
        "critical_mb",
        "max_mb",
        "timeout_s",
        "term_grace_s",
        "metric",
    ]


def test_roles() -> None:
    assert authz.is_admin(0, daemon_uid=1000)
    assert authz.is_admin(1000, daemon_uid=1000)
    assert not authz.is_admin(65534, daemon_uid=1000)
    assert authz.command_denial(65534, "launch", daemon_uid=0) is None
    denial = authz.command_denial(65534, "reload", daemon_uid=1000)
    assert denial is not None
    assert denial.refused == ("reload",)
    assert "only root and the daemon's user (uid 1000) may" in denial.message
    # Commands nobody classified are for administrators only.
    assert authz.command_denial(65534, "something_new", daemon_uid=0) is not None
    assert authz.launch_denial(0, "x", IN_FORCE, Limits(max_mb=9999), force=True) is None
    assert authz.owner_filter(65534, daemon_uid=0) == 65534
    assert authz.owner_filter(0, daemon_uid=1000) is None


def test_a_user_may_not_restart_wait_for_or_churn_others_agents(
    shared_daemon: DaemonProcess,
) -> None:
    socket_path = shared_daemon.socket
    with shared_daemon.client() as client:
        roots = client.launch("roots", AGENT, restart={"restart": "always"})["subprocess_id"]
        between = client.launch(
            "flaky", ["false"], restart={"restart": "on-failure", "restart_delay_s": 60}
        )["subprocess_id"]
        deadline = time.monotonic() + 10
        while not client.queue()["restarting"]:
            assert time.monotonic() < deadline, "no restart became due"
            time.sleep(0.05)

    def try_them() -> dict[str, Any]:
        with Client(socket_path, timeout_s=30) as client:
            mine = {"cwd": "/tmp"}
            own = client.launch("mine", AGENT, restart={"restart": "always"}, **mine)
            return {
                "restart_roots": attempt(lambda: client.restart(roots)),
                "after_roots": attempt(lambda: client.launch("mine", AGENT, after=[roots], **mine)),
                "stop_between": attempt(lambda: client.stop(between)),
                "cancel_between": attempt(lambda: client.cancel(between)),
                "restart_between": attempt(lambda: client.restart(between)),
                "more_runs": attempt(
                    lambda: client.launch("mine", AGENT, restart={"restart_limit": 50}, **mine)
                ),
                "shorter_window": attempt(
                    lambda: client.launch("mine", AGENT, restart={"restart_window_s": 1}, **mine)
                ),
                "queue": client.queue(),
                "status": client.status(),
                "restart_own": attempt(lambda: client.restart(own["subprocess_id"])),
                "kill_own": attempt(lambda: client.kill(own["subprocess_id"])),
            }

    seen = as_nobody(try_them)["result"]
    for key, target in (
        ("restart_roots", roots),
        ("after_roots", roots),
        ("stop_between", between),
        ("cancel_between", between),
        ("restart_between", between),
    ):
        assert seen[key]["error"] == "permission_denied", (key, seen[key])
        assert f"{target}: it was launched by uid 0" in seen[key]["message"]
    assert "may not raise restart_limit above 5 in force" in seen["more_runs"]["message"]
    assert "may not shorten restart_window_s below 300 s" in seen["shorter_window"]["message"]
    assert seen["queue"]["restarting"] == []
    assert seen["status"]["restarting"] == []
    assert seen["restart_own"]["result"]["run"] == 2
    # Killed running its second run, or just before it began: no run comes after either way.
    assert seen["kill_own"]["result"]["next_restart_s"] is None
    with shared_daemon.client() as client:
        assert [r["subprocess_id"] for r in client.queue()["restarting"]] == [between]
        assert client.stats(roots)["run"] == 1  # not restarted by nobody
        client.stop(between)
        client.kill(roots)
