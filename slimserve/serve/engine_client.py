"""The front end's handle on the engine process: starts and stops it, sends it requests and aborts, and
turns its per-step reports into deltas for each HTTP request's stream, metrics and health, all on the
event loop. The device is only ever touched by the engine process."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import socket
import time
from collections import deque
from dataclasses import dataclass

from slimserve.config import EngineConfig
from slimserve.serve.engine_messages import (
    AbortRequests,
    AddRequests,
    Command,
    EngineInfo,
    EngineRequest,
    EngineStats,
    Shutdown,
    StartupFailure,
    StepReport,
    TokenDelta,
)
from slimserve.serve.engine_process import EngineFactory, run_engine
from slimserve.serve.framing import read_frame, write_frame
from slimserve.serve.metrics import ServerMetrics
from slimserve.serve.request_stream import RequestStream
from slimserve.serve.step_gaps import StepGaps

logger = logging.getLogger(__name__)

# How long a stopping engine may take to finish its step and exit before it is killed.
STOP_TIMEOUT_S = 30.0
# Reports are one frame per step; a large read limit spares the reader pausing inside a frame.
READ_LIMIT = 2**24


class EngineStartupError(RuntimeError):
    """The engine process could not load the model."""


class EngineFailure(RuntimeError):
    """The engine raised while stepping; its requests were aborted."""


class EngineUnavailable(EngineFailure):
    """The engine process is gone: nothing runs until the server is restarted."""


class RequestRejected(ValueError):
    """The engine refused requests the front end had let through."""


@dataclass
class _InFlight:
    # None once the client has gone; the entry stays until the engine says how the request ended.
    stream: RequestStream | None
    # Index of the command that added it: the engine has seen it once it reports that many commands done.
    command: int
    arrival: float
    prompt_len: int
    first_token: float | None = None
    num_tokens: int = 0


class EngineClient:
    def __init__(self, config: EngineConfig, metrics: ServerMetrics, engine_factory: EngineFactory) -> None:
        self.config = config
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.stats = EngineStats()
        self.gaps = StepGaps()
        # Steps the engine started between abort() and the abort taking effect (the latest ones).
        self.abort_delays: deque[int] = deque(maxlen=10_000)
        self.failed: str | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task | None = None
        self._stopping = False
        self._requests: dict[str, _InFlight] = {}
        # Streams whose requests the engine has yet to take, with the index of their command.
        self._unaccepted: deque[tuple[int, RequestStream]] = deque()
        self._num_sent = 0
        self._num_done = 0

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> EngineInfo:
        ours, theirs = socket.socketpair()
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state is inherited
        # A daemonic process may not start children: with tensor parallelism the engine starts its ranks.
        daemon = self.config.tensor_parallel_size == 1
        self._process = context.Process(
            target=run_engine, args=(self.config, theirs, self.engine_factory), name="slimserve-engine", daemon=daemon
        )
        try:
            self._process.start()
        finally:
            # The child has its own copy; with ours closed, its exit closes the connection.
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours, limit=READ_LIMIT)
        try:
            first = pickle.loads(await read_frame(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            first = StartupFailure(f"the engine process exited with code {await self._exit_code()} while starting")
        if isinstance(first, StartupFailure):
            self._writer.close()
            await asyncio.to_thread(self._process.join)
            raise EngineStartupError(first.message)
        self.stats = first.stats
        self._reader = asyncio.ensure_future(self._read(reader))
        return first

    async def shutdown(self) -> None:
        if self._reader is None:
            return
        self._stopping = True
        if not self._reader.done():
            self._send(Shutdown())
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("the engine process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            await self._reader
        self._writer.close()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def connected(self) -> bool:
        """Whether the engine process is up (requests can run)."""
        return self._reader is not None and not self._reader.done()

    @property
    def alive(self) -> bool:
        """Up and never failed: what /health reports."""
        return self.connected and self.failed is None

    @property
    def idle(self) -> bool:
        """The engine has taken every command sent and runs nothing."""
        return self._num_done == self._num_sent and not self.stats.num_running and not self.stats.num_waiting

    # ---- requests --------------------------------------------------------------------------------------
    def submit(self, requests: list[EngineRequest]) -> RequestStream:
        if not self.connected:
            raise EngineUnavailable(self.failed or "the engine is not running")
        stream = RequestStream([r.request_id for r in requests])
        command = self._send(AddRequests(requests))
        now = time.perf_counter()
        for r in requests:
            self._requests[r.request_id] = _InFlight(stream, command, now, len(r.prompt_ids))
        self._unaccepted.append((command, stream))
        return stream

    def abort(self, stream: RequestStream) -> None:
        ids = stream.unfinished_ids
        if not ids:
            return
        for request_id in ids:
            item = self._requests.get(request_id)
            if item is not None:
                item.stream = None
        stream.close()
        if self.connected:
            self._send(AbortRequests(ids, time.monotonic()))

    def _send(self, command: Command) -> int:
        write_frame(self._writer, pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))
        self._num_sent += 1
        return self._num_sent - 1

    # ---- reports ---------------------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._on_report(pickle.loads(await read_frame(reader)))
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = "the server is shutting down" if self._stopping else None
        except Exception:  # a bug here would leave every request hanging: stop serving instead
            logger.exception("cannot handle the engine's report")
            self._process.kill()
            reason = "the server lost track of the engine"
        code = await self._exit_code()
        if reason is None:
            logger.error("the engine process exited with code %s", code)
            reason = f"the engine process exited with code {code}"
        self.failed = self.failed or reason
        self._end(list(self._requests), EngineUnavailable(reason))
        self._unaccepted.clear()

    async def _exit_code(self) -> int | None:
        await asyncio.to_thread(self._process.join, STOP_TIMEOUT_S)
        return self._process.exitcode

    def _on_report(self, report: StepReport) -> None:
        now = time.perf_counter()
        self._num_done += report.num_commands
        for rejection in report.rejections:
            self._end(rejection.request_ids, RequestRejected(rejection.message))
        while self._unaccepted and self._unaccepted[0][0] < self._num_done:
            self._unaccepted.popleft()[1].accept()
        for request_id in report.aborted:
            if self._requests.pop(request_id, None) is not None:
                self.metrics.observe_finish("abort")
        if report.failure is not None:
            self.failed = report.failure
            seen = [request_id for request_id, item in self._requests.items() if item.command < self._num_done]
            self._end(seen, EngineFailure(report.failure))
        for delta in report.deltas:
            self._deliver(delta, now)
        if report.step_s is not None:
            self.metrics.observe_step(report.step_s, report.gap_s)
            self.gaps.record(report.step_s, report.gap_s)
        self.abort_delays.extend(report.abort_delays)
        self.stats = report.stats

    def _deliver(self, delta: TokenDelta, now: float) -> None:
        item = self._requests.get(delta.request_id)
        if item is None:
            return
        if item.first_token is None:
            item.first_token = now
            self.metrics.ttft.observe(now - item.arrival)
        item.num_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            del self._requests[delta.request_id]
            self.metrics.observe_finish(delta.finish_reason, now - item.arrival, item.prompt_len, item.num_tokens)
            if item.num_tokens > 1:
                self.metrics.tpot.observe((now - item.first_token) / (item.num_tokens - 1))
        if item.stream is not None:
            item.stream.put(delta)

    def _end(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            item = self._requests.pop(request_id, None)
            if item is not None and item.stream is not None:
                item.stream.fail(error)
