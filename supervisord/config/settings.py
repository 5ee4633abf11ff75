"""Configuration: built-in defaults < ``supervisord.toml`` < environment < agent type < launch.

Every value is validated where it is read; a bad one raises :class:`ConfigError` naming the
key, the value and what is allowed, so ``init`` and ``reload`` can refuse it whole.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from supervisord.config.cgroup import CgroupSettings
from supervisord.config.host import HostSettings
from supervisord.config.observe import AlertSettings, MetricsSettings, parse_alerts, parse_metrics
from supervisord.core.errors import ConfigError
from supervisord.core.limits import LIMIT_KEYS, METRICS, Limits
from supervisord.core.restart import RESTART_KEYS, RestartPolicy, apply_restart
from supervisord.core.scheduling import SCHEDULING_KEYS, Scheduling, apply_scheduling
from supervisord.core.validate import (
    boolean,
    group,
    integer,
    number,
    positive,
    reject_unknown,
    string,
    string_list,
    table_of,
)

AGENT_TYPE_RE = re.compile(r"[a-z][a-z0-9-]*")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})

ENV_THRESHOLDS = {
    "CLAUDE_PM_MEMORY_WARNING_MB": "warning_mb",
    "CLAUDE_PM_MEMORY_CRITICAL_MB": "critical_mb",
    "CLAUDE_PM_MEMORY_MAX_MB": "max_mb",
    "CLAUDE_PM_MEMORY_CHECK_INTERVAL": "check_interval_s",
}
ENV_DISABLE = "CLAUDE_PM_DISABLE_MEMORY_MONITOR"
ENV_VARIABLES = (*ENV_THRESHOLDS, ENV_DISABLE)
WARNING_RATIO = 0.25
CRITICAL_RATIO = 0.5


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """How the daemon runs: its socket, its logs and the limits it puts on clients."""

    socket: str | None = None
    log_max_bytes: int = 100 * 1024 * 1024
    log_backups: int = 5
    # Each agent's output log rotates past this (keeping log_backups of them).
    agent_log_max_bytes: int = 50 * 1024 * 1024
    max_line_bytes: int = 1024 * 1024
    max_connections: int = 256
    idle_timeout_s: float = 3600.0
    line_timeout_s: float = 10.0
    check_interval_s: float = 2.0
    min_interval_s: float = 0.05
    # At most one group: its members may use the daemon too, as users who may only tighten
    # limits and see and end their own agents (control/authz). One, because the socket is
    # 0660 owned by it and a file has one group. A root daemon runs their agents as them.
    # Empty: only the daemon's user and root.
    allowed_groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentType:
    """An ``[agents.<type>]`` section: how to start that kind of agent and its own limits."""

    name: str
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)
    scheduling: Scheduling = field(default_factory=Scheduling)
    restart: RestartPolicy = field(default_factory=RestartPolicy)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration in force."""

    limits: Limits = field(default_factory=Limits)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    agents: Mapping[str, AgentType] = field(default_factory=dict)
    sources: tuple[str, ...] = ("defaults",)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    cgroup: CgroupSettings = field(default_factory=CgroupSettings)
    host: HostSettings = field(default_factory=HostSettings)
    # The daemon's enclosing memory limit in MB (a container's, a slice's), for max_mb = "auto".
    enclosing_mb: float | None = None

    def agent_type(self, name: str) -> AgentType:
        validate_agent_type(name)
        return self.agents.get(name) or AgentType(name=name)

    def limits_for(self, agent_type: str, overrides: Mapping[str, Any] | None = None) -> Limits:
        """The limits of one launch: defaults, then the type's section, then the request's."""
        merged = _apply_limits(self.limits, self.agent_type(agent_type).limits, "")
        if overrides:
            resolved = resolve_auto(overrides, "limits", self.enclosing_mb)
            merged = _apply_limits(merged, resolved, "limits")
        return merged.validated(f"limits of {agent_type}")

    def scheduling_for(
        self, agent_type: str, overrides: Mapping[str, Any] | None = None
    ) -> Scheduling:
        """The type's request, priority and on_pressure, then the launch's own."""
        base = self.agent_type(agent_type).scheduling
        return apply_scheduling(base, overrides or {}, "launch") if overrides else base

    def restart_for(
        self, agent_type: str, overrides: Mapping[str, Any] | None = None
    ) -> RestartPolicy:
        """The type's restart policy, then the launch's own keys."""
        base = self.agent_type(agent_type).restart
        return apply_restart(base, overrides or {}, "launch") if overrides else base

    def public(self) -> dict[str, Any]:
        """What ``status`` reports as the config in force."""
        return {
            "memory": {**self.limits.as_dict(), "check_interval_s": self.daemon.check_interval_s},
            "monitoring_enabled": self.limits.enabled,
            "agent_types": sorted(self.agents),
            "sources": list(self.sources),
        }


def validate_agent_type(name: object) -> str:
    if not isinstance(name, str) or not AGENT_TYPE_RE.fullmatch(name):
        raise ConfigError(
            f"agent type {name!r} is not allowed; use lowercase letters, digits and '-', "
            "starting with a letter (e.g. 'engineer', 'qa-bot')"
        )
    return name


def load_config(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    *,
    enclosing_mb: float | None = None,
) -> Config:
    """Read ``path`` (absent is fine) and the environment into a validated :class:`Config`.

    ``enclosing_mb``: the memory limit around the daemon, which ``max_mb = "auto"`` takes 90%
    of (None: no limit, and "auto" is refused)."""
    env = os.environ if environ is None else environ
    sources = ["defaults"]
    data: dict[str, Any] = {}
    if path is not None and path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        sources.append(str(path))
    config = parse_config(data, enclosing_mb)
    env_limits, env_daemon, used = _from_environment(env)
    if used:
        sources.append("environment: " + ", ".join(used))
    limits = _apply_limits(config.limits, env_limits, "environment").validated(
        "memory (with environment)"
    )
    daemon = replace(config.daemon, **env_daemon)
    _check_interval(daemon)
    for name, agent in config.agents.items():
        # A type's limits must also rise together with [memory] and the environment: a
        # section no launch could use fails at start (or reload), not at its first launch.
        _apply_limits(limits, agent.limits, "").validated(f"[agents.{name}] with [memory]")
    return replace(config, limits=limits, daemon=daemon, sources=tuple(sources))


SECTIONS = ("memory", "daemon", "agents", "metrics", "alerts", "cgroup", "host")
MEMORY_KEYS = LIMIT_KEYS | {"check_interval_s", "min_interval_s"}
DAEMON_KEYS = frozenset(f.name for f in fields(DaemonSettings)) - {
    "check_interval_s",
    "min_interval_s",
}
AGENT_KEYS = frozenset({"command", "env", "cwd"}) | LIMIT_KEYS | SCHEDULING_KEYS | RESTART_KEYS


def parse_config(data: Mapping[str, Any], enclosing_mb: float | None = None) -> Config:
    """Validate a parsed TOML document; unknown keys are errors (they are usually typos)."""
    reject_unknown("top level", data, SECTIONS, noun="section")
    memory = table_of(data, "memory")
    reject_unknown("[memory]", memory, MEMORY_KEYS)
    memory = resolve_auto(memory, "memory", enclosing_mb)
    limits = _apply_limits(Limits(), memory, "memory").validated("memory")
    daemon = _parse_daemon(table_of(data, "daemon"), memory)
    agents = {
        name: _parse_agent(name, section, enclosing_mb)
        for name, section in table_of(data, "agents").items()
    }
    metrics = parse_metrics(table_of(data, "metrics"))
    alerts = parse_alerts(table_of(data, "alerts"))
    cgroup = CgroupSettings.from_table(table_of(data, "cgroup"))
    host = HostSettings.from_table(table_of(data, "host"))
    return Config(
        limits=limits,
        daemon=daemon,
        agents=agents,
        metrics=metrics,
        alerts=alerts,
        cgroup=cgroup,
        host=host,
        enclosing_mb=enclosing_mb,
    )


def _parse_daemon(table: Mapping[str, Any], memory: Mapping[str, Any]) -> DaemonSettings:
    reject_unknown("[daemon]", table, DAEMON_KEYS)
    values: dict[str, Any] = {}
    if "socket" in table:
        values["socket"] = string("daemon.socket", table["socket"])
    if "allowed_groups" in table:
        names = string_list("daemon.allowed_groups", table["allowed_groups"])
        if len(names) > 1:
            # Members of a second group would pass the peer check but not reach the socket.
            raise ConfigError(
                f"daemon.allowed_groups = {names!r} is not allowed: give one group: the socket "
                "is group-owned by it"
            )
        values["allowed_groups"] = tuple(group(name) for name in names)
    for key in (
        "log_max_bytes",
        "log_backups",
        "agent_log_max_bytes",
        "max_line_bytes",
        "max_connections",
    ):
        if key in table:
            values[key] = integer(f"daemon.{key}", table[key], minimum=1)
    for key in ("idle_timeout_s", "line_timeout_s"):
        if key in table:
            values[key] = positive(f"daemon.{key}", number(f"daemon.{key}", table[key]))
    for key in ("check_interval_s", "min_interval_s"):
        if key in memory:
            values[key] = positive(f"memory.{key}", number(f"memory.{key}", memory[key]))
    daemon = DaemonSettings(**values)
    _check_interval(daemon)
    return daemon


def _check_interval(daemon: DaemonSettings) -> None:
    if daemon.min_interval_s > daemon.check_interval_s:
        raise ConfigError(
            f"memory.min_interval_s ({daemon.min_interval_s:g}) must not exceed "
            f"memory.check_interval_s ({daemon.check_interval_s:g})"
        )


def _parse_agent(name: str, section: Any, enclosing_mb: float | None = None) -> AgentType:
    where = f"[agents.{name}]"
    try:
        validate_agent_type(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a table, not {type(section).__name__}")
    reject_unknown(where, section, AGENT_KEYS)
    command = None
    if "command" in section:
        command = tuple(string_list(f"agents.{name}.command", section["command"]))
        if not command:
            raise ConfigError(f"agents.{name}.command must not be empty")
    env = section.get("env", {})
    if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"agents.{name}.env must be a table of strings, got {env!r}")
    cwd = string(f"agents.{name}.cwd", section["cwd"]) if "cwd" in section else None
    limits = resolve_auto(
        {k: v for k, v in section.items() if k in LIMIT_KEYS}, f"agents.{name}", enclosing_mb
    )
    # Validate the type's own values now, so a bad section fails at start, not at launch.
    _apply_limits(Limits(), limits, f"agents.{name}")
    scheduling = apply_scheduling(Scheduling(), section, f"agents.{name}")
    restart = apply_restart(RestartPolicy(), section, f"agents.{name}")
    return AgentType(
        name=name,
        command=command,
        env=dict(env),
        cwd=cwd,
        limits=limits,
        scheduling=scheduling,
        restart=restart,
    )


AUTO_MAX_RATIO = 0.9


def resolve_auto(
    values: Mapping[str, Any], where: str, enclosing_mb: float | None
) -> Mapping[str, Any]:
    """``max_mb = "auto"``: 90% of the enclosing limit, so that the agent gets SIGTERM and a
    record before the kernel kills the container (warning and critical follow it down)."""
    if values.get("max_mb") != "auto":
        return values
    if enclosing_mb is None:
        raise ConfigError(
            f'{where}.max_mb = "auto" needs an enclosing memory limit (a container\'s or a '
            "cgroup's), and the daemon runs inside none; give max_mb in MB"
        )
    return {**values, "max_mb": round(AUTO_MAX_RATIO * enclosing_mb, 1)}


def _apply_limits(base: Limits, values: Mapping[str, Any], where: str) -> Limits:
    changes: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in values.items():
        if key not in LIMIT_KEYS:
            continue
        name = prefix + key
        if key == "enabled":
            changes[key] = boolean(name, value)
        elif key == "metric":
            if value not in METRICS:
                raise ConfigError(f"{name} = {value!r} is not allowed; use 'auto', 'rss' or 'pss'")
            changes[key] = value
        elif key in ("timeout_s", "predict_s") and value is None:
            changes[key] = None
        else:
            changes[key] = positive(name, number(name, value), allow_zero=key == "term_grace_s")
    return _follow_max(replace(base, **changes), values)


def _follow_max(limits: Limits, values: Mapping[str, Any]) -> Limits:
    """Thresholds not set beside a lower ``max_mb`` follow it rather than fail.

    The guide's emergency step exports only ``CLAUDE_PM_MEMORY_MAX_MB=1024``, which the default
    warning (1024) and critical (2048) would not fit under. When a layer sets ``max_mb`` and
    the warning or critical it would inherit does not fit below it, the ones it did not set
    become 25% and 50% of ``max_mb`` (the defaults' own ratios, and the guide's profiles').
    Explicit values at the same layer are kept, and still validated.
    """
    if "max_mb" not in values or limits.warning_mb < limits.critical_mb < limits.max_mb:
        return limits
    warning = limits.warning_mb if "warning_mb" in values else WARNING_RATIO * limits.max_mb
    critical = limits.critical_mb if "critical_mb" in values else CRITICAL_RATIO * limits.max_mb
    return replace(limits, warning_mb=warning, critical_mb=critical)


def _from_environment(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    limits: dict[str, Any] = {}
    daemon: dict[str, Any] = {}
    used: list[str] = []
    for var, key in ENV_THRESHOLDS.items():
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not a number; give {key} as e.g. 1024") from None
        positive(var, value)
        (daemon if key == "check_interval_s" else limits)[key] = value
        used.append(var)
    raw_disable = env.get(ENV_DISABLE)
    if raw_disable is not None:
        word = raw_disable.strip().lower()
        if word in TRUE_WORDS:
            limits["enabled"] = False
        elif word in FALSE_WORDS:
            if word:  # An explicit "false" overrides the file's enabled = false; "" is unset.
                limits["enabled"] = True
        else:
            raise ConfigError(f"{ENV_DISABLE}={raw_disable!r} is not allowed; use true or false")
        used.append(ENV_DISABLE)
    return limits, daemon, used


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The guide's variables that are set, to hand to a daemon started in the background."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in ENV_VARIABLES if k in env}


DEFAULT_DOCUMENT: dict[str, Any] = {
    "memory": {
        "warning_mb": 1024,
        "critical_mb": 2048,
        "max_mb": 4096,
        "check_interval_s": 2,
        "term_grace_s": 5,
        "enabled": True,
        "metric": "auto",
    },
    "daemon": {"log_max_bytes": 100 * 1024 * 1024, "log_backups": 5},
    "agents": {
        "engineer": {"command": ["claude", "-p", "{task}"]},
        # Claude Code, resumed under the same session after the daemon ends it (README).
        "claude": {
            "command": ["claude", "-p", "--session-id", "{session_uuid}", "{task}"],
            "resume_command": [
                "claude",
                "-p",
                "--resume",
                "{session_uuid}",
                "You were stopped by the supervisor (run {run}); continue the task where you "
                "left off.",
            ],
            "restart": "on-abort",
            "restart_delay_s": 5,
            "restart_delay_max_s": 120,
            "restart_limit": 3,
            "restart_window_s": 900,
            "restart_reset_s": 300,
            "term_grace_s": 15,
        },
    },
}


def write_default_config(path: Path) -> bool:
    """Write the default file if none exists; returns whether it wrote one."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# claude-pm-supervisord configuration. Environment variables (CLAUDE_PM_MEMORY_*)\n"
        "# override [memory]; [agents.<type>] sections override both for that type.\n"
    )
    path.write_text(header + tomli_w.dumps(DEFAULT_DOCUMENT), encoding="utf-8")
    return True
