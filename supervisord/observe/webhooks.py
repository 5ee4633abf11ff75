"""Webhook alerts: the guide's Slack-compatible payload (or plain JSON) posted with httpx.

Three stages, so that a dead or slow webhook can never hold up sampling or enforcement:

1. ``Throttle`` (pure, explicit times): alerts of one agent arriving within ``group_wait_s``
   become one notice, the most severe of them (a hog that crosses warning, critical and its
   limit within seconds posts once, about the kill). After a notice, the same agent's alerts
   of the same or lower severity are dropped for ``rate_limit_s``; an escalation always passes.
   Runs of a restarted agent share its id, so a crash loop posts its first kill, then its
   ``restart_limit`` (ranked above a kill) when no run comes again.
2. ``Notifier`` follows the supervisor's event bus and hands notices to every webhook whose
   ``min_level`` they reach, with ``send_nowait`` into that webhook's bounded queue: a full
   queue drops the notice (and logs it) rather than wait.
3. One ``WebhookSender`` task per webhook posts from its queue with a total deadline per
   attempt, retries transport errors, 429 and 5xx with exponential backoff, and logs what
   failed (structlog) instead of raising. Webhook URLs often embed a secret (Slack's do), so
   logs name a webhook by its ``name`` (default: the URL's host), never by its URL.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from supervisord import __version__
from supervisord.config.observe import ALERT_LEVELS, AlertSettings, Webhook
from supervisord.config.settings import Config
from supervisord.core.clock import timestamps
from supervisord.core.events import AlertEvent, Event
from supervisord.core.kinds import AlertKind, Level
from supervisord.supervise.bus import Broadcaster

log = structlog.get_logger("supervisord.observe.webhooks")

Alert = AlertEvent
# Severity orders notices within a group and decides what the rate limit lets through.
KILL = 3
# Above a kill: an agent whose kills were rate-limited still posts when it stops for good.
FAILED = 4
SEVERITY = {
    AlertKind.RECOVERED: 0,
    AlertKind.MEMORY_WARNING: 1,
    AlertKind.LAUNCH_REFUSED: 1,
    AlertKind.LIMIT_PREDICTED: 1,
    AlertKind.MEMORY_CRITICAL: 2,
    AlertKind.CGROUP_ESCAPE: 2,  # the kernel's backstop no longer covers the whole tree
    AlertKind.TIMEOUT: KILL,
    AlertKind.SIGTERM_SENT: KILL,
    AlertKind.SIGKILL_SENT: KILL,
    AlertKind.OOM_KILL: KILL,
    AlertKind.HOST_PRESSURE: KILL,  # a shed stops an agent
    AlertKind.RESTART_LIMIT: FAILED,  # no run comes again
}
MAX_BACKOFF_S = 30.0
CLOSE_TIMEOUT_S = 1.0


def severity(alert: Alert) -> int:
    return SEVERITY[alert.kind]


def level_reaches(alert: Alert, min_level: str) -> bool:
    return ALERT_LEVELS.index(alert.level.name) >= ALERT_LEVELS.index(min_level)


def agent_key(alert: Alert) -> str:
    """Refused launches get a fresh id each time: group and limit them by agent type instead."""
    if alert.kind is AlertKind.LAUNCH_REFUSED:
        return f"launch_refused:{alert.agent_type}"
    return alert.subprocess_id


@dataclass(frozen=True, slots=True)
class Notice:
    """What one post says: the most severe alert of a group, and every event in that group."""

    alert: Alert
    events: tuple[str, ...]


@dataclass(slots=True)
class _Group:
    due_at: float
    alerts: list[Alert] = field(default_factory=list)


class Throttle:
    """Grouping and per-agent rate limiting with explicit times: no clock, no I/O."""

    def __init__(self, group_wait_s: float, rate_limit_s: float) -> None:
        self.group_wait_s = group_wait_s
        self.rate_limit_s = rate_limit_s
        self._groups: dict[str, _Group] = {}
        self._last: dict[str, tuple[float, int]] = {}  # key -> (sent at, severity)
        self.suppressed = 0

    def offer(self, alert: Alert, now: float) -> None:
        key = agent_key(alert)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(due_at=now + self.group_wait_s)
        group.alerts.append(alert)

    def next_due(self) -> float | None:
        return min((g.due_at for g in self._groups.values()), default=None)

    def due(self, now: float) -> list[Notice]:
        notices = []
        for key, group in list(self._groups.items()):
            if group.due_at > now:
                continue
            del self._groups[key]
            # The most severe alert; among equals the latest, which has the freshest numbers.
            chosen = max(reversed(group.alerts), key=severity)
            rank = severity(chosen)
            last = self._last.get(key)
            if last is not None and now - last[0] < self.rate_limit_s and rank <= last[1]:
                self.suppressed += 1
                log.info(
                    "webhook_suppressed",
                    key=key,
                    alert_event=chosen.kind.value,
                    rate_limit_s=self.rate_limit_s,
                )
                continue
            self._last[key] = (now, rank)
            notices.append(Notice(chosen, tuple(a.kind.value for a in group.alerts)))
        # Forget agents whose window is over, so the table does not grow with every agent.
        for key, (sent_at, _) in list(self._last.items()):
            if now - sent_at >= self.rate_limit_s:
                del self._last[key]
        return notices


# -- payloads ----------------------------------------------------------------------------------


def slack_payload(notice: Notice, host: str) -> dict[str, Any]:
    """The guide's "Alert Integration" message, plus Host, Event and (when grouped) Events."""
    alert = notice.alert
    level = alert.level.name
    if alert.kind is AlertKind.RECOVERED:
        text, color = "✅ Claude PM Memory Recovered", "good"
    elif alert.kind is AlertKind.RESTART_LIMIT:
        text, color = "🚨 Claude PM Agent Failed (restart limit)", "danger"
    elif alert.level is Level.CRITICAL:
        text, color = "🚨 Claude PM Memory Alert", "danger"
    else:
        text, color = "⚠️ Claude PM Memory Alert", "warning"
    percent = alert.system_memory.get("percent")
    used = f"{percent:.1f}% used" if isinstance(percent, int | float) else "unknown"
    fields: list[dict[str, Any]] = [
        {"title": "Level", "value": level, "short": True},
        {"title": "Subprocess", "value": alert.subprocess_id, "short": True},
        {"title": "Message", "value": alert.message},
        {"title": "System Memory", "value": used},
        {"title": "Host", "value": host, "short": True},
        {"title": "Event", "value": alert.kind.value, "short": True},
    ]
    if len(notice.events) > 1:
        fields.append({"title": "Events", "value": " → ".join(notice.events)})
    attachment: dict[str, Any] = {
        "color": color,
        "fields": fields,
        "timestamp": timestamps(alert.at)["timestamp"],
        # Slack shows an attachment's time from `ts`, epoch seconds.
        "ts": int(alert.at.timestamp()),
    }
    return {"text": text, "attachments": [attachment]}


def json_payload(notice: Notice, host: str) -> dict[str, Any]:
    """The alert record as in memory-alerts.log, with where it came from and its group."""
    alert = notice.alert.record()
    return {
        "source": "claude-pm-supervisord",
        "version": __version__,
        "host": host,
        "alert": alert,
        "events": list(notice.events),
    }


def payload_for(hook: Webhook, notice: Notice, host: str) -> dict[str, Any]:
    return slack_payload(notice, host) if hook.format == "slack" else json_payload(notice, host)


# -- delivery ----------------------------------------------------------------------------------


class WebhookSender:
    """One webhook: a bounded queue and a task that posts from it, one notice at a time."""

    def __init__(self, hook: Webhook, queue_size: int, host: str) -> None:
        self.hook = hook
        self.host = host
        self._send, self._receive = anyio.create_memory_object_stream[Notice](queue_size)

    def offer(self, notice: Notice) -> None:
        if not level_reaches(notice.alert, self.hook.min_level):
            return
        try:
            self._send.send_nowait(notice)
        except anyio.WouldBlock:
            log.warning(
                "webhook_queue_full",
                webhook=self.hook.name,
                subprocess_id=notice.alert.subprocess_id,
                alert_event=notice.alert.kind.value,
            )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # Replaced by a reload a moment ago; the new sender has it.

    def close(self) -> None:
        """No more notices: the task sends what is queued, then ends."""
        self._send.close()

    def discard(self) -> None:
        """The notifier is done: drop what is queued (its task is being cancelled)."""
        self._send.close()
        self._receive.close()

    async def run(self, client: httpx.AsyncClient) -> None:
        async with self._receive:
            async for notice in self._receive:
                await deliver(client, self.hook, notice, self.host)


async def deliver(client: httpx.AsyncClient, hook: Webhook, notice: Notice, host: str) -> bool:
    """Post with retries; True when the webhook accepted it. Never raises for HTTP trouble."""
    payload = payload_for(hook, notice, host)
    context = {
        "webhook": hook.name,
        "subprocess_id": notice.alert.subprocess_id,
        "alert_event": notice.alert.kind.value,
    }
    attempts = hook.retries + 1
    for attempt in range(1, attempts + 1):
        error, retryable, retry_after = await _attempt(client, hook, payload)
        if error is None:
            log.info("webhook_sent", attempts=attempt, **context)
            return True
        if not retryable or attempt == attempts:
            log.warning("webhook_failed", error=error, attempts=attempt, **context)
            return False
        delay = retry_after
        if delay is None:
            delay = min(hook.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        log.info("webhook_retrying", error=error, attempt=attempt, delay_s=delay, **context)
        await anyio.sleep(delay)
    return False


async def _attempt(
    client: httpx.AsyncClient, hook: Webhook, payload: dict[str, Any]
) -> tuple[str | None, bool, float | None]:
    """(what failed or None, whether to try again, the receiver's Retry-After if any)."""
    # httpx's timeout bounds each phase; this bounds the whole attempt, so a receiver that
    # trickles its answer byte by byte cannot hold the sender past timeout_s either.
    with anyio.move_on_after(hook.timeout_s):
        try:
            response = await client.post(
                hook.url, json=payload, headers=dict(hook.headers), timeout=hook.timeout_s
            )
        except httpx.HTTPError as exc:
            return _describe(exc), True, None
        except Exception as exc:
            # httpx.InvalidURL and the like are not HTTPErrors: still this webhook's failure,
            # logged and dropped, never an exception in the daemon's task group.
            return _describe(exc), False, None
        if response.is_success:
            return None, False, None
        error = f"HTTP {response.status_code}"
        if response.status_code == 429 or response.status_code >= 500:
            return error, True, _retry_after(response)
        return error, False, None  # A 4xx other than 429 will not change by asking again.
    return f"no answer within {hook.timeout_s:g} s", True, None


def _describe(exc: Exception) -> str:
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def _retry_after(response: httpx.Response) -> float | None:
    """A numeric Retry-After, capped; the HTTP-date form is rare for webhooks and ignored."""
    try:
        return min(max(float(response.headers.get("Retry-After", "")), 0.0), MAX_BACKOFF_S)
    except ValueError:
        return None


class AlertSource(Protocol):
    bus: Broadcaster[Event]
    config: Config


class Notifier:
    """Follows the bus, throttles, and fans notices out to the webhooks in the current config.

    The config is read at every alert, so ``reload`` adds, removes and changes webhooks
    without a restart.
    """

    def __init__(
        self,
        source: AlertSource,
        *,
        clock: Callable[[], float] = time.monotonic,
        host: str | None = None,
    ) -> None:
        self.source = source
        self.clock = clock
        self.host = host or socket.gethostname()
        settings = source.config.alerts
        self.throttle = Throttle(settings.group_wait_s, settings.rate_limit_s)
        self.senders: dict[Webhook, WebhookSender] = {}
        self._settings: AlertSettings | None = None
        self._tg: TaskGroup | None = None
        self._client: httpx.AsyncClient | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        client = httpx.AsyncClient(headers={"User-Agent": f"claude-pm-supervisord/{__version__}"})
        try:
            async with anyio.create_task_group() as tg:
                self._tg, self._client = tg, client
                self._sync()
                await tg.start(self._follow)
                task_status.started()
        finally:
            for sender in self.senders.values():
                sender.discard()
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
                await client.aclose()

    async def _follow(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        while True:
            async with self.source.bus.subscribe() as events:
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
                with suppress(anyio.EndOfStream, anyio.ClosedResourceError):
                    await self._route(events)
            # The bus cuts off a subscriber a whole buffer behind; this one never waits on
            # the network, so it is rare, but take up again rather than go silent.
            log.warning("webhooks_resubscribed")

    async def _route(self, events: MemoryObjectReceiveStream[Event]) -> None:
        while True:
            due = self.throttle.next_due()
            delay = float("inf") if due is None else max(0.0, due - self.clock())
            with anyio.move_on_after(delay):
                event = await events.receive()
                if isinstance(event, AlertEvent):
                    try:
                        self._sync()
                        self.throttle.offer(event, self.clock())
                    except Exception:
                        log.exception("webhook_routing_failed")
            try:
                for notice in self.throttle.due(self.clock()):
                    for sender in self.senders.values():
                        sender.offer(notice)
            except Exception:
                # Alerting is best effort beside enforcement: a bug costs notices, not the daemon.
                log.exception("webhook_routing_failed")

    def _sync(self) -> None:
        """Match senders and throttle to the config in force (it changes on ``reload``)."""
        settings = self.source.config.alerts
        if settings == self._settings:
            return
        assert self._tg is not None, "run() starts the senders' task group"
        assert self._client is not None
        self._settings = settings
        self.throttle.group_wait_s = settings.group_wait_s
        self.throttle.rate_limit_s = settings.rate_limit_s
        wanted = set(settings.webhooks)
        for hook in list(self.senders):
            if hook not in wanted:
                self.senders.pop(hook).close()  # Its task sends what it has queued, then ends.
        for hook in settings.webhooks:
            if hook not in self.senders:
                sender = WebhookSender(hook, settings.queue_size, self.host)
                self.senders[hook] = sender
                self._tg.start_soon(sender.run, self._client)
        if settings.webhooks:
            log.info("webhooks_configured", webhooks=[h.name for h in settings.webhooks])


async def serve(
    source: AlertSource, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The daemon's webhook alerts; reports started once subscribed to the bus."""
    notifier = Notifier(source)
    await notifier.run(task_status=task_status)
