"""systemd integration with the standard library only: sd_notify, the watchdog, socket activation.

The protocols are small and stable (see sd_notify(3), sd_watchdog_enabled(3) and
sd_listen_fds(3)), so a dependency on libsystemd or a binding would buy nothing and cost
macOS and container users an install step. Every function here is a no-op when the daemon
is not run by systemd.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import MutableMapping

import structlog

__all__ = [
    "SD_LISTEN_FDS_START",
    "Notifier",
    "inherited_unix_listener",
    "listen_fds",
    "listen_fds_with_names",
    "watchdog_interval_s",
]

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes for socket activation."""

_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_WATCHDOG_ENV = ("WATCHDOG_USEC", "WATCHDOG_PID")
# sd_notify field names are upper-case words; anything else is a programming error here,
# and a newline inside a value would smuggle in a second field.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def _env(environ: MutableMapping[str, str] | None) -> MutableMapping[str, str]:
    # os.environ's __delitem__ calls unsetenv(), so children we spawn later see the removal.
    return os.environ if environ is None else environ


class Notifier:
    """Sends sd_notify(3) state changes to the service manager named by ``NOTIFY_SOCKET``.

    Built without an address (``NOTIFY_SOCKET`` absent, or a form we do not speak) it is a
    no-op, so the daemon calls it unconditionally. Sending never raises: systemd being gone
    or slow must not take the daemon down, so failures are logged and the call returns False.
    """

    __slots__ = ("_address", "_failing", "raw_address")

    def __init__(self, address: str | None) -> None:
        self.raw_address = address
        self._address = self._parse_address(address)
        self._failing = False

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET``; with ``unset_environment`` remove it, as sd_notify(unset=1)
        does, so that agents launched later do not talk to our service manager."""
        env = _env(environ)
        address = env.get("NOTIFY_SOCKET")
        if unset_environment:
            env.pop("NOTIFY_SOCKET", None)
        return cls(address)

    @staticmethod
    def _parse_address(address: str | None) -> str | None:
        if not address:
            return None
        if address.startswith("@"):
            # Linux abstract namespace: the name starts with a NUL byte instead of '@'.
            return "\0" + address[1:]
        if address.startswith("/"):
            return address
        # systemd >= 254 may hand out "vsock:CID:PORT" (for VMs); we do not need it.
        log.warning("sd_notify_unsupported_address", address=address)
        return None

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE\\n`` lines, in argument order.

        Returns True when the datagram was handed to the kernel, False when there is nothing
        to notify or sending failed (already logged). Raises ValueError only for a field
        name that sd_notify would not accept, which is a bug in the caller.
        """
        for name in fields:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"invalid sd_notify field name {name!r}: use upper-case A-Z0-9_")
        if self._address is None:
            return False
        payload = "".join(
            f"{name}={str(value).replace(chr(10), ' ')}\n" for name, value in fields.items()
        ).encode()
        return self._send(payload, fields)

    def _send(self, payload: bytes, fields: dict[str, str | int]) -> bool:
        assert self._address is not None
        # A fresh socket per message, as libsystemd does: nothing to close, nothing leaks
        # into forks, and the cost is negligible at one message every few seconds.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Non-blocking: a stalled service manager (full receive queue) must not stall
                # the event loop that called us; the message is dropped and logged instead.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            # Log the first failure of a streak loudly and the rest quietly: the watchdog
            # pings every few seconds and would otherwise flood the log.
            logger = log.debug if self._failing else log.warning
            logger(
                "sd_notify_failed",
                address=self.raw_address,
                fields=sorted(fields),
                error=str(exc),
                errno=exc.errno,
            )
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify_recovered", address=self.raw_address)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (``Type=notify`` units stay "activating" until this)."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping; send at half of :func:`watchdog_interval_s`."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (sent before stopping agents, which may take a while)."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        """A configuration reload has begun; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` lets systemd match the READY=1 that follows to this reload.
        """
        return self.notify(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time in the current start or stop phase (a slow agent shutdown)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000)))

    def __repr__(self) -> str:
        return f"Notifier({self.raw_address!r})"


def watchdog_interval_s(
    environ: MutableMapping[str, str] | None = None,
    *,
    unset_environment: bool = False,
) -> float | None:
    """The watchdog timeout systemd expects pings within (``WatchdogSec=``), in seconds.

    None when no watchdog is configured for this process: ``WATCHDOG_USEC`` absent or not a
    positive integer, or ``WATCHDOG_PID`` present and naming another process (the variables
    were inherited from a parent). Ping at half the returned interval, as systemd advises.
    """
    env = _env(environ)
    try:
        return _watchdog_interval_s(env)
    finally:
        if unset_environment:
            for name in _WATCHDOG_ENV:
                env.pop(name, None)


def _watchdog_interval_s(env: MutableMapping[str, str]) -> float | None:
    usec_text = env.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None:
        try:
            pid = int(pid_text)
        except ValueError:
            log.warning("watchdog_env_invalid", name="WATCHDOG_PID", value=pid_text)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("watchdog_env_invalid", name="WATCHDOG_USEC", value=usec_text)
        return None
    return usec / 1_000_000


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None,
) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed by socket activation, with their ``FileDescriptorName=``.

    Implements sd_listen_fds_with_names(unset_environment=1): the descriptors are only
    ours when ``LISTEN_PID`` is our pid; they start at fd 3; each is made close-on-exec,
    and the three ``LISTEN_*`` variables are removed whatever the outcome, so agents never
    inherit them. A descriptor that is not a socket (``ListenFIFO=`` and the like) is
    logged and skipped. Names default to ``"unknown"``, as in libsystemd.

    The caller owns the returned sockets: close the ones it does not use. Call once; the
    environment is gone afterwards.
    """
    env = _env(environ)
    try:
        return _listen_fds_with_names(env)
    finally:
        for name in _LISTEN_ENV:
            env.pop(name, None)


def _listen_fds_with_names(env: MutableMapping[str, str]) -> list[tuple[str, socket.socket]]:
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return []
    try:
        pid = int(pid_text)
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        log.warning("listen_fds_env_invalid", listen_pid=pid_text, listen_fds=env.get("LISTEN_FDS"))
        return []
    if pid != os.getpid():
        # Inherited from an ancestor that was socket-activated; the fds are not ours.
        log.debug("listen_fds_other_pid", listen_pid=pid)
        return []
    if count <= 0:
        return []

    names = ["unknown"] * count
    names_text = env.get("LISTEN_FDNAMES")
    if names_text is not None:
        given = names_text.split(":")
        if len(given) == count:
            names = given
        else:
            log.warning("listen_fdnames_mismatch", listen_fds=count, listen_fdnames=names_text)

    result: list[tuple[str, socket.socket]] = []
    for index, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + index
        try:
            # Before anything else, so that no agent spawned from now on inherits it.
            os.set_inheritable(fd, False)
        except OSError as exc:
            log.warning("listen_fd_unusable", fd=fd, name=name, error=str(exc))
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("listen_fd_not_socket", fd=fd, name=name, error=str(exc))
            continue
        result.append((name, sock))
    return result


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The sockets passed by socket activation (see :func:`listen_fds_with_names`)."""
    return [sock for _name, sock in listen_fds_with_names(environ)]


def _is_unix_stream_listener(sock: socket.socket) -> bool:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def inherited_unix_listener(
    path: str | os.PathLike[str] | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> socket.socket | None:
    """The first listening AF_UNIX stream socket passed by socket activation, or None.

    With ``path``, only a listener bound to that path qualifies: a socket unit whose
    ``ListenStream=`` disagrees with the daemon's home would leave clients talking to a
    socket nobody serves, so that mismatch is logged as a warning. Every other inherited
    socket is closed (systemd keeps its own copy). The returned socket is left in the mode
    systemd created it in (blocking unless the unit says ``NonBlocking=yes``).
    """
    wanted = None if path is None else os.fspath(path)
    chosen: socket.socket | None = None
    for name, sock in listen_fds_with_names(environ):
        if chosen is None and _is_unix_stream_listener(sock):
            bound = sock.getsockname()
            if wanted is None or bound == wanted:
                chosen = sock
                log.info("listen_fd_adopted", fd=sock.fileno(), name=name, path=bound)
                continue
            log.warning(
                "listen_fd_path_mismatch", fd=sock.fileno(), name=name, path=bound, expected=wanted
            )
        else:
            log.info("listen_fd_unused", fd=sock.fileno(), name=name)
        sock.close()
    return chosen
