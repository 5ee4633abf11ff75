"""``claude-pm completion``: the scripts it prints, sourced by the real bash, zsh and fish,
completing commands, and subprocess ids from a real daemon with real agents."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.orchestrate import tab_env
from supervisord.cli import handlers, main
from supervisord.config.home import Home
from supervisord.control.client import Client
from supervisord.observe import reports
from tests.conftest import DaemonProcess, require_tool, write_config

CLAUDE_PM = Path(sys.executable).parent / "claude-pm"
# One completion runs Python once; a hung daemon costs at most 0.5 s per socket operation.
PROMPT_S = 5.0
ST = ["status", "stats", "stop"]

# Sources the script, then calls the function it registered as bash does at a TAB.
BASH_COMPLETE = r"""
source "$1"
spec=$(complete -p claude-pm)
function=${spec##* -F }
function=${function%% *}
COMP_LINE=$2
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_TYPE=9
"$function" claude-pm "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""
# An interactive zsh on a pseudo-terminal, compinit loading the script from fpath: the line is
# typed and TAB pressed, then the terminal read until it shows pattern $3 (at most 5 s) and
# has been quiet for 0.2 s. (Typeahead would make zsh skip the listing: nothing more is typed.)
ZSH_COMPLETE = r"""
zmodload zsh/zpty zsh/zselect zsh/datetime
zpty shell zsh -f -i
fd=$REPLY
zpty -w shell "PS1='> '; fpath=(${(q)1} \$fpath); autoload -U compinit; compinit -u -D"
zpty -w -n shell "$2"$'\t'
out=
deadline=$(( EPOCHREALTIME + 5 ))
while [[ $out != $~3 ]] && (( EPOCHREALTIME < deadline )); do
    zselect -t 10 -r $fd && zpty -rt shell chunk && out+=$chunk
done
while zselect -t 20 -r $fd && zpty -rt shell chunk; do out+=$chunk; done
print -r -- "$out"
zpty -d shell
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\r\x07]")


@dataclass
class Place:
    """A home for the completions to look at, and the scripts, the shells' own files beside."""

    home: Home
    scratch: Path

    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_PM_", "_ARC", "COMP_"))
        }
        scratch = str(self.scratch)
        return {
            **env,
            "CLAUDE_PM_HOME": str(self.home.root),
            "PATH": f"{CLAUDE_PM.parent}{os.pathsep}{env.get('PATH', '')}",
            "HOME": scratch,
            "XDG_CONFIG_HOME": scratch,
            "XDG_DATA_HOME": scratch,
        }

    def script(self, shell: str) -> Path:
        path = self.scratch / ("_claude-pm" if shell == "zsh" else f"claude-pm.{shell}")
        if not path.exists():
            done = subprocess.run(
                [CLAUDE_PM, "completion", shell],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=PROMPT_S,
                check=True,
            )
            path.write_text(done.stdout)
        return path

    def bash(self, line: str) -> list[str]:
        """What bash would offer at a TAB after ``line`` (a unique one: without its space)."""
        bash = require_tool("bash", "bash completion")
        script = str(self.script("bash"))
        out = self._run(bash, "--norc", "--noprofile", "-c", BASH_COMPLETE, "bash", script, line)
        return [word.strip() for word in out.splitlines() if word.strip()]

    def fish(self, line: str) -> dict[str, str]:
        """Candidate -> description, from fish's own completion engine."""
        fish = require_tool("fish", "fish's completion engine")
        out = self._run(
            fish, "--no-config", "-c", f"source {self.script('fish')}; complete -C {line!r}"
        )
        rows = (row.partition("\t") for row in out.splitlines() if row)
        return {candidate: description for candidate, _, description in rows}

    def zsh(self, line: str, until: str) -> str:
        """The terminal's text, escapes removed, after typing ``line`` and TAB, once it shows
        ``until`` (a zsh pattern)."""
        zsh = require_tool("zsh", "zsh completion")
        fpath = str(self.script("zsh").parent)
        return ANSI.sub("", self._run(zsh, "-f", "-c", ZSH_COMPLETE, "zsh", fpath, line, until))

    def _run(self, *argv: str) -> str:
        done = subprocess.run(
            argv,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROMPT_S * 2,
            check=False,
        )
        assert done.returncode == 0, (argv, done.returncode, done.stdout, done.stderr)
        return done.stdout


@contextmanager
def _place() -> Iterator[Place]:
    scratch = Path(tempfile.mkdtemp(prefix="cpm-", dir="/tmp"))
    home = Home(scratch / ".claude-pm")
    write_config(home)
    try:
        yield Place(home, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def idle() -> Iterator[Place]:
    """A home no daemon serves."""
    with _place() as place:
        yield place


@dataclass
class Fleet:
    place: Place
    running: str  # sleeps, under supervision
    waiting: str  # launched --after the running one
    ended: str  # has exited: only its output log is left


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """One daemon for the module, serving an agent of each kind the completers tell apart."""
    with _place() as place:
        daemon = DaemonProcess(place.home).start()
        try:
            with Client(daemon.socket, timeout_s=10) as client:
                ended = client.launch("done", ["echo", "done"], force=True)["subprocess_id"]
                _wait_gone(client, ended)
                running = client.launch("sleepy", ["sleep", "60"], force=True)["subprocess_id"]
                waiting = client.launch("later", ["true"], after=[running])["subprocess_id"]
            yield Fleet(place, running, waiting, ended)
            with Client(daemon.socket, timeout_s=10) as client:
                client.cancel(waiting)
                client.kill(running)
        finally:
            daemon.close()


def _wait_gone(client: Client, subprocess_id: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(a["subprocess_id"] == subprocess_id for a in client.status()["agents"]):
        assert time.monotonic() < deadline, f"{subprocess_id} still running"
        time.sleep(0.05)


def _direct(place: Place, line: str) -> tuple[subprocess.CompletedProcess[str], str, float]:
    """``claude-pm`` run as the scripts run it at a TAB, candidates written to a file."""
    out = place.scratch / "candidates"
    env = tab_env(place.env(), line, out)
    start = time.monotonic()
    done = subprocess.run(
        [CLAUDE_PM],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PROMPT_S,
        check=False,
    )
    return done, out.read_text(), time.monotonic() - start


# -- bash --------------------------------------------------------------------------------------


def test_bash_completes_the_commands_a_prefix_starts(idle: Place) -> None:
    assert idle.bash("claude-pm st") == ST
    assert idle.bash("claude-pm completion ") == ["bash", "zsh", "fish"]
    assert idle.bash("claude-pm report g") == ["growth"]


def test_bash_completes_ids_from_the_daemon(fleet: Fleet) -> None:
    bash = fleet.place.bash
    for command in ("stop", "kill", "restart", "unwatch", "stats"):
        assert bash(f"claude-pm {command} ") == [fleet.running], command
    assert bash("claude-pm cancel ") == [fleet.waiting]
    assert sorted(bash("claude-pm logs ")) == sorted([fleet.running, fleet.ended])
    assert sorted(bash("claude-pm report growth ")) == sorted([fleet.running, fleet.ended])
    assert bash("claude-pm report health ") == []
    assert sorted(bash("claude-pm launch x --after ")) == sorted([fleet.running, fleet.waiting])
    # A list of ids: the one after the last comma is completed.
    assert bash(f"claude-pm launch x --after {fleet.running},{fleet.waiting[:3]}") == [
        f"{fleet.running},{fleet.waiting}"
    ]


# -- fish --------------------------------------------------------------------------------------


def test_fish_completes_commands_with_their_help(idle: Place) -> None:
    candidates = idle.fish("claude-pm st")
    assert sorted(candidates) == sorted(ST)
    assert candidates["stop"].startswith("stop an agent")


def test_fish_completes_running_ids_described(fleet: Fleet) -> None:
    candidates = fleet.place.fish("claude-pm stop ")
    assert list(candidates) == [fleet.running]
    assert re.fullmatch(r"sleepy, [0-9.]+ MB, OK", candidates[fleet.running])
    assert list(fleet.place.fish("claude-pm cancel ")) == [fleet.waiting]


# -- zsh ---------------------------------------------------------------------------------------


def test_zsh_script_is_valid_and_registers_claude_pm(idle: Place) -> None:
    zsh = require_tool("zsh", "zsh's syntax check")
    script = idle.script("zsh")
    assert script.read_text().startswith("#compdef claude-pm\n")
    checked = subprocess.run(
        [zsh, "-n", script], capture_output=True, text=True, timeout=PROMPT_S, check=False
    )
    assert checked.returncode == 0, checked.stderr


def test_zsh_lists_the_commands_a_prefix_starts(idle: Place) -> None:
    listing = idle.zsh("claude-pm st", "*stop*--*")
    assert re.findall(r"^(\S+) +-- ", listing, re.MULTILINE) == ST, listing


def test_zsh_inserts_the_only_running_id(fleet: Fleet) -> None:
    screen = fleet.place.zsh("claude-pm stop ", f"*{fleet.running}*")
    assert f"claude-pm stop {fleet.running}" in screen, screen


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["claude-pm stop ", "claude-pm cancel ", "claude-pm logs "])
def test_without_a_daemon_nothing_is_offered_at_once(idle: Place, line: str) -> None:
    done, candidates, _elapsed = _direct(idle, line)
    assert (done.returncode, candidates, done.stdout, done.stderr) == (0, "", "", "")
    assert idle.bash(line) == []


def test_a_daemon_that_never_answers_does_not_hang_the_shell(idle: Place) -> None:
    socket_path = idle.home.default_socket
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    # Listening but never accepting: connect succeeds (the backlog), no answer ever comes.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(socket_path))
        hung.listen(8)
        try:
            done, candidates, elapsed = _direct(idle, "claude-pm stop ")
        finally:
            socket_path.unlink()
    assert (done.returncode, candidates, done.stderr) == (0, "", "")
    assert elapsed < 3.0


def test_an_unknown_shell_is_a_usage_error_naming_the_choices(idle: Place) -> None:
    done = _completion_command(idle, "powershell")
    assert done.returncode == 2
    assert "argument SHELL: invalid choice: 'powershell'" in done.stderr
    assert re.search(r"choose from '?bash'?, '?zsh'?, '?fish'?", done.stderr), done.stderr


def test_help_says_how_to_install_it(idle: Place) -> None:
    done = _completion_command(idle, "--help")
    assert done.returncode == 0, done.stderr
    assert "source <(claude-pm completion bash)" in done.stdout
    assert "claude-pm completion zsh > ~/.zfunc/_claude-pm" in done.stdout
    assert "> ~/.config/fish/completions/claude-pm.fish" in done.stdout


# -- what keeps completion fast ----------------------------------------------------------------


def test_the_parser_imports_none_of_the_heavy_modules() -> None:
    """A TAB builds the parser: the handlers, psutil and anyio wait until a command runs."""
    heavy = ("supervisord.cli.handlers", "supervisord.control.client", "psutil", "anyio")
    probe = f"import sys, supervisord.cli.main; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_parser_knows_every_report_and_every_command_has_its_handler() -> None:
    assert main.REPORTS == reports.REPORTS
    sub = next(a for a in main.build_parser()._actions if a.dest == "command")
    assert sub.choices is not None
    missing = [name for name in sub.choices if not callable(getattr(handlers, f"cmd_{name}", None))]
    assert missing == []


def _completion_command(place: Place, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLAUDE_PM, "completion", *args],
        env=place.env(),
        capture_output=True,
        text=True,
        timeout=PROMPT_S,
        check=False,
    )
