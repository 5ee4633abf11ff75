"""Checks for configuration values: each returns the value or raises a ConfigError that names
the key, the value and what is allowed."""

from __future__ import annotations

import grp
from collections.abc import Mapping
from typing import Any

from supervisord.core.errors import ConfigError


def reject_unknown(where: str, table: Mapping[str, Any], allowed: Any, noun: str = "key") -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown {noun} {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )


def table_of(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{key}] must be a table, not {type(value).__name__}")
    return value


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} = {value!r} is not allowed; give a number")
    return float(value)


def group(name: str) -> str:
    try:
        grp.getgrnam(name)
    except KeyError:
        raise ConfigError(
            f"daemon.allowed_groups: no group {name!r} on this system; give existing group names"
        ) from None
    return name


def integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} = {value!r} is not allowed; give a whole number >= {minimum}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r} is not allowed; give true or false")
    return value


def string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} = {value!r} is not allowed; give a non-empty string")
    return value


def string_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} = {value!r} is not allowed; give a list of strings")
    return value


def positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} = {value!r} is not allowed; give a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} = {value:g} is not allowed; it must be {bound}")
    return value
