"""The ``[metrics]`` and ``[alerts]`` sections: the Prometheus endpoint and the webhooks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisord.core.errors import ConfigError
from supervisord.core.validate import (
    boolean,
    integer,
    number,
    positive,
    reject_unknown,
    string,
)


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


def parse_metrics(table: Mapping[str, Any]) -> MetricsSettings:
    reject_unknown("[metrics]", table, METRICS_KEYS)
    values: dict[str, Any] = {}
    if "listen" in table:
        split_listen("metrics.listen", table["listen"])
        values["listen"] = table["listen"]
    if "guide_names" in table:
        values["guide_names"] = boolean("metrics.guide_names", table["guide_names"])
    return MetricsSettings(**values)


def parse_alerts(table: Mapping[str, Any]) -> AlertSettings:
    reject_unknown("[alerts]", table, ALERTS_KEYS)
    values: dict[str, Any] = {}
    for key in ("group_wait_s", "rate_limit_s"):
        if key in table:
            values[key] = positive(
                f"alerts.{key}", number(f"alerts.{key}", table[key]), allow_zero=True
            )
    if "queue_size" in table:
        values["queue_size"] = integer("alerts.queue_size", table["queue_size"], minimum=1)
    hooks = table.get("webhooks", [])
    if not isinstance(hooks, list):
        raise ConfigError(
            f"alerts.webhooks = {hooks!r} is not allowed; give [[alerts.webhooks]] tables"
        )
    values["webhooks"] = tuple(parse_webhook(i, hook) for i, hook in enumerate(hooks))
    return AlertSettings(**values)


def parse_webhook(index: int, hook: Any) -> Webhook:
    where = f"alerts.webhooks[{index}]"
    if not isinstance(hook, Mapping):
        raise ConfigError(f"{where} must be a table, not {type(hook).__name__}")
    reject_unknown(f"[[alerts.webhooks]] #{index}", hook, WEBHOOK_KEYS)
    if "url" not in hook:
        raise ConfigError(f"{where}.url is missing; give the webhook's http(s) URL")
    url = string(f"{where}.url", hook["url"])
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if not sep or scheme.lower() not in ("http", "https") or not host:
        raise ConfigError(f"{where}.url = {url!r} is not allowed; give an http:// or https:// URL")
    values: dict[str, Any] = {"url": url, "name": host}
    if "name" in hook:
        values["name"] = string(f"{where}.name", hook["name"])
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
        values["timeout_s"] = positive(
            f"{where}.timeout_s", number(f"{where}.timeout_s", hook["timeout_s"])
        )
    if "backoff_s" in hook:
        values["backoff_s"] = positive(
            f"{where}.backoff_s", number(f"{where}.backoff_s", hook["backoff_s"]), allow_zero=True
        )
    if "retries" in hook:
        values["retries"] = integer(f"{where}.retries", hook["retries"], minimum=0)
    headers = hook.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}.headers must be a table of strings, got {headers!r}")
    values["headers"] = tuple(sorted(headers.items()))
    return Webhook(**values)
