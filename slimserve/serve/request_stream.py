"""What the engine loop hands to one HTTP request: its engine requests' outputs, on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from slimserve.engine.outputs import RequestOutput


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per choice), delivered on the event loop.
    Outputs that pile up while the consumer is busy are returned together, so a slow client gets fewer,
    larger chunks instead of slowing anyone else down."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self._unfinished = set(request_ids)
        self._pending: list[RequestOutput] = []
        self._event = asyncio.Event()
        self._error: BaseException | None = None

    @property
    def unfinished_ids(self) -> list[str]:
        return [r for r in self.request_ids if r in self._unfinished]

    def put(self, output: RequestOutput) -> None:
        self._pending.append(output)
        if output.finished:
            self._unfinished.discard(output.request_id)
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self.close()

    def close(self) -> None:
        self._unfinished.clear()
        self._event.set()

    async def batches(self) -> AsyncIterator[list[RequestOutput]]:
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
