"""Fan-out of daemon events to subscribers; a slow subscriber never blocks the daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


class Broadcaster(Generic[T]):
    def __init__(self, buffer: int = 1000) -> None:
        self._buffer = buffer
        self._subscribers: set[MemoryObjectSendStream[T]] = set()

    def publish(self, event: T) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                # A subscriber that fell a whole buffer behind is cut off, not waited for.
                self._subscribers.discard(send)
                send.close()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[MemoryObjectReceiveStream[T]]:
        send, receive = anyio.create_memory_object_stream[T](self._buffer)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()
