"""Configuration: built-in defaults < ``supervisord.toml`` < environment < agent type < launch.

Every value is validated where it is read; a bad one raises :class:`ConfigError` naming the
key, the value and what is allowed, so ``init`` and ``reload`` can refuse it whole.
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import tomli_w

from supervisord.cgroup import CgroupSettings
from supervisord.errors import ConfigError

Metric = Literal["rss", "pss"]
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
class Limits:
    """The limits one agent is held to; per type and per launch they override the defaults."""

    warning_mb: float = 1024.0
    critical_mb: float = 2048.0
    max_mb: float = 4096.0
    term_grace_s: float = 5.0
    timeout_s: float | None = None
    enabled: bool = True
    metric: Metric = "rss"
    # Warn when, at the current growth rate, max_mb is this few seconds away (None: never).
    predict_s: float | None = None

    def validated(self, where: str = "memory") -> Limits:
        for key in ("warning_mb", "critical_mb", "max_mb"):
            _require_positive(f"{where}.{key}", getattr(self, key))
        _require_positive(f"{where}.term_grace_s", self.term_grace_s, allow_zero=True)
        for key in ("timeout_s", "predict_s"):
            value = getattr(self, key)
            if value is not None:
                _require_positive(f"{where}.{key}", value)
        if not self.warning_mb < self.critical_mb < self.max_mb:
            raise ConfigError(
                f"{where}: thresholds must rise: warning_mb ({self.warning_mb:g}) < "
                f"critical_mb ({self.critical_mb:g}) < max_mb ({self.max_mb:g})"
            )
        if self.metric not in ("rss", "pss"):
            raise ConfigError(
                f"{where}.metric = {self.metric!r} is not allowed; use 'rss' or 'pss'"
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LIMIT_KEYS = frozenset(f.name for f in fields(Limits))


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """How the daemon runs: its socket, its logs and the limits it puts on clients."""

    socket: str | None = None
    log_max_bytes: int = 100 * 1024 * 1024
    log_backups: int = 5
    max_line_bytes: int = 1024 * 1024
    max_connections: int = 256
    idle_timeout_s: float = 3600.0
    line_timeout_s: float = 10.0
    check_interval_s: float = 2.0
    min_interval_s: float = 0.05
    # Members of these groups may use the daemon too (socket 0660, group of the first); a
    # root daemon then runs their agents as them. Empty: only the daemon's user and root.
    allowed_groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentType:
    """An ``[agents.<type>]`` section: how to start that kind of agent and its own limits."""

    name: str
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus endpoint, off unless ``listen`` is set.

    ``guide_names`` adds the guide's ``claude_pm_subprocess_memory_mb`` and
    ``claude_pm_subprocess_count`` beside the base-unit series (promtool's linter flags those
    two names: ``_mb`` is an abbreviated unit, ``_count`` a histogram suffix).
    """

    listen: str | None = None
    guide_names: bool = True

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self.listen is None else split_listen("metrics.listen", self.listen)


ALERT_LEVELS = ("WARNING", "CRITICAL")
WEBHOOK_FORMATS = ("slack", "json")


@dataclass(frozen=True, slots=True)
class Webhook:
    """One ``[[alerts.webhooks]]`` entry. Headers are pairs so the value stays hashable."""

    url: str
    name: str
    min_level: str = "CRITICAL"
    format: str = "slack"
    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 1.0
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """``[alerts]``: webhooks, and how alerts of one agent are grouped and rate-limited."""

    webhooks: tuple[Webhook, ...] = ()
    group_wait_s: float = 2.0
    rate_limit_s: float = 300.0
    queue_size: int = 100


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration in force."""

    limits: Limits = Limits()
    daemon: DaemonSettings = DaemonSettings()
    agents: Mapping[str, AgentType] = field(default_factory=dict)
    sources: tuple[str, ...] = ("defaults",)
    metrics: MetricsSettings = MetricsSettings()
    alerts: AlertSettings = AlertSettings()
    cgroup: CgroupSettings = field(default_factory=CgroupSettings)

    @property
    def check_interval_s(self) -> float:
        return self.daemon.check_interval_s

    def agent_type(self, name: str) -> AgentType:
        validate_agent_type(name)
        return self.agents.get(name) or AgentType(name=name)

    def limits_for(self, agent_type: str, overrides: Mapping[str, Any] | None = None) -> Limits:
        """The limits of one launch: defaults, then the type's section, then the request's."""
        merged = _apply_limits(self.limits, self.agent_type(agent_type).limits, "")
        if overrides:
            merged = _apply_limits(merged, overrides, "limits")
        return merged.validated(f"limits of {agent_type}")

    def public(self) -> dict[str, Any]:
        """What ``status`` reports as the config in force."""
        return {
            "memory": {**self.limits.as_dict(), "check_interval_s": self.check_interval_s},
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


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (absent is fine) and the environment into a validated :class:`Config`."""
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
    config = parse_config(data)
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


SECTIONS = ("memory", "daemon", "agents", "metrics", "alerts", "cgroup")
MEMORY_KEYS = LIMIT_KEYS | {"check_interval_s", "min_interval_s"}
DAEMON_KEYS = frozenset(f.name for f in fields(DaemonSettings)) - {
    "check_interval_s",
    "min_interval_s",
}
AGENT_KEYS = frozenset({"command", "env", "cwd"}) | LIMIT_KEYS


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document; unknown keys are errors (they are usually typos)."""
    _reject_unknown("top level", data, SECTIONS, noun="section")
    memory = _table(data, "memory")
    _reject_unknown("[memory]", memory, MEMORY_KEYS)
    limits = _apply_limits(Limits(), memory, "memory").validated("memory")
    daemon = _parse_daemon(_table(data, "daemon"), memory)
    agents = {name: _parse_agent(name, section) for name, section in _table(data, "agents").items()}
    metrics = _parse_metrics(_table(data, "metrics"))
    alerts = _parse_alerts(_table(data, "alerts"))
    cgroup = CgroupSettings.from_table(_table(data, "cgroup"))
    return Config(
        limits=limits,
        daemon=daemon,
        agents=agents,
        metrics=metrics,
        alerts=alerts,
        cgroup=cgroup,
    )


METRICS_KEYS = frozenset({"listen", "guide_names"})
ALERTS_KEYS = frozenset({"webhooks", "group_wait_s", "rate_limit_s", "queue_size"})
WEBHOOK_KEYS = frozenset(
    {"url", "name", "min_level", "format", "timeout_s", "retries", "backoff_s", "headers"}
)


def split_listen(name: str, value: Any) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:9464"`` for IPv6) into its parts; port 0 picks a free one."""
    example = 'give "host:port", e.g. "127.0.0.1:9464"'
    if not isinstance(value, str):
        raise ConfigError(f"{name} = {value!r} is not allowed; {example}")
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{name} = {value!r} is not allowed; {example}")
    return host, int(port_text)


def _parse_metrics(table: Mapping[str, Any]) -> MetricsSettings:
    _reject_unknown("[metrics]", table, METRICS_KEYS)
    values: dict[str, Any] = {}
    if "listen" in table:
        split_listen("metrics.listen", table["listen"])
        values["listen"] = table["listen"]
    if "guide_names" in table:
        values["guide_names"] = _bool("metrics.guide_names", table["guide_names"])
    return MetricsSettings(**values)


def _parse_alerts(table: Mapping[str, Any]) -> AlertSettings:
    _reject_unknown("[alerts]", table, ALERTS_KEYS)
    values: dict[str, Any] = {}
    for key in ("group_wait_s", "rate_limit_s"):
        if key in table:
            values[key] = _require_positive(
                f"alerts.{key}", _number(f"alerts.{key}", table[key]), allow_zero=True
            )
    if "queue_size" in table:
        values["queue_size"] = _integer("alerts.queue_size", table["queue_size"], minimum=1)
    hooks = table.get("webhooks", [])
    if not isinstance(hooks, list):
        raise ConfigError(
            f"alerts.webhooks = {hooks!r} is not allowed; give [[alerts.webhooks]] tables"
        )
    values["webhooks"] = tuple(_parse_webhook(i, hook) for i, hook in enumerate(hooks))
    return AlertSettings(**values)


def _parse_webhook(index: int, hook: Any) -> Webhook:
    where = f"alerts.webhooks[{index}]"
    if not isinstance(hook, Mapping):
        raise ConfigError(f"{where} must be a table, not {type(hook).__name__}")
    _reject_unknown(f"[[alerts.webhooks]] #{index}", hook, WEBHOOK_KEYS)
    if "url" not in hook:
        raise ConfigError(f"{where}.url is missing; give the webhook's http(s) URL")
    url = _string(f"{where}.url", hook["url"])
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if not sep or scheme.lower() not in ("http", "https") or not host:
        raise ConfigError(f"{where}.url = {url!r} is not allowed; give an http:// or https:// URL")
    values: dict[str, Any] = {"url": url, "name": host}
    if "name" in hook:
        values["name"] = _string(f"{where}.name", hook["name"])
    for key, allowed in (("min_level", ALERT_LEVELS), ("format", WEBHOOK_FORMATS)):
        if key in hook:
            raw = hook[key]
            value = raw.upper() if key == "min_level" and isinstance(raw, str) else raw
            if value not in allowed:
                raise ConfigError(
                    f"{where}.{key} = {raw!r} is not allowed; use one of {', '.join(allowed)}"
                )
            values[key] = value
    if "timeout_s" in hook:
        values["timeout_s"] = _require_positive(
            f"{where}.timeout_s", _number(f"{where}.timeout_s", hook["timeout_s"])
        )
    if "backoff_s" in hook:
        values["backoff_s"] = _require_positive(
            f"{where}.backoff_s", _number(f"{where}.backoff_s", hook["backoff_s"]), allow_zero=True
        )
    if "retries" in hook:
        values["retries"] = _integer(f"{where}.retries", hook["retries"], minimum=0)
    headers = hook.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}.headers must be a table of strings, got {headers!r}")
    values["headers"] = tuple(sorted(headers.items()))
    return Webhook(**values)


def _parse_daemon(table: Mapping[str, Any], memory: Mapping[str, Any]) -> DaemonSettings:
    _reject_unknown("[daemon]", table, DAEMON_KEYS)
    values: dict[str, Any] = {}
    if "socket" in table:
        values["socket"] = _string("daemon.socket", table["socket"])
    if "allowed_groups" in table:
        values["allowed_groups"] = tuple(
            _group(name) for name in _string_list("daemon.allowed_groups", table["allowed_groups"])
        )
    for key in ("log_max_bytes", "log_backups", "max_line_bytes", "max_connections"):
        if key in table:
            values[key] = _integer(f"daemon.{key}", table[key], minimum=1)
    for key in ("idle_timeout_s", "line_timeout_s"):
        if key in table:
            values[key] = _require_positive(f"daemon.{key}", _number(f"daemon.{key}", table[key]))
    for key in ("check_interval_s", "min_interval_s"):
        if key in memory:
            values[key] = _require_positive(f"memory.{key}", _number(f"memory.{key}", memory[key]))
    daemon = DaemonSettings(**values)
    _check_interval(daemon)
    return daemon


def _check_interval(daemon: DaemonSettings) -> None:
    if daemon.min_interval_s > daemon.check_interval_s:
        raise ConfigError(
            f"memory.min_interval_s ({daemon.min_interval_s:g}) must not exceed "
            f"memory.check_interval_s ({daemon.check_interval_s:g})"
        )


def _parse_agent(name: str, section: Any) -> AgentType:
    where = f"[agents.{name}]"
    try:
        validate_agent_type(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a table, not {type(section).__name__}")
    _reject_unknown(where, section, AGENT_KEYS)
    command = None
    if "command" in section:
        command = tuple(_string_list(f"agents.{name}.command", section["command"]))
        if not command:
            raise ConfigError(f"agents.{name}.command must not be empty")
    env = section.get("env", {})
    if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"agents.{name}.env must be a table of strings, got {env!r}")
    cwd = _string(f"agents.{name}.cwd", section["cwd"]) if "cwd" in section else None
    limits = {k: v for k, v in section.items() if k in LIMIT_KEYS}
    # Validate the type's own values now, so a bad section fails at start, not at launch.
    _apply_limits(Limits(), limits, f"agents.{name}")
    return AgentType(name=name, command=command, env=dict(env), cwd=cwd, limits=limits)


def _apply_limits(base: Limits, values: Mapping[str, Any], where: str) -> Limits:
    changes: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in values.items():
        if key not in LIMIT_KEYS:
            continue
        name = prefix + key
        if key == "enabled":
            changes[key] = _bool(name, value)
        elif key == "metric":
            if value not in ("rss", "pss"):
                raise ConfigError(f"{name} = {value!r} is not allowed; use 'rss' or 'pss'")
            changes[key] = value
        elif key in ("timeout_s", "predict_s") and value is None:
            changes[key] = None
        else:
            changes[key] = _require_positive(
                name, _number(name, value), allow_zero=key == "term_grace_s"
            )
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
        _require_positive(var, value)
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


def _reject_unknown(where: str, table: Mapping[str, Any], allowed: Any, noun: str = "key") -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown {noun} {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{key}] must be a table, not {type(value).__name__}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} = {value!r} is not allowed; give a number")
    return float(value)


def _group(name: str) -> str:
    try:
        grp.getgrnam(name)
    except KeyError:
        raise ConfigError(
            f"daemon.allowed_groups: no group {name!r} on this system; give existing group names"
        ) from None
    return name


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} = {value!r} is not allowed; give a whole number >= {minimum}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r} is not allowed; give true or false")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} = {value!r} is not allowed; give a non-empty string")
    return value


def _string_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} = {value!r} is not allowed; give a list of strings")
    return value


def _require_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} = {value!r} is not allowed; give a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} = {value:g} is not allowed; it must be {bound}")
    return value


DEFAULT_DOCUMENT: dict[str, Any] = {
    "memory": {
        "warning_mb": 1024,
        "critical_mb": 2048,
        "max_mb": 4096,
        "check_interval_s": 2,
        "term_grace_s": 5,
        "enabled": True,
        "metric": "rss",
    },
    "daemon": {"log_max_bytes": 100 * 1024 * 1024, "log_backups": 5},
    "agents": {"engineer": {"command": ["claude", "-p", "{task}"]}},
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
