"""What each ``claude-pm`` command does: parsed arguments -> client call -> rendering."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisord.cli import render
from supervisord.config.home import Home, find_home
from supervisord.config.settings import ENV_THRESHOLDS, environment_overrides, load_config
from supervisord.control import background
from supervisord.control.client import Client, resolve_socket
from supervisord.core.errors import (
    DaemonAlreadyRunning,
    DaemonNotRunning,
    NotFoundError,
    UsageError,
)
from supervisord.core.identity import MARKER_ENV, TYPE_ENV
from supervisord.core.kinds import EventType
from supervisord.host import watching
from supervisord.host.sysmem import enclosing_mb
from supervisord.observe import logread, reports

OK, FAILED, USAGE, NOT_RUNNING = 0, 1, 2, 3
COMMAND_NOT_FOUND = 127  # what a shell gives for a missing executable
Handler = Callable[[argparse.Namespace], int]
# launch's restart flags (argparse's names) -> the restart keys of the protocol and config.
RESTART_FLAGS = {
    "restart": "restart",
    "restart_delay": "restart_delay_s",
    "restart_backoff": "restart_backoff",
    "restart_delay_max": "restart_delay_max_s",
    "restart_limit": "restart_limit",
    "restart_window": "restart_window_s",
    "restart_reset": "restart_reset_s",
    "resume_command": "resume_command",
    "session_pattern": "session_pattern",
}


def _home() -> Home:
    return Home(find_home())


def _client() -> Client:
    return Client(resolve_socket(_home()))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def error(message: str) -> None:
    print(f"claude-pm: {message}", file=sys.stderr)


def cmd_init(args: argparse.Namespace) -> int:
    home = _home()
    if background.ensure_home(home):
        print(f"wrote {home.config_file}")
    load_config(
        home.config_file, enclosing_mb=enclosing_mb()
    )  # Refuse a broken config here, with its message.
    if args.no_start:
        print(f"home ready at {home.root}")
        return OK
    started = background.start_daemon(home)
    if not started.already_running:
        print(f"daemon started (pid {started.pid}), socket {started.socket_path}")
        return OK
    print(f"daemon already running (pid {started.pid}), socket {started.socket_path}")
    differences = _threshold_drift(home)
    if differences:
        print(
            "your environment asks for thresholds the daemon does not use: "
            + ", ".join(differences)
        )
        print("run `claude-pm reload` to apply them to the daemon and its running agents")
    return OK


def _threshold_drift(home: Home) -> list[str]:
    """Thresholds this shell's CLAUDE_PM_* variables set that the running daemon lacks."""
    with Client(resolve_socket(home)) as client:
        memory = client.status()["config"]["memory"]
    wanted = load_config(home.config_file, enclosing_mb=enclosing_mb()).limits.as_dict()
    wanted["check_interval_s"] = load_config(
        home.config_file, enclosing_mb=enclosing_mb()
    ).daemon.check_interval_s
    drift = []
    for var, key in ENV_THRESHOLDS.items():
        if var in environment_overrides() and float(memory[key]) != float(wanted[key]):
            drift.append(f"{key} {memory[key]:g} (daemon) vs {wanted[key]:g} ({var})")
    return drift


def cmd_daemon(args: argparse.Namespace) -> int:
    from supervisord import entry

    try:
        return entry.run(detach=args.detach)
    except DaemonAlreadyRunning as exc:
        error(str(exc))
        return FAILED


def cmd_status(args: argparse.Namespace) -> int:
    with _client() as client:
        result = client.status()
    if args.json:
        _print_json(result)
    else:
        print(render.status(result))
    return OK


def cmd_launch(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command and args.task is None:
        raise UsageError("launch: give a command after `--`, or --task for the type's template")
    limits = _limits(args)
    launch_kw: dict[str, Any] = {
        "task": args.task,
        "cwd": args.cwd,
        "env": dict(args.env) or None,
        "limits": limits or None,
        "timeout_s": args.timeout,
        "force": args.force or None,
        "request_mb": args.request_mb,
        "priority": args.priority,
        "on_pressure": args.on_pressure,
        "no_queue": args.no_queue or None,
        "restart": {
            key: getattr(args, flag)
            for flag, key in RESTART_FLAGS.items()
            if getattr(args, flag) is not None
        },
        "after": [sid for ids in args.after for sid in ids],
    }
    with _client() as client:
        if not args.wait:
            result = client.launch(args.agent_type, command or None, **launch_kw)
            _print_json(result) if args.json else print(render.launched(result))
            return OK

        def launched(result: dict[str, Any]) -> None:
            if not args.json:
                print(render.launched(result), flush=True)

        _, record = client.launch_and_wait(
            args.agent_type, command or None, on_launched=launched, **launch_kw
        )
    if record.get("type") == EventType.CANCELLED:
        _print_json(record) if args.json else error(
            f"{record['subprocess_id']} was cancelled while queued: {record['reason']}"
        )
        return FAILED
    _print_json(record) if args.json else print(render.record(record))
    ok = record["reason"] == "exited" and record["exit_code"] == 0
    return OK if ok else FAILED


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags given (launch's and watch's)."""
    return {
        key: value
        for key, value in (
            ("warning_mb", args.warning_mb),
            ("critical_mb", args.critical_mb),
            ("max_mb", args.max_mb),
            ("term_grace_s", args.grace),
        )
        if value is not None
    }


def cmd_run(args: argparse.Namespace) -> int:
    """Become CMD, in this very process, once the daemon supervises it: the terminal, job
    control, signals and the exit status are CMD's own, with no wrapper in between."""
    command = [arg for arg in args.cmd]
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("run: give the command after `--`: claude-pm run -- CMD [ARG ...]")
    executable = shutil.which(command[0])
    if executable is None:
        error(f"{command[0]}: command not found")
        return COMMAND_NOT_FOUND
    home = _home()
    background.ensure_home(home)
    agent_type = args.agent_type or watching.type_from_command(command)
    from supervisord.cli import container

    if container.is_init():
        limits = {**_limits(args), **({"timeout_s": args.timeout} if args.timeout else {})}
        return container.run_as_init(home, agent_type, [executable, *command[1:]], limits)
    background.start_daemon(home)
    with Client(resolve_socket(home)) as client:
        result = client.run(
            agent_type, command, limits=_limits(args) or None, timeout_s=args.timeout
        )
    os.environ[MARKER_ENV] = result["subprocess_id"]
    os.environ[TYPE_ENV] = agent_type
    sys.stdout.flush()
    os.execv(executable, command)


def cmd_watch(args: argparse.Namespace) -> int:
    with _client() as client:
        result = client.watch(
            args.pid, args.agent_type, limits=_limits(args) or None, timeout_s=args.timeout
        )
    if args.json:
        _print_json(result)
    else:
        print(result["subprocess_id"])
        if result["supervised_by"] == "proc":
            error("the kernel did not let its tree move into a memory cgroup: /proc alone")
    return OK


def cmd_unwatch(args: argparse.Namespace) -> int:
    with _client() as client:
        result = client.unwatch(args.subprocess_id)
    _print_json(result) if args.json else print(f"{result['subprocess_id']} let go")
    return OK


def cmd_restart(args: argparse.Namespace) -> int:
    """End the run, then say how the next began: started (its pid), queued, or not at all."""
    socket_path = resolve_socket(_home())
    wanted: list[str] = [EventType.RESTARTED, EventType.QUEUED, EventType.CANCELLED]
    with Client(socket_path, timeout_s=None) as watcher:
        events = watcher.subscribe(types=wanted)
        with Client(socket_path, timeout_s=None) as client:
            result = client.restart(args.subprocess_id, args.grace)
        for event in events:
            if event.get("subprocess_id") == args.subprocess_id:
                break
        else:
            raise DaemonNotRunning("the daemon went away before the next run began")
    if args.json:
        _print_json({**result, "next": event})
    elif event["type"] == EventType.RESTARTED:
        print(f"{args.subprocess_id} restarted: run {event['run']}, pid {event['pid']}")
    elif event["type"] == EventType.QUEUED:
        print(f"{args.subprocess_id}: run {result['run']} queued: {event['reason']}")
    else:
        error(f"{args.subprocess_id}: run {result['run']} did not start: {event['reason']}")
        return FAILED
    return OK


def cmd_queue(args: argparse.Namespace) -> int:
    with _client() as client:
        result = client.queue()
    _print_json(result) if args.json else print(render.queue(result))
    return OK


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        with _client() as client:
            result = client.cancel(args.subprocess_id)
    except NotFoundError as exc:
        error(str(exc))
        return FAILED
    _print_json(result) if args.json else print(f"{result['subprocess_id']} cancelled")
    return OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _client() as client:
        result = client.stats(args.subprocess_id, pss=args.pss)
    if args.json:
        _print_json(result)
    elif args.subprocess_id:
        print(render.agent(result))
    else:
        print(render.agents_table(result["agents"]))
    return OK


def _end(args: argparse.Namespace, call: Callable[[Client], dict[str, Any]]) -> int:
    try:
        with Client(resolve_socket(_home()), timeout_s=None) as client:
            record = call(client)
    except NotFoundError as exc:
        error(str(exc))
        return FAILED
    _print_json(record) if args.json else print(render.record(record))
    return OK


def cmd_stop(args: argparse.Namespace) -> int:
    return _end(args, lambda c: c.stop(args.subprocess_id, args.grace))


def cmd_kill(args: argparse.Namespace) -> int:
    return _end(args, lambda c: c.kill(args.subprocess_id))


def cmd_reload(args: argparse.Namespace) -> int:
    with _client() as client:
        result = client.reload()
    memory = result["config"]["memory"]
    print(
        f"reloaded: warning {memory['warning_mb']:g} MB, critical {memory['critical_mb']:g} MB, "
        f"max {memory['max_mb']:g} MB, every {memory['check_interval_s']:g} s"
    )
    return OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    with _client() as client:
        pid = client.hello()["pid"]
        result = client.shutdown(leave_agents=args.leave_agents)
    what = "leaving" if args.leave_agents else "stopping"
    print(f"daemon (pid {pid}) shutting down, {what} {result['agents']} agent(s)")
    if args.no_wait:
        return OK
    background.wait_stopped(_home(), pid)
    print("daemon stopped")
    return OK


def cmd_events(args: argparse.Namespace) -> int:
    home = _home()
    for record in _alert_history(home.alerts_log):
        if args.level is None or record.get("level") == args.level:
            _emit(record, args.json)
    if not args.follow:
        return OK
    with Client(resolve_socket(home), timeout_s=None) as client:
        levels = [args.level] if args.level else None
        for event in client.subscribe(levels=levels):
            if args.level and event.get("type") != EventType.ALERT:
                continue
            _emit(event, args.json)
    return OK


def _alert_history(path: Path) -> list[dict[str, Any]]:
    problems: list[str] = []
    records = [record for _, record in logread.iter_records(path, problems)]
    for problem in problems:
        error(problem)
    return records


def _emit(event: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(event) if as_json else render.event(event), flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    home = _home()
    path = home.agent_log(args.subprocess_id)
    if not path.exists():
        raise NotFoundError(f"no output log for {args.subprocess_id} at {path}")
    if not args.follow:
        with open(path, "rb") as f:
            _write(f.read())
        return OK
    Client(resolve_socket(home)).follow_log(args.subprocess_id, path, _write)
    return OK


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def cmd_report(args: argparse.Namespace) -> int:
    result = reports.run_report(args.name, _home().logs, subprocess_id=args.subprocess_id)
    if args.json:
        _print_json(result.data)
    else:
        print(result.text)
    return OK


def cmd_top(args: argparse.Namespace) -> int:
    from supervisord.observe import top

    return top.main(resolve_socket(_home()), interval_s=args.interval, once=args.once)


def cmd_demo(args: argparse.Namespace) -> int:
    from supervisord.cli import demo

    return demo.run()


def cmd_mcp(args: argparse.Namespace) -> int:
    # Imported here: the SDK is an optional extra, and the rest of the CLI must not need it.
    try:
        from supervisord.mcpserver import server
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("mcp"):
            raise
        error(
            "claude-pm mcp needs the MCP SDK: pip install 'claude-pm-supervisord[mcp]' "
            f"({exc.name} is not installed)"
        )
        return FAILED
    return server.main(_home())


def cmd_completion(args: argparse.Namespace) -> int:
    from supervisord.cli import completion

    sys.stdout.write(completion.script(args.shell))
    return OK
