"""Configuration layering and validation, the shipped profiles, and the home's paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from supervisord.config.home import MAX_SOCKET_PATH_BYTES, Home, find_home
from supervisord.config.settings import Config, load_config, parse_config, write_default_config
from supervisord.control.client import resolve_socket
from supervisord.core.errors import ConfigError
from supervisord.core.limits import Limits

REPO = Path(__file__).resolve().parent.parent
PROFILES = sorted((REPO / "config").glob("*.toml"))
DEFAULT_LIMITS = {
    "warning_mb": 1024.0,
    "critical_mb": 2048.0,
    "max_mb": 4096.0,
    "term_grace_s": 5.0,
    "timeout_s": None,
    "enabled": True,
    "metric": "auto",
    "predict_s": None,
}


def write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return str(caught.value)


def env_error(environ: dict[str, str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ)
    return str(caught.value)


def assert_mentions(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# -- defaults and layering ------------------------------------------------------------------


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    for config in (
        load_config(None, {}),
        load_config(tmp_path / "absent.toml", {}),
        parse_config({}),
    ):
        assert config.limits.as_dict() == DEFAULT_LIMITS
        assert config.daemon.check_interval_s == 2.0
        assert config.agents == {}
    assert load_config(tmp_path / "absent.toml", {}).sources == ("defaults",)
    public = load_config(None, {}).public()
    assert public["monitoring_enabled"] is True
    assert public["memory"]["warning_mb"] == 1024.0
    assert public["memory"]["check_interval_s"] == 2.0


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "supervisord.toml",
        {
            "memory": {
                "warning_mb": 512,
                "max_mb": 3000,
                "check_interval_s": 0.5,
                "term_grace_s": 0,
                "timeout_s": 600,
                "metric": "pss",
            },
            "daemon": {"log_max_bytes": 1000, "log_backups": 2, "socket": "s.sock"},
        },
    )
    config = load_config(path, {})
    assert config.limits == Limits(
        warning_mb=512.0,
        critical_mb=2048.0,
        max_mb=3000.0,
        term_grace_s=0.0,
        timeout_s=600.0,
        metric="pss",
    )
    assert config.daemon.check_interval_s == 0.5
    assert config.daemon.log_max_bytes == 1000
    assert config.daemon.log_backups == 2
    assert config.daemon.socket == "s.sock"
    assert config.sources == ("defaults", str(path))


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "supervisord.toml",
        {"memory": {"warning_mb": 800, "critical_mb": 1600, "max_mb": 3200, "check_interval_s": 5}},
    )
    environ = {
        "CLAUDE_PM_MEMORY_WARNING_MB": "700",
        "CLAUDE_PM_MEMORY_CRITICAL_MB": "1500.5",
        "CLAUDE_PM_MEMORY_MAX_MB": " 3000 ",
        "CLAUDE_PM_MEMORY_CHECK_INTERVAL": "0.25",
    }
    config = load_config(path, environ)
    assert (config.limits.warning_mb, config.limits.critical_mb, config.limits.max_mb) == (
        700.0,
        1500.5,
        3000.0,
    )
    assert config.daemon.check_interval_s == 0.25
    assert config.sources[:2] == ("defaults", str(path))
    assert_mentions(config.sources[2], "environment", "CLAUDE_PM_MEMORY_WARNING_MB")


def test_one_environment_variable_leaves_the_rest_of_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "f.toml", {"memory": {"warning_mb": 800, "critical_mb": 1600, "max_mb": 3200}}
    )
    config = load_config(path, {"CLAUDE_PM_MEMORY_MAX_MB": "5000"})
    assert (config.limits.warning_mb, config.limits.critical_mb, config.limits.max_mb) == (
        800.0,
        1600.0,
        5000.0,
    )


def test_empty_environment_variables_count_as_unset() -> None:
    config = load_config(None, {"CLAUDE_PM_MEMORY_WARNING_MB": "", "CLAUDE_PM_MEMORY_MAX_MB": "  "})
    assert config.limits.as_dict() == DEFAULT_LIMITS
    assert config.sources == ("defaults",)


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDE_PM_MEMORY_WARNING_MB", "333")
    monkeypatch.delenv("CLAUDE_PM_DISABLE_MEMORY_MONITOR", raising=False)
    assert load_config(None).limits.warning_mb == 333.0
    assert load_config(None, {}).limits.warning_mb == 1024.0


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE", " Yes ", "on"])
def test_disable_monitor_variable_disables(value: str) -> None:
    config = load_config(None, {"CLAUDE_PM_DISABLE_MEMORY_MONITOR": value})
    assert config.limits.enabled is False
    assert config.public()["monitoring_enabled"] is False
    # Thresholds stay as they were: agents are still sampled against them.
    assert config.limits.max_mb == 4096.0


@pytest.mark.parametrize("value", ["false", "0", "no", "False", "off"])
def test_disable_monitor_variable_false_keeps_monitoring(value: str) -> None:
    assert load_config(None, {"CLAUDE_PM_DISABLE_MEMORY_MONITOR": value}).limits.enabled is True


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("false", True), ("0", True), ("true", False), ("", False), (None, False)],
)
def test_disable_monitor_variable_overrides_the_file(
    tmp_path: Path, value: str | None, enabled: bool
) -> None:
    path = write(tmp_path / "f.toml", {"memory": {"enabled": False}})
    environ = {} if value is None else {"CLAUDE_PM_DISABLE_MEMORY_MONITOR": value}
    assert load_config(path, environ).limits.enabled is enabled


def test_agent_type_section_overrides_environment_and_launch_overrides_win(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "supervisord.toml",
        {
            "memory": {"warning_mb": 800, "critical_mb": 1600, "max_mb": 3200},
            "agents": {
                "engineer": {
                    "command": ["claude", "-p", "{task}"],
                    "warning_mb": 600,
                    "max_mb": 6000,
                    "timeout_s": 900,
                    "term_grace_s": 2,
                    "env": {"MODE": "fast"},
                    "cwd": "/srv/work",
                },
                "qa-bot": {"enabled": False},
            },
        },
    )
    config = load_config(
        path, {"CLAUDE_PM_MEMORY_WARNING_MB": "700", "CLAUDE_PM_MEMORY_MAX_MB": "5000"}
    )
    engineer = config.limits_for("engineer")
    assert (engineer.warning_mb, engineer.critical_mb, engineer.max_mb) == (600.0, 1600.0, 6000.0)
    assert engineer.timeout_s == 900.0
    assert engineer.term_grace_s == 2.0
    # Another type gets the environment over the file.
    other = config.limits_for("research")
    assert (other.warning_mb, other.critical_mb, other.max_mb) == (700.0, 1600.0, 5000.0)
    assert other.timeout_s is None
    assert config.limits_for("qa-bot").enabled is False
    assert config.limits.enabled is True
    # Per-launch limits win over everything.
    launched = config.limits_for("engineer", {"warning_mb": 500, "max_mb": 7000, "timeout_s": 60})
    assert (launched.warning_mb, launched.max_mb, launched.timeout_s) == (500.0, 7000.0, 60.0)
    assert launched.critical_mb == 1600.0
    agent = config.agent_type("engineer")
    assert agent.command == ("claude", "-p", "{task}")
    assert agent.env == {"MODE": "fast"}
    assert agent.cwd == "/srv/work"
    assert config.agent_type("research").command is None
    assert config.public()["agent_types"] == ["engineer", "qa-bot"]


def test_launch_overrides_are_validated() -> None:
    config = Config()
    with pytest.raises(ConfigError) as caught:
        config.limits_for("engineer", {"warning_mb": -1})
    assert_mentions(str(caught.value), "limits.warning_mb", "-1", "> 0")
    with pytest.raises(ConfigError) as caught:
        config.limits_for("engineer", {"warning_mb": 5000})
    assert_mentions(str(caught.value), "engineer", "thresholds must rise", "warning_mb (5000)")
    with pytest.raises(ConfigError, match="agent type 'Engineer'"):
        config.limits_for("Engineer")


@pytest.mark.parametrize(
    ("section", "parts"),
    [
        ({"restart": "sometimes"}, ("agents.qa.restart = 'sometimes'", "'on-failure'")),
        ({"restart_delay_s": -0.5}, ("agents.qa.restart_delay_s", "-0.5")),
        ({"restart_backoff": 0.9}, ("agents.qa.restart_backoff = 0.9", "factor >= 1")),
        ({"restart_limit": 0}, ("agents.qa.restart_limit", "0")),
        ({"resume_command": []}, ("agents.qa.resume_command = []",)),
        ({"session_pattern": "("}, ("agents.qa.session_pattern = '('", "does not compile")),
        ({"session_pattern": "(a)(b)"}, ("agents.qa.session_pattern", "has 2 groups")),
        ({"restart_delay_s": 10, "restart_delay_max_s": 5}, ("restart_delay_max_s = 5",)),
    ],
)
def test_a_types_restart_policy_is_validated_naming_the_key(
    section: dict[str, Any], parts: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"agents": {"qa": {"command": ["true"], **section}}})
    assert_mentions(str(caught.value), *parts)


def test_a_types_restart_policy_and_a_launchs_own_keys() -> None:
    config = parse_config(
        {"agents": {"qa": {"restart": "on-failure", "restart_limit": 2, "restart_delay_s": 3}}}
    )
    assert config.restart_for("qa").restart_limit == 2
    launched = config.restart_for("qa", {"restart": "always", "restart_delay_s": 0.5})
    assert (launched.restart, launched.restart_delay_s, launched.restart_limit) == (
        "always",
        0.5,
        2,
    )
    assert config.restart_for("other").restart == "no"


# -- invalid values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "parts"),
    [
        ({"warning_mb": "lots"}, ["memory.warning_mb", "'lots'", "give a number"]),
        ({"max_mb": True}, ["memory.max_mb", "True", "give a number"]),
        ({"critical_mb": [1]}, ["memory.critical_mb", "[1]", "give a number"]),
        ({"warning_mb": -5}, ["memory.warning_mb", "-5", "> 0"]),
        ({"max_mb": 0}, ["memory.max_mb", "= 0", "> 0"]),
        ({"term_grace_s": -1}, ["memory.term_grace_s", "-1", ">= 0"]),
        ({"timeout_s": 0}, ["memory.timeout_s", "= 0", "> 0"]),
        ({"check_interval_s": 0}, ["memory.check_interval_s", "= 0", "> 0"]),
        ({"check_interval_s": "2s"}, ["memory.check_interval_s", "'2s'", "give a number"]),
        ({"warning_mb": float("nan")}, ["memory.warning_mb", "nan", "finite"]),
        ({"max_mb": float("inf")}, ["memory.max_mb", "inf", "finite"]),
        (
            {"warning_mb": 3000},
            ["thresholds must rise", "warning_mb (3000)", "critical_mb (2048)", "max_mb (4096)"],
        ),
        ({"critical_mb": 1024}, ["thresholds must rise", "critical_mb (1024)"]),
        ({"max_mb": 1000, "warning_mb": 1500}, ["thresholds must rise", "max_mb (1000)"]),
        ({"metric": "vss"}, ["memory.metric", "'vss'", "'rss' or 'pss'"]),
        ({"enabled": "yes"}, ["memory.enabled", "'yes'", "true or false"]),
        ({"check_interval_s": 0.01}, ["check_interval_s (0.01)", "min_interval_s (0.05)"]),
    ],
)
def test_invalid_memory_values(memory: dict[str, Any], parts: list[str]) -> None:
    assert_mentions(config_error({"memory": memory}), *parts)


def test_unknown_key_lists_the_allowed_ones() -> None:
    message = config_error({"memory": {"warn_mb": 1000}})
    assert_mentions(
        message,
        "[memory]",
        "unknown key 'warn_mb'",
        "allowed:",
        "warning_mb",
        "critical_mb",
        "max_mb",
        "check_interval_s",
        "term_grace_s",
        "enabled",
    )


@pytest.mark.parametrize(
    ("data", "parts"),
    [
        ({"memroy": {}}, ["unknown section 'memroy'", "allowed:", "agents", "daemon", "memory"]),
        ({"daemon": {"sockett": "x"}}, ["[daemon]", "unknown key 'sockett'", "socket"]),
        ({"daemon": {"log_backups": 0}}, ["daemon.log_backups", "0", "whole number >= 1"]),
        ({"daemon": {"log_max_bytes": 1.5}}, ["daemon.log_max_bytes", "1.5", "whole number"]),
        ({"daemon": {"socket": ""}}, ["daemon.socket", "''", "non-empty string"]),
        ({"daemon": {"line_timeout_s": -1}}, ["daemon.line_timeout_s", "-1", "> 0"]),
        ({"memory": 5}, ["[memory] must be a table", "int"]),
        ({"agents": []}, ["[agents] must be a table", "list"]),
        ({"agents": {"engineer": "claude"}}, ["[agents.engineer] must be a table", "str"]),
        (
            {"agents": {"engineer": {"comand": ["x"]}}},
            ["[agents.engineer]", "unknown key 'comand'", "command", "env", "cwd", "warning_mb"],
        ),
        (
            {"agents": {"engineer": {"command": "claude -p"}}},
            ["agents.engineer.command", "'claude -p'", "list of strings"],
        ),
        (
            {"agents": {"engineer": {"command": ["claude", 1]}}},
            ["agents.engineer.command", "['claude', 1]", "list of strings"],
        ),
        ({"agents": {"engineer": {"command": []}}}, ["agents.engineer.command", "empty"]),
        (
            {"agents": {"engineer": {"env": {"A": 1}}}},
            ["agents.engineer.env", "{'A': 1}", "table of strings"],
        ),
        (
            {"agents": {"engineer": {"env": "A=1"}}},
            ["agents.engineer.env", "'A=1'", "table of strings"],
        ),
        ({"agents": {"engineer": {"cwd": 3}}}, ["agents.engineer.cwd", "3", "non-empty string"]),
        (
            {"agents": {"engineer": {"max_mb": -1}}},
            ["agents.engineer.max_mb", "-1", "> 0"],
        ),
        (
            {"agents": {"engineer": {"metric": "uss"}}},
            ["agents.engineer.metric", "'uss'", "'rss' or 'pss'"],
        ),
    ],
)
def test_invalid_sections(data: dict[str, Any], parts: list[str]) -> None:
    assert_mentions(config_error(data), *parts)


def test_allowed_groups_takes_one_group() -> None:
    # Real groups, so the refusal is about the count, not a missing name.
    message = config_error({"daemon": {"allowed_groups": ["nogroup", "root"]}})
    assert_mentions(
        message, "daemon.allowed_groups", "['nogroup', 'root']", "give one group", "group-owned"
    )
    config = parse_config({"daemon": {"allowed_groups": ["nogroup"]}})
    assert config.daemon.allowed_groups == ("nogroup",)


@pytest.mark.parametrize("name", ["Engineer", "1x", "qa_bot", "-x", "", "a b", "ingénieur"])
def test_bad_agent_type_names(name: str) -> None:
    message = config_error({"agents": {name: {"command": ["x"]}}})
    assert_mentions(message, f"[agents.{name}]", f"agent type {name!r}", "lowercase", "letter")


@pytest.mark.parametrize("name", ["engineer", "qa-bot", "x", "r2d2", "a-1-b"])
def test_good_agent_type_names(name: str) -> None:
    assert list(parse_config({"agents": {name: {}}}).agents) == [name]


@pytest.mark.parametrize(
    ("environ", "parts"),
    [
        (
            {"CLAUDE_PM_MEMORY_WARNING_MB": "lots"},
            ["CLAUDE_PM_MEMORY_WARNING_MB", "'lots'", "not a number", "warning_mb", "1024"],
        ),
        (
            {"CLAUDE_PM_MEMORY_MAX_MB": "4GB"},
            ["CLAUDE_PM_MEMORY_MAX_MB", "'4GB'", "not a number"],
        ),
        ({"CLAUDE_PM_MEMORY_CRITICAL_MB": "-5"}, ["CLAUDE_PM_MEMORY_CRITICAL_MB", "-5", "> 0"]),
        ({"CLAUDE_PM_MEMORY_MAX_MB": "0"}, ["CLAUDE_PM_MEMORY_MAX_MB", "0", "> 0"]),
        ({"CLAUDE_PM_MEMORY_CHECK_INTERVAL": "0"}, ["CLAUDE_PM_MEMORY_CHECK_INTERVAL", "> 0"]),
        ({"CLAUDE_PM_MEMORY_WARNING_MB": "nan"}, ["CLAUDE_PM_MEMORY_WARNING_MB", "nan", "finite"]),
        ({"CLAUDE_PM_MEMORY_MAX_MB": "inf"}, ["CLAUDE_PM_MEMORY_MAX_MB", "inf", "finite"]),
        (
            {"CLAUDE_PM_MEMORY_CRITICAL_MB": "-inf"},
            ["CLAUDE_PM_MEMORY_CRITICAL_MB", "inf", "finite"],
        ),
        (
            {"CLAUDE_PM_MEMORY_CRITICAL_MB": "5000"},
            ["with environment", "thresholds must rise", "critical_mb (5000)", "max_mb (4096)"],
        ),
        (
            {"CLAUDE_PM_DISABLE_MEMORY_MONITOR": "maybe"},
            ["CLAUDE_PM_DISABLE_MEMORY_MONITOR", "'maybe'", "true or false"],
        ),
    ],
)
def test_invalid_environment(environ: dict[str, str], parts: list[str]) -> None:
    assert_mentions(env_error(environ), *parts)


def test_invalid_toml_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "supervisord.toml"
    path.write_text("[memory]\nwarning_mb = = 3\n", encoding="utf-8")
    assert_mentions(env_error({}, path), str(path), "not valid TOML", "line 2")


def test_invalid_value_in_file_fails_load(tmp_path: Path) -> None:
    path = write(tmp_path / "f.toml", {"memory": {"warn_mb": 1}})
    assert_mentions(env_error({}, path), "warn_mb", "allowed:")


def test_agent_section_must_rise_with_the_global_limits_at_load(tmp_path: Path) -> None:
    # Each value is fine alone, but no launch of this type could ever be valid: fail at start.
    path = write(tmp_path / "f.toml", {"agents": {"big": {"warning_mb": 3000}}})
    assert_mentions(
        env_error({}, path), "[agents.big]", "thresholds must rise", "warning_mb (3000)"
    )
    # The same check sees the environment: valid with the defaults, not once it applies.
    path = write(tmp_path / "g.toml", {"agents": {"qa": {"critical_mb": 1500}}})
    assert load_config(path, {}).limits_for("qa").critical_mb == 1500.0
    assert_mentions(
        env_error({"CLAUDE_PM_MEMORY_WARNING_MB": "1600"}, path),
        "[agents.qa]",
        "warning_mb (1600)",
        "critical_mb (1500)",
    )
    # A type with its own full set of rising thresholds is fine whatever the globals are.
    path = write(
        tmp_path / "h.toml",
        {"agents": {"big": {"warning_mb": 5000, "critical_mb": 6000, "max_mb": 8000}}},
    )
    assert load_config(path, {}).limits_for("big").max_mb == 8000.0


# -- the default file and the shipped profiles ----------------------------------------------


def test_write_default_config_reads_back_as_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config" / "supervisord.toml"
    assert write_default_config(path) is True
    assert path.is_file()
    config = load_config(path, {})
    assert config.limits.as_dict() == DEFAULT_LIMITS
    assert config.daemon.check_interval_s == 2.0
    assert config.daemon.log_max_bytes == 100 * 1024 * 1024
    assert config.agent_type("engineer").command == ("claude", "-p", "{task}")
    assert config.sources == ("defaults", str(path))
    assert_claude_preset(config)


def assert_claude_preset(config: Config) -> None:
    """Run 1 creates the session under the daemon's UUID, later runs resume that one."""
    claude = config.restart_for("claude")
    assert config.agent_type("claude").command == (
        "claude",
        "-p",
        "--session-id",
        "{session_uuid}",
        "{task}",
    )
    assert claude.resume_command is not None
    assert claude.resume_command[:4] == ("claude", "-p", "--resume", "{session_uuid}")
    assert "--session-id" not in claude.resume_command
    assert (claude.restart, claude.restart_limit, claude.restart_window_s) == ("on-abort", 3, 900)


def test_write_default_config_does_not_overwrite(tmp_path: Path) -> None:
    path = write(tmp_path / "supervisord.toml", {"memory": {"warning_mb": 100}})
    before = path.read_text(encoding="utf-8")
    assert write_default_config(path) is False
    assert path.read_text(encoding="utf-8") == before
    assert load_config(path, {}).limits.warning_mb == 100.0


def test_profiles_are_shipped() -> None:
    assert PROFILES, f"no config/*.toml in {REPO}"


EXPECTED_PROFILES: dict[str, tuple[float, float, float]] = {
    "supervisord.toml": (1024.0, 2048.0, 4096.0),
    "low-memory.toml": (512.0, 1024.0, 2048.0),
    "high-memory.toml": (2048.0, 4096.0, 8192.0),
    "development.toml": (256.0, 512.0, 1024.0),
}


@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
def test_shipped_profile_loads(path: Path) -> None:
    config = load_config(path, {})
    assert config.sources == ("defaults", str(path))
    limits = config.limits
    assert 0 < limits.warning_mb < limits.critical_mb < limits.max_mb
    if path.name in EXPECTED_PROFILES:
        expected = EXPECTED_PROFILES[path.name]
        assert (limits.warning_mb, limits.critical_mb, limits.max_mb) == expected
    if path.name == "supervisord.toml":
        assert limits.as_dict() == DEFAULT_LIMITS
        assert config.daemon.check_interval_s == 2.0
        assert_claude_preset(config)
    if path.name == "development.toml":
        assert config.daemon.check_interval_s == 1.0
    for name in config.agents:
        config.limits_for(name)  # every type is launchable with its limits


# -- the home directory ---------------------------------------------------------------------


def test_home_from_environment_wins(tmp_path: Path) -> None:
    (tmp_path / "project" / ".claude-pm").mkdir(parents=True)
    chosen = tmp_path / "elsewhere"
    home = find_home(tmp_path / "project", {"CLAUDE_PM_HOME": str(chosen)})
    assert home == chosen


def test_home_from_environment_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_home(tmp_path, {"CLAUDE_PM_HOME": "rel/home"}) == tmp_path / "rel" / "home"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert find_home(tmp_path, {"CLAUDE_PM_HOME": "~/h"}) == tmp_path / "user" / "h"


def test_nearest_home_walking_up(tmp_path: Path) -> None:
    (tmp_path / "a" / ".claude-pm").mkdir(parents=True)
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert find_home(deep, {}) == tmp_path / "a" / ".claude-pm"
    # An empty CLAUDE_PM_HOME counts as unset.
    assert find_home(deep, {"CLAUDE_PM_HOME": ""}) == tmp_path / "a" / ".claude-pm"
    (tmp_path / "a" / "b" / ".claude-pm").mkdir()
    assert find_home(deep, {}) == tmp_path / "a" / "b" / ".claude-pm"
    # In the directory holding the home, that home is found too.
    assert find_home(tmp_path / "a", {}) == tmp_path / "a" / ".claude-pm"


def test_home_defaults_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = tmp_path / "x" / "y"
    start.mkdir(parents=True)
    (start / ".claude-pm").write_text("a file, not a home")  # ignored: not a directory
    ancestors = [d / ".claude-pm" for d in start.parents]
    if any(a.is_dir() for a in ancestors):  # pragma: no cover - depends on the machine
        pytest.skip("an ancestor of the temporary directory holds a .claude-pm")
    assert find_home(start, {}) == start / ".claude-pm"
    assert not (start / ".claude-pm").is_dir()  # finding does not create it
    monkeypatch.chdir(start)
    assert find_home(None, {}) == start / ".claude-pm"


def _root_with_socket_length(base: Path, length: int) -> Path:
    """A home root whose ``run/supervisord.sock`` is exactly ``length`` bytes long."""
    suffix = len(os.fsencode(Path("/run/supervisord.sock")))
    pad = length - suffix - len(os.fsencode(base)) - 1
    assert pad > 0
    return base / ("d" * pad)


def test_short_home_uses_the_default_socket(tmp_path: Path) -> None:
    home = Home(Path("/tmp/cpm-short/.claude-pm"))
    assert home.socket_path() == home.run / "supervisord.sock"
    assert home.socket_path(None) == home.default_socket


@pytest.mark.parametrize(("length", "fallback"), [(107, False), (108, True), (300, True)])
def test_long_home_falls_back_to_a_short_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, length: int, fallback: bool
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    home = Home(_root_with_socket_length(Path("/tmp"), length))
    assert len(os.fsencode(home.default_socket)) == length
    path = home.socket_path()
    if not fallback:
        assert path == home.default_socket
        return
    assert len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES
    assert path.parent == Path("/tmp") / f"claude-pm-{os.getuid()}"
    assert path.name.startswith("claude-pm-")
    assert path.suffix == ".sock"
    # The same home always maps to the same socket; another home to another one.
    assert Home(Path(str(home.root))).socket_path() == path
    assert Home(home.root.with_name(home.root.name[:-1] + "e")).socket_path() != path


def test_long_home_fallback_uses_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    home = Home(_root_with_socket_length(Path("/tmp"), 200))
    path = home.socket_path()
    assert path.parent == runtime
    assert len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES


def test_client_and_daemon_compute_the_same_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    home = Home(_root_with_socket_length(tmp_path, 250))
    write_default_config(home.config_file)
    # The daemon binds home.socket_path(config.daemon.socket); the client resolves it itself.
    daemon_side = home.socket_path(load_config(home.config_file, {}).daemon.socket)
    assert daemon_side != home.default_socket
    assert resolve_socket(home) == daemon_side
    # With CLAUDE_PM_HOME pointing at it, a client elsewhere finds the same path.
    monkeypatch.setenv("CLAUDE_PM_HOME", str(home.root))
    monkeypatch.chdir(tmp_path)
    assert resolve_socket() == daemon_side


def test_configured_socket_is_used_by_both_sides(tmp_path: Path) -> None:
    home = Home(tmp_path / ".claude-pm")
    write(home.config_file, {"daemon": {"socket": "custom.sock"}})
    assert resolve_socket(home) == home.root / "custom.sock"
    assert home.socket_path("/run/x.sock") == Path("/run/x.sock")
    # Only [daemon] socket is read: a typo elsewhere (made after the daemon started on the
    # file, say) does not send clients to the wrong socket.
    write(home.config_file, {"daemon": {"socket": "custom.sock"}, "memory": {"warn_mb": 1}})
    assert resolve_socket(home) == home.root / "custom.sock"
    # A file that is not TOML names no socket: the default path.
    home.config_file.write_text("[daemon\nsocket = 'custom.sock'\n")
    assert resolve_socket(home) == home.socket_path()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # A lower max_mb alone: the default thresholds would not fit, so they follow it.
        ({"CLAUDE_PM_MEMORY_MAX_MB": "1024"}, (256.0, 512.0, 1024.0)),
        ({"CLAUDE_PM_MEMORY_MAX_MB": "2048"}, (512.0, 1024.0, 2048.0)),
        # Thresholds that still fit are kept.
        ({"CLAUDE_PM_MEMORY_MAX_MB": "8192"}, (1024.0, 2048.0, 8192.0)),
        # An explicit warning beside the lower max is kept; only critical follows.
        (
            {"CLAUDE_PM_MEMORY_MAX_MB": "1024", "CLAUDE_PM_MEMORY_WARNING_MB": "100"},
            (100.0, 512.0, 1024.0),
        ),
    ],
)
def test_unset_thresholds_follow_a_lower_max(
    values: dict[str, str], expected: tuple[float, float, float]
) -> None:
    limits = load_config(None, values).limits
    assert (limits.warning_mb, limits.critical_mb, limits.max_mb) == expected


def test_launch_max_alone_scales_thresholds_that_do_not_fit() -> None:
    config = load_config(None, {})
    limits = config.limits_for("engineer", {"max_mb": 300})
    assert (limits.warning_mb, limits.critical_mb) == (75.0, 150.0)
    kept = config.limits_for("engineer", {"max_mb": 300, "warning_mb": 50, "critical_mb": 60})
    assert (kept.warning_mb, kept.critical_mb) == (50.0, 60.0)


def test_max_mb_auto_is_90_percent_of_the_enclosing_limit_and_the_others_follow() -> None:
    config = parse_config(
        {"memory": {"max_mb": "auto"}, "agents": {"pod": {"max_mb": "auto", "warning_mb": 50}}},
        enclosing_mb=400.0,
    )
    assert (config.limits.warning_mb, config.limits.critical_mb, config.limits.max_mb) == (
        90.0,
        180.0,
        360.0,
    )
    pod = config.limits_for("pod")
    assert (pod.warning_mb, pod.critical_mb, pod.max_mb) == (50.0, 180.0, 360.0)
    launched = Config(enclosing_mb=1000.0).limits_for("engineer", {"max_mb": "auto"})
    assert (launched.warning_mb, launched.critical_mb, launched.max_mb) == (225.0, 450.0, 900.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: parse_config({"memory": {"max_mb": "auto"}}),
        lambda: parse_config({"agents": {"pod": {"max_mb": "auto"}}}),
        lambda: Config().limits_for("engineer", {"max_mb": "auto"}),
    ],
    ids=["memory", "agent-type", "launch"],
)
def test_max_mb_auto_outside_any_limited_cgroup_is_refused(build: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        build()
    assert_mentions(str(caught.value), 'max_mb = "auto" needs an enclosing memory limit', "in MB")
