"""Webhook alerts: grouping and rate limits, payloads, retries, and a real daemon posting."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from supervisord.config.home import Home
from supervisord.config.observe import AlertSettings, Webhook
from supervisord.config.settings import Config, load_config
from supervisord.core.clock import timestamps
from supervisord.core.errors import ConfigError
from supervisord.core.events import Event
from supervisord.core.kinds import AlertKind
from supervisord.observe.webhooks import (
    SEVERITY,
    Notice,
    Notifier,
    Throttle,
    WebhookSender,
    deliver,
    json_payload,
    slack_payload,
)
from supervisord.supervise.bus import Broadcaster
from tests.conftest import TEST_MEMORY, DaemonProcess, Events, read_jsonl, simagent, write_config
from tests.typed_events import AT, alert, exit_, restart

pytestmark = pytest.mark.anyio
GRACE_S = TEST_MEMORY["term_grace_s"]


# -- grouping and rate limiting, with explicit times --------------------------------------------


def test_alerts_of_one_agent_within_group_wait_become_one_notice_about_the_worst() -> None:
    throttle = Throttle(group_wait_s=2.0, rate_limit_s=300.0)
    throttle.offer(alert("memory_warning"), now=10.0)
    throttle.offer(alert("memory_critical"), now=10.4)
    throttle.offer(alert("sigterm_sent"), now=10.7)
    throttle.offer(alert("memory_warning", sid="qa_aaaaaaaaaaaa"), now=11.0)
    assert throttle.next_due() == 12.0
    assert throttle.due(11.9) == []
    (notice,) = throttle.due(12.0)
    assert notice.alert.kind == "sigterm_sent"
    assert notice.events == ("memory_warning", "memory_critical", "sigterm_sent")
    assert throttle.next_due() == 13.0
    (other,) = throttle.due(13.0)
    assert other.alert.subprocess_id == "qa_aaaaaaaaaaaa"


def test_rate_limit_drops_repeats_but_lets_escalations_through() -> None:
    throttle = Throttle(group_wait_s=0.0, rate_limit_s=60.0)
    throttle.offer(alert("memory_warning"), now=0.0)
    assert [n.alert.kind for n in throttle.due(0.0)] == ["memory_warning"]
    throttle.offer(alert("memory_warning"), now=30.0)  # a re-alert: dropped
    assert throttle.due(30.0) == []
    throttle.offer(alert("memory_critical"), now=31.0)  # worse: passes
    assert [n.alert.kind for n in throttle.due(31.0)] == ["memory_critical"]
    throttle.offer(alert("sigterm_sent"), now=32.0)
    assert [n.alert.kind for n in throttle.due(32.0)] == ["sigterm_sent"]
    throttle.offer(alert("sigkill_sent"), now=34.0)  # the same incident, same severity
    assert throttle.due(34.0) == []
    assert throttle.suppressed == 2
    throttle.offer(alert("memory_critical"), now=92.1)  # the window is over
    assert [n.alert.kind for n in throttle.due(92.1)] == ["memory_critical"]


def test_refused_launches_are_limited_per_agent_type() -> None:
    throttle = Throttle(group_wait_s=0.0, rate_limit_s=60.0)
    for n in range(5):  # A launcher retrying in a loop: each refusal has a fresh id.
        throttle.offer(alert("launch_refused", sid=f"eng_{n:012x}"), now=n)
        throttle.due(float(n))
    assert throttle.suppressed == 4


# -- payloads -----------------------------------------------------------------------------------


def guide_fields(payload: dict[str, Any]) -> dict[str, Any]:
    (attachment,) = payload["attachments"]
    return {f["title"]: f["value"] for f in attachment["fields"]}


def test_slack_payload_has_the_guides_fields() -> None:
    notice = Notice(alert("sigterm_sent"), ("memory_critical", "sigterm_sent"))
    payload = slack_payload(notice, "build-7")
    assert payload["text"] == "🚨 Claude PM Memory Alert"
    (attachment,) = payload["attachments"]
    assert attachment["color"] == "danger"
    assert attachment["timestamp"] == timestamps(AT)["timestamp"]
    assert attachment["ts"] == 1795698187
    # The guide's four fields, first and in its order, with its "short" flags.
    assert attachment["fields"][:4] == [
        {"title": "Level", "value": "CRITICAL", "short": True},
        {"title": "Subprocess", "value": "hog_0123456789ab", "short": True},
        {"title": "Message", "value": "sigterm_sent: memory 210.5 MB exceeds 200 MB"},
        {"title": "System Memory", "value": "61.5% used"},
    ]
    fields = guide_fields(payload)
    assert fields["Host"] == "build-7"
    assert fields["Events"] == "memory_critical → sigterm_sent"
    warning = slack_payload(Notice(alert("memory_warning"), ()), "h")
    assert warning["attachments"][0]["color"] == "warning"
    recovered = slack_payload(Notice(alert("recovered"), ()), "h")
    assert recovered["attachments"][0]["color"] == "good"


def test_json_payload_carries_the_alert() -> None:
    record = alert("sigterm_sent")
    payload = json_payload(Notice(record, ("sigterm_sent",)), "build-7")
    assert payload["host"] == "build-7"
    assert payload["source"] == "claude-pm-supervisord"
    assert payload["events"] == ["sigterm_sent"]
    assert payload["alert"] == record.record()
    assert payload["alert"]["event"] == "sigterm_sent"


# -- configuration -------------------------------------------------------------------------------


def test_alerts_config_is_parsed_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[alerts]\ngroup_wait_s = 1\nrate_limit_s = 60\n"
        '[[alerts.webhooks]]\nurl = "https://hooks.slack.com/services/T/B/secret"\n'
        '[[alerts.webhooks]]\nurl = "http://127.0.0.1:9/x"\nname = "ops"\nmin_level = "warning"\n'
        'format = "json"\nretries = 0\ntimeout_s = 2.5\nheaders = { Authorization = "Bearer t" }\n'
    )
    alerts = load_config(path, {}).alerts
    assert (alerts.group_wait_s, alerts.rate_limit_s, alerts.queue_size) == (1, 60, 100)
    slack, ops = alerts.webhooks
    assert (slack.name, slack.min_level, slack.format, slack.retries) == (
        "hooks.slack.com",
        "CRITICAL",
        "slack",
        3,
    )
    assert (ops.name, ops.min_level, ops.format, ops.retries, ops.timeout_s) == (
        "ops",
        "WARNING",
        "json",
        0,
        2.5,
    )
    assert ops.headers == (("Authorization", "Bearer t"),)
    assert load_config(None, {}).alerts.webhooks == ()
    for text, match in (
        ('[[alerts.webhooks]]\nname = "x"', r"alerts\.webhooks\[0\]\.url is missing"),
        ('[[alerts.webhooks]]\nurl = "ftp://x/y"', r"alerts\.webhooks\[0\]\.url = 'ftp://x/y'"),
        (
            '[[alerts.webhooks]]\nurl = "http://x"\nmin_level = "INFO"',
            r"min_level = 'INFO' is not allowed; use one of WARNING, CRITICAL",
        ),
        (
            '[[alerts.webhooks]]\nurl = "http://x"\nformat = "xml"',
            r"format = 'xml' is not allowed; use one of slack, json",
        ),
        ('[[alerts.webhooks]]\nurl = "http://x"\nretries = -1', r"retries = -1 is not allowed"),
        ('[[alerts.webhooks]]\nurl = "http://x"\nurls = 1', r"unknown key 'urls'"),
        ("[alerts]\nwebhooks = 3", r"alerts\.webhooks = 3 is not allowed"),
        ("[alerts]\nrate_limit_s = -1", r"alerts\.rate_limit_s = -1 is not allowed"),
        ("[alerts]\nqueue_size = 0", r"alerts\.queue_size = 0 is not allowed"),
    ):
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=match):
            load_config(path, {})


# -- a local receiver -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Post:
    path: str
    body: Any
    at: float


class Receiver:
    """An HTTP server on loopback: ``/ok`` accepts, ``/fail`` answers 500, ``/hang`` holds
    the request until released, ``/busy`` answers 429 with Retry-After once, then 200."""

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.hanging = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with receiver._lock:
                    receiver.posts.append(Post(self.path, body, time.monotonic()))
                    busy_before = sum(p.path == "/busy" for p in receiver.posts) > 1
                status = 200
                if self.path == "/fail":
                    status = 500
                elif self.path == "/hang":
                    with receiver._lock:
                        receiver.hanging += 1
                    receiver.release.wait(30)
                    with receiver._lock:
                        receiver.hanging -= 1
                elif self.path == "/busy" and not busy_before:
                    status = 429
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # The daemon gave up on a hanging request and closed it.

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str, sid: str | None = None) -> list[Post]:
        with self._lock:
            posts = [p for p in self.posts if p.path == path]
        if sid is None:
            return posts
        return [p for p in posts if sid in json.dumps(p.body)]

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def hook(receiver: Receiver, path: str, **kw: Any) -> Webhook:
    return Webhook(url=receiver.url(path), name=path.strip("/"), **kw)


async def test_delivery_retries_5xx_and_429_and_gives_up_quietly(receiver: Receiver) -> None:
    notice = Notice(alert("sigterm_sent"), ("sigterm_sent",))
    async with httpx.AsyncClient() as client:
        failing = hook(receiver, "/fail", retries=2, backoff_s=0.05)
        with anyio.fail_after(10):
            assert await deliver(client, failing, notice, "h") is False
        assert len(receiver.to("/fail")) == 3
        busy = hook(receiver, "/busy", retries=1, backoff_s=30)
        with anyio.fail_after(5):  # Retry-After: 0 is honoured, not the 30 s backoff
            assert await deliver(client, busy, notice, "h") is True
        assert len(receiver.to("/busy")) == 2
        hanging = hook(receiver, "/hang", retries=0, timeout_s=0.5)
        started = time.monotonic()
        with anyio.fail_after(5):
            assert await deliver(client, hanging, notice, "h") is False
        assert time.monotonic() - started < 2.0
        dead = Webhook(url="http://127.0.0.1:9/", name="dead", retries=1, backoff_s=0.01)
        with anyio.fail_after(5):  # connection refused: a failure, logged, not raised
            assert await deliver(client, dead, notice, "h") is False
        ok = hook(receiver, "/ok", format="json")
        assert await deliver(client, ok, notice, "h") is True
        assert receiver.to("/ok")[0].body["alert"]["event"] == "sigterm_sent"


async def test_a_full_queue_drops_the_notice_instead_of_waiting() -> None:
    sender = WebhookSender(Webhook(url="http://127.0.0.1:9/", name="q", retries=0), 1, "h")
    notice = Notice(alert("sigterm_sent"), ("sigterm_sent",))
    with capture_logs() as offered:
        sender.offer(notice)
        sender.offer(notice)  # no task drains it: the second is dropped at once
        sender.offer(Notice(alert("memory_warning"), ()))  # below min_level: not even queued
    sender.close()
    assert offered == [
        {
            "event": "webhook_queue_full",
            "log_level": "warning",
            "webhook": "q",
            "subprocess_id": notice.alert.subprocess_id,
            "alert_event": "sigterm_sent",
        }
    ]
    with capture_logs() as delivered:
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(5):  # the queued one is still delivered (and fails: port 9)
                await sender.run(client)
    # Exactly one notice was queued: one attempt, for the sigterm_sent alert, and no other.
    assert [(e["event"], e["alert_event"], e["attempts"]) for e in delivered] == [
        ("webhook_failed", "sigterm_sent", 1)
    ]


@dataclass
class FakeSupervisor:
    bus: Broadcaster[Event]
    config: Config


async def test_notifier_follows_the_bus_and_a_reload_replaces_webhooks(receiver: Receiver) -> None:
    def settings(*hooks: Webhook) -> Config:
        return Config(alerts=AlertSettings(group_wait_s=0.0, webhooks=hooks))

    source = FakeSupervisor(Broadcaster[Event](), settings(hook(receiver, "/ok")))
    async with anyio.create_task_group() as tg:
        await tg.start(Notifier(source, host="h").run)
        source.bus.publish(alert("sigterm_sent", sid="a_aaaaaaaaaaaa"))
        source.bus.publish(exit_("a_aaaaaaaaaaaa"))  # not an alert
        await wait_posts(receiver, "/ok", "a_aaaaaaaaaaaa")
        source.config = settings(hook(receiver, "/json", format="json", min_level="WARNING"))
        source.bus.publish(alert("memory_warning", sid="b_bbbbbbbbbbbb"))
        (post,) = await wait_posts(receiver, "/json", "b_bbbbbbbbbbbb")
        assert post.body["host"] == "h"
        tg.cancel_scope.cancel()
    assert receiver.to("/ok", "b_bbbbbbbbbbbb") == []
    assert len(receiver.to("/ok")) == 1


# -- the daemon posting -------------------------------------------------------------------------


def webhook_table(receiver: Receiver, path: str, **kw: Any) -> dict[str, Any]:
    return {"url": receiver.url(path), "name": path.strip("/"), **kw}


def daemon_log(home: Home, event: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(home.daemon_log) if r.get("event") == event]


async def wait_posts(receiver: Receiver, path: str, sid: str, n: int = 1) -> list[Post]:
    with anyio.fail_after(15):
        while len(receiver.to(path, sid)) < n:
            await anyio.sleep(0.05)
    return receiver.to(path, sid)


async def test_a_killed_agent_posts_exactly_once_with_the_guides_fields(
    home: Home, receiver: Receiver
) -> None:
    group_wait_s = 2.0
    write_config(
        home,
        alerts={
            "group_wait_s": group_wait_s,
            "webhooks": [
                webhook_table(receiver, "/slack"),  # min_level CRITICAL, as the guide's script
                webhook_table(receiver, "/json", format="json", min_level="WARNING"),
            ],
        },
    )
    daemon = DaemonProcess(home).start()
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            hog = simagent("--hold-mb", "10", "--rate", "150", "--cap", "280")
            sid = (await client.launch("hog", hog))["subprocess_id"]
            record = await events.exit_of(sid)
            assert record["reason"] == "memory_limit"
            (slack,) = await wait_posts(receiver, "/slack", sid)
            await wait_posts(receiver, "/json", sid)
            # Whatever else was coming would have come by now: one group, one post each.
            await anyio.sleep(group_wait_s + 1.0)
        assert len(receiver.to("/slack", sid)) == 1
        (json_post,) = receiver.to("/json", sid)
    finally:
        daemon.close()
    body = slack.body
    assert body["text"] == "🚨 Claude PM Memory Alert"
    (attachment,) = body["attachments"]
    assert attachment["color"] == "danger"
    fields = guide_fields(body)
    assert fields["Level"] == "CRITICAL"
    assert fields["Subprocess"] == sid
    assert fields["Message"].startswith("SIGTERM: memory ")
    assert re.fullmatch(r"\d+\.\d% used", fields["System Memory"])
    assert fields["Event"] == "sigterm_sent"
    alerts = [a for a in read_jsonl(home.alerts_log) if a["subprocess_id"] == sid]
    sigterm = next(a for a in alerts if a["event"] == "sigterm_sent")
    assert attachment["timestamp"] == sigterm["timestamp"]
    # The JSON webhook takes warnings too; the same group gave it one post, about the kill.
    assert json_post.body["alert"]["event"] == "sigterm_sent"
    assert json_post.body["events"] == [a["event"] for a in alerts]
    assert sorted(r["webhook"] for r in daemon_log(home, "webhook_sent")) == ["json", "slack"]


async def test_hanging_and_failing_webhooks_do_not_delay_a_kill(
    home: Home, receiver: Receiver
) -> None:
    write_config(
        home,
        alerts={
            "group_wait_s": 0,
            "rate_limit_s": 0,
            "queue_size": 2,
            "webhooks": [
                webhook_table(receiver, "/hang", min_level="WARNING", timeout_s=60, retries=0),
                webhook_table(receiver, "/fail", min_level="WARNING", retries=2, backoff_s=0.1),
            ],
        },
    )
    daemon = DaemonProcess(home).start()
    try:
        async with daemon.async_client() as client, daemon.async_client() as sub:
            events = await Events(sub).start()
            # One agent sits at WARNING: its alert is the post the /hang receiver holds.
            held = (await client.launch("steady", simagent("--hold-mb", "120")))["subprocess_id"]
            await wait_posts(receiver, "/hang", held)
            assert receiver.hanging == 1
            # Another agent runs away; it must be killed as promptly as with no webhooks.
            launched = time.monotonic()
            hog = simagent("--hold-mb", "10", "--rate", "150", "--cap", "280")
            sid = (await client.launch("hog", hog))["subprocess_id"]
            term = await events.next_matching(
                10, type="alert", subprocess_id=sid, event="sigterm_sent"
            )
            record = await events.exit_of(sid, timeout_s=10)
            took_s = time.monotonic() - launched
            assert receiver.hanging == 1, "the held request is still open: the kill did not wait"
            # Growing 150 MB/s from 10 MB reaches 200 MB after ~1.3 s; the kill follows within
            # a sampling interval, and the agent dies on SIGTERM (well inside term_grace_s).
            assert record["reason"] == "memory_limit"
            assert record["signal"] == "SIGTERM"
            assert term["current_mb"] < TEST_MEMORY["max_mb"] + 60
            assert took_s < 1.3 + GRACE_S + 2.0, took_s
            with anyio.fail_after(10):  # the 500s were tried 3 times each, then logged
                while not daemon_log(home, "webhook_failed"):
                    await anyio.sleep(0.05)
            await client.stop(held)
    finally:
        receiver.release.set()
        daemon.close()
    failed = daemon_log(home, "webhook_failed")
    assert failed[0]["webhook"] == "fail"
    assert failed[0]["error"] == "HTTP 500"
    assert failed[0]["attempts"] == 3
    assert len(receiver.to("/fail", held)) == 3
    # The hanging webhook's queue (2) overflowed while it was held; the overflow was logged.
    assert daemon_log(home, "webhook_queue_full")
    assert not any("127.0.0.1" in json.dumps(r) for r in failed)  # URLs may hold secrets


def test_every_alert_kind_has_a_severity_and_a_shed_is_posted_as_a_kill() -> None:
    assert set(SEVERITY) == set(AlertKind)
    throttle = Throttle(group_wait_s=0.0, rate_limit_s=60.0)
    throttle.offer(alert("memory_critical", sid="batch_0123456789ab"), now=0.0)
    throttle.offer(alert("host_pressure", sid="batch_0123456789ab"), now=0.0)
    (notice,) = throttle.due(0.0)
    assert notice.alert.kind is AlertKind.HOST_PRESSURE


def test_a_crash_loop_posts_its_first_kill_and_then_its_restart_limit() -> None:
    throttle = Throttle(group_wait_s=2.0, rate_limit_s=300.0)
    throttle.offer(alert("sigterm_sent"), now=0.0)
    assert [n.alert.kind for n in throttle.due(2.0)] == ["sigterm_sent"]
    for run_at in (10.0, 30.0):  # the next runs are killed too: the same id, rate-limited
        throttle.offer(alert("sigterm_sent"), now=run_at)
        assert throttle.due(run_at + 2.0) == []
    # The last run's kill and the limit within group_wait: one notice, about the limit.
    throttle.offer(alert("sigterm_sent"), now=70.0)
    throttle.offer(alert("restart_limit"), now=70.5)
    (notice,) = throttle.due(72.0)
    assert notice.alert.kind is AlertKind.RESTART_LIMIT
    assert notice.events == ("sigterm_sent", "restart_limit")
    payload = slack_payload(notice, "h")
    assert payload["text"] == "🚨 Claude PM Agent Failed (restart limit)"
    assert payload["attachments"][0]["color"] == "danger"
    assert guide_fields(payload)["Level"] == "CRITICAL"
    assert guide_fields(payload)["Events"] == "sigterm_sent → restart_limit"


async def test_restart_events_pass_by_and_a_restart_limit_reaches_critical_webhooks(
    receiver: Receiver,
) -> None:
    # The default min_level is CRITICAL: restart_limit is one of those alerts.
    hooks = (hook(receiver, "/ok"), hook(receiver, "/json", format="json"))
    config = Config(alerts=AlertSettings(group_wait_s=0.0, webhooks=hooks))
    source = FakeSupervisor(Broadcaster[Event](), config)
    sid = "crash_0123456789ab"
    async with anyio.create_task_group() as tg:
        await tg.start(Notifier(source, host="h").run)
        source.bus.publish(exit_(sid, "exited", run=3))
        for event in (
            restart("restarting", sid, run=3, reason="exited", delay_s=4.0, exit_code=1),
            restart("restarted", sid, run=4, reason="exited"),
            restart("restart_limit", sid, run=4, reason="exited", exit_code=1),
        ):
            source.bus.publish(event)
        source.bus.publish(alert("restart_limit", sid=sid))
        (post,) = await wait_posts(receiver, "/json", sid)
        (slack,) = await wait_posts(receiver, "/ok", sid)
        tg.cancel_scope.cancel()
    assert post.body["alert"]["event"] == "restart_limit"
    assert post.body["alert"]["level"] == "CRITICAL"
    assert post.body["events"] == ["restart_limit"]
    assert guide_fields(slack.body)["Event"] == "restart_limit"
