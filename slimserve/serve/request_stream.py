"""What the engine client hands to one HTTP request: its engine requests' token deltas, on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from slimserve.serve.engine_messages import TokenDelta


class RequestStream:
    """The deltas of one HTTP request's engine requests (one per choice), delivered on the event loop.
    Deltas that pile up while the consumer is busy are returned together, so a slow client gets fewer,
    larger chunks instead of slowing anyone else down."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._unfinished = set(request_ids)
        self._pending: list[TokenDelta] = []
        self._event = asyncio.Event()
        self._accepted = False
        self._error: BaseException | None = None

    @property
    def unfinished_ids(self) -> list[str]:
        return [r for r in self.request_ids if r in self._unfinished]

    def accept(self) -> None:
        """The engine has taken the requests (a refusal comes through fail() instead)."""
        if self._error is None:
            self._accepted = True
            self._event.set()

    def put(self, delta: TokenDelta) -> None:
        self._pending.append(delta)
        if delta.finish_reason is not None:
            self._unfinished.discard(delta.request_id)
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self.close()

    def close(self) -> None:
        self._unfinished.clear()
        self._event.set()

    async def accepted(self) -> None:
        """Until the engine has taken the requests; raises why it did not (refused them, or is gone)."""
        while not self._accepted and self._error is None:
            self._event.clear()
            await self._event.wait()
        if not self._accepted:
            raise self._error

    async def batches(self) -> AsyncIterator[list[TokenDelta]]:
        while True:
            while not self._pending and self._error is None and self._unfinished:
                self._event.clear()
                await self._event.wait()
            if self._error is not None:
                raise self._error
            batch, self._pending = self._pending, []
            if batch:
                yield batch
            if not self._unfinished and not self._pending:
                return
