"""The command of each run and the session id captured from output (core/resume)."""

from __future__ import annotations

from supervisord.core.resume import SessionCapture, expand, run_command

COMMAND = ("claude", "-p", "{task}", "--session-id", "{session_uuid}")
RESUME = ("claude", "-p", "go on", "--resume", "{session_uuid}")
BY_ID = ("agent", "--resume", "{session_id}", '{"run": {run}}')
VALUES = {"task": "fix it", "subprocess_id": "x_1", "run": "1", "session_uuid": "u-1"}


def test_the_first_run_uses_command_and_later_runs_resume() -> None:
    assert run_command(COMMAND, RESUME, 1, VALUES) == (
        "claude", "-p", "fix it", "--session-id", "u-1",
    )  # fmt: skip
    second = {**VALUES, "run": "2"}
    assert run_command(COMMAND, RESUME, 2, second) == ("claude", "-p", "go on", "--resume", "u-1")
    assert run_command(COMMAND, None, 2, second) == run_command(COMMAND, None, 1, VALUES)


def test_a_resume_needing_an_uncaptured_session_id_falls_back_to_command() -> None:
    values = {**VALUES, "run": "2", "session_id": None}
    assert run_command(COMMAND, BY_ID, 2, values)[:3] == ("claude", "-p", "fix it")
    captured = {**values, "session_id": "abc123"}
    # Other braces (JSON here) are left alone; only the known names are replaced.
    assert run_command(COMMAND, BY_ID, 2, captured) == ("agent", "--resume", "abc123", '{"run": 2}')


def test_unknown_placeholders_stay_as_written() -> None:
    assert expand(["{nope}", "{task}{task}"], {"task": "t"}) == ("{nope}", "tt")


def test_the_session_id_is_captured_across_chunks_and_the_last_wins() -> None:
    capture = SessionCapture(r"session: (\S+)")
    assert capture.feed(b"starting\nsess") is None
    assert capture.feed(b"ion: abc123\nworking\n") == "abc123"
    assert capture.session_id == "abc123"
    assert capture.feed(b"noise " * 2000) is None  # a long line without an end is bounded
    assert capture.feed(b"\nsession: def456\n") == "def456"
    assert capture.session_id == "def456"
    assert len(capture._partial) == 0
