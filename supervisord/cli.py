"""``claude-pm``: the command line. Only this module touches argv, stdout and exit codes.

Exit codes: 0 success, 1 the operation failed, 2 usage error, 3 daemon not running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from supervisord import __version__, background, render, reports
from supervisord.client import Client, resolve_socket
from supervisord.config import ENV_THRESHOLDS, environment_overrides, load_config
from supervisord.errors import (
    ConfigError,
    DaemonAlreadyRunning,
    DaemonNotRunning,
    NotFoundError,
    SupervisordError,
    UsageError,
)
from supervisord.home import Home, find_home

OK, FAILED, USAGE, NOT_RUNNING = 0, 1, 2, 3
Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    # `launch TYPE [OPTIONS] -- CMD ...`: everything after `--` is the agent's command, verbatim,
    # and the options before it are ours (argparse.REMAINDER would swallow them into CMD).
    command_tail: list[str] | None = None
    if args_list[:1] == ["launch"] and "--" in args_list:
        split = args_list.index("--")
        args_list, command_tail = args_list[:split], args_list[split + 1 :]
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help.
        return int(exc.code or 0)
    if command_tail is not None:
        args.cmd = [*args.cmd, *command_tail]
    handler: Handler = args.handler
    try:
        return handler(args)
    except DaemonNotRunning as exc:
        _error(str(exc))
        return NOT_RUNNING
    except (UsageError, ConfigError) as exc:
        _error(str(exc))
        return USAGE
    except SupervisordError as exc:
        _error(str(exc))
        return FAILED
    except KeyboardInterrupt:
        return FAILED
    except BrokenPipeError:  # `claude-pm events --follow | head` closed our stdout.
        return OK


def daemon_main() -> int:
    """``claude-pm-supervisord``: identical to ``claude-pm daemon``."""
    return main(["daemon", *sys.argv[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claude-pm",
        description="Supervise AI-agent process trees and stop runaway memory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("init", cmd_init, "create the home and config; start the daemon if not running")
    p.add_argument("--no-start", action="store_true", help="only create the home and config")
    p = add("daemon", cmd_daemon, "run the daemon in the foreground")
    p.add_argument("--detach", action="store_true", help="fork into the background once ready")
    p = add("status", cmd_status, "daemon, thresholds, system memory and agents")
    p.add_argument("--json", action="store_true")
    p = add("launch", cmd_launch, "launch an agent under supervision; prints its subprocess_id")
    p.add_argument("agent_type", metavar="TYPE")
    p.add_argument("--warning-mb", type=_positive, metavar="N")
    p.add_argument("--critical-mb", type=_positive, metavar="N")
    p.add_argument("--max-mb", type=_positive, metavar="N")
    p.add_argument("--timeout", type=_positive, metavar="S", help="seconds before it is stopped")
    p.add_argument("--grace", type=_non_negative, metavar="S", help="SIGTERM to SIGKILL, seconds")
    p.add_argument("--cwd", metavar="DIR")
    p.add_argument("--env", action="append", default=[], metavar="K=V", type=_env_pair)
    p.add_argument("--task", help="task text for the type's [agents.TYPE] command template")
    p.add_argument("--force", action="store_true", help="launch even when memory is short")
    p.add_argument("--wait", action="store_true", help="wait for it to end; print its record")
    p.add_argument("--json", action="store_true")
    p.add_argument("cmd", nargs="*", metavar="-- CMD [ARG ...]")
    p = add("stats", cmd_stats, "statistics of all agents, or of one")
    p.add_argument("subprocess_id", nargs="?", metavar="ID")
    p.add_argument("--json", action="store_true")
    p = add("stop", cmd_stop, "stop an agent: SIGTERM its tree, SIGKILL what remains after grace")
    p.add_argument("subprocess_id", metavar="ID")
    p.add_argument("--grace", type=_non_negative, metavar="S")
    p.add_argument("--json", action="store_true")
    p = add("kill", cmd_kill, "SIGKILL an agent's whole tree now")
    p.add_argument("subprocess_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p = add("events", cmd_events, "alert history; --follow streams alerts and exits live")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--level", type=str.upper, choices=["WARNING", "CRITICAL"])
    p.add_argument("--json", action="store_true")
    p = add("logs", cmd_logs, "an agent's output")
    p.add_argument("subprocess_id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true")
    p = add("report", cmd_report, "analyses of the logs (no daemon needed)")
    p.add_argument("name", choices=reports.REPORTS)
    p.add_argument("subprocess_id", nargs="?", metavar="ID", help="for growth: one agent")
    p.add_argument("--json", action="store_true")
    add("reload", cmd_reload, "re-read config and CLAUDE_PM_* variables; apply to running agents")
    p = add("shutdown", cmd_shutdown, "stop the daemon (and its agents, unless --leave-agents)")
    p.add_argument("--leave-agents", action="store_true")
    p.add_argument("--no-wait", action="store_true", help="return without waiting for the exit")
    add("demo", cmd_demo, "a self-contained run that shows the whole escalation")
    p = add("top", cmd_top, "live view of system memory and every agent (q quits)")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S", help="refresh, seconds")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    return parser


# -- argument types ----------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def _non_negative(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _positive(text)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not K=V")
    return key, value


# -- commands ----------------------------------------------------------------------------------


def _home() -> Home:
    return Home(find_home())


def _client() -> Client:
    return Client(resolve_socket(_home()))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _error(message: str) -> None:
    print(f"claude-pm: {message}", file=sys.stderr)


def cmd_init(args: argparse.Namespace) -> int:
    home = _home()
    if background.ensure_home(home):
        print(f"wrote {home.config_file}")
    load_config(home.config_file)  # Refuse a broken config here, with its message.
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
    wanted = load_config(home.config_file).limits.as_dict()
    wanted["check_interval_s"] = load_config(home.config_file).check_interval_s
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
        _error(str(exc))
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
    limits = {
        key: value
        for key, value in (
            ("warning_mb", args.warning_mb),
            ("critical_mb", args.critical_mb),
            ("max_mb", args.max_mb),
            ("term_grace_s", args.grace),
        )
        if value is not None
    }
    with _client() as client:
        launch_kw: dict[str, Any] = {
            "task": args.task,
            "cwd": args.cwd,
            "env": dict(args.env) or None,
            "limits": limits or None,
            "timeout_s": args.timeout,
            "force": args.force or None,
        }
        if not args.wait:
            result = client.launch(args.agent_type, command or None, **launch_kw)
            _print_json(result) if args.json else print(result["subprocess_id"])
            return OK
        return _launch_and_wait(client, args, command, launch_kw)


def _launch_and_wait(
    client: Client, args: argparse.Namespace, command: list[str], launch_kw: dict[str, Any]
) -> int:
    # Subscribe first, on a second connection, so the exit cannot slip by before we listen.
    with Client(client.socket_path, timeout_s=None) as watcher:
        events = watcher.subscribe(types=["exit"])
        result = client.launch(args.agent_type, command or None, **launch_kw)
        if not args.json:
            print(result["subprocess_id"], flush=True)
        for event in events:
            if event.get("subprocess_id") == result["subprocess_id"]:
                _print_json(event) if args.json else print(render.record(event))
                ok = event["reason"] == "exited" and event["exit_code"] == 0
                return OK if ok else FAILED
    raise DaemonNotRunning("the daemon went away before the agent ended")


def cmd_stats(args: argparse.Namespace) -> int:
    with _client() as client:
        result = client.stats(args.subprocess_id)
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
        _error(str(exc))
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
    home = _home()
    while background.running_pid(home) == pid:
        time.sleep(0.1)
    # It stops answering first, then stops its agents; its lock goes last, once it is gone.
    background.wait_for_lock(home)
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
            if args.level and event.get("type") != "alert":
                continue
            _emit(event, args.json)
    return OK


def _alert_history(path: Path) -> list[dict[str, Any]]:
    problems: list[str] = []
    records = [record for _, record in reports.iter_records(path, problems)]
    for problem in problems:
        _error(problem)
    return records


def _emit(event: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(event) if as_json else render.event(event), flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    home = _home()
    path = home.agent_log(args.subprocess_id)
    if not path.exists():
        raise NotFoundError(f"no output log for {args.subprocess_id} at {path}")
    with open(path, "rb") as f:
        sys.stdout.buffer.write(f.read())
        sys.stdout.flush()
        if not args.follow:
            return OK
        client = Client(resolve_socket(home))
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            try:
                client.stats(args.subprocess_id)
            except (NotFoundError, DaemonNotRunning):
                sys.stdout.buffer.write(f.read())
                return OK
            time.sleep(0.2)


def cmd_report(args: argparse.Namespace) -> int:
    result = reports.run_report(args.name, _home().logs, subprocess_id=args.subprocess_id)
    if args.json:
        _print_json(result.data)
    else:
        print(result.text)
    return OK


def cmd_top(args: argparse.Namespace) -> int:
    from supervisord import top

    return top.main(resolve_socket(_home()), interval_s=args.interval, once=args.once)


def cmd_demo(args: argparse.Namespace) -> int:
    from supervisord import demo

    return demo.run()
