"""The engine loop: one thread owns the LLMEngine and steps it; the asyncio front end talks to it through
a thread-safe command queue (add, abort) and gets each step's outputs back on its event loop.

Only this thread touches the engine, so the engine needs no locks. The front end tokenizes, validates
and formats; the loop thread only adds ready token ids, steps, and hands outputs over.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from slimserve.config import SamplingParams
from slimserve.engine.engine import LLMEngine
from slimserve.engine.outputs import RequestOutput
from slimserve.serve.metrics import ServerMetrics
from slimserve.serve.request_stream import RequestStream
from slimserve.serve.step_gaps import StepGaps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the loop publishes after every step, read by /metrics without touching the engine."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 1
    num_free_blocks: int = 1
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    max_step_gap_s: float = 0.0


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class EngineFailure(RuntimeError):
    """The engine raised while stepping; its requests were aborted."""


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stats = EngineStats()
        self.gaps = StepGaps()
        self.failed: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._num_steps = 0
        self._last_step_end: float | None = None
        # Event-loop side: which stream each engine request's outputs go to.
        self._streams: dict[str, RequestStream] = {}
        # Loop-thread side: arrival and first-token times, for the latency histograms.
        self._timing: dict[str, list[float]] = {}
        self._non_streaming: set[str] = set()
        # Steps the engine ran between abort() and the abort taking effect (the latest ones).
        self.abort_delays: deque[int] = deque(maxlen=10_000)

    # ---- lifecycle (event loop) ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="slimserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failed is None

    # ---- requests (event loop) -------------------------------------------------------------------
    def submit(self, requests: list[EngineRequest], stream: bool) -> RequestStream:
        handle = RequestStream([r.request_id for r in requests])
        for r in requests:
            self._streams[r.request_id] = handle
        self._send(("add", requests, stream, time.perf_counter()))
        return handle

    def abort(self, handle: RequestStream) -> None:
        ids = handle.unfinished_ids
        if not ids:
            return
        for request_id in ids:
            self._streams.pop(request_id, None)
        handle.close()
        self._send(("abort", ids, self.stats.num_steps))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            handle = self._streams.get(out.request_id)
            if handle is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            handle.put(out)

    def _fail_all(self, error: BaseException) -> None:
        for handle in set(self._streams.values()):
            handle.fail(error)
        self._streams.clear()

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            handle = self._streams.pop(request_id, None)
            if handle is not None:
                handle.fail(error)

    # ---- the loop (engine thread) ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished_requests() and self._commands.empty():
                self._last_step_end = None
                self._publish_stats()
                self._wake.wait()
                self._wake.clear()
            try:
                self._iterate()
            except Exception as e:  # a bug or a device error: fail what runs, keep the loop alive
                logger.exception("the engine loop failed")
                self._abort_all(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))

    def _iterate(self) -> None:
        self._drain_commands()
        if not self.engine.has_unfinished_requests():
            return
        start = time.perf_counter()
        outputs = self.engine.step()
        end = time.perf_counter()
        self._num_steps += 1
        gap = None if self._last_step_end is None else start - self._last_step_end
        self._last_step_end = end
        self.gaps.record(end - start, gap)
        self.metrics.observe_step(end - start, gap)
        forward = self._observe(outputs, end)
        self._publish_stats()
        if forward:
            self._loop.call_soon_threadsafe(self._deliver, forward)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._abort(*command[1:])

    def _add(self, requests: list[EngineRequest], stream: bool, arrival: float) -> None:
        added = []
        try:
            for r in requests:
                self.engine.add_request(r.request_id, r.prompt_ids, r.params, stream=stream)
                added.append(r.request_id)
                self._timing[r.request_id] = [arrival, 0.0]
                if not stream:
                    self._non_streaming.add(r.request_id)
        except ValueError as e:  # the front end validates first; this is the engine's second opinion
            for request_id in added:
                self._forget(request_id)
                self.engine.abort_request(request_id)
            ids = [r.request_id for r in requests]
            self._loop.call_soon_threadsafe(self._fail, ids, e)

    def _abort(self, request_ids: list[str], requested_at_step: int) -> None:
        for request_id in request_ids:
            if self._forget(request_id):
                self.engine.abort_request(request_id)
                self.metrics.observe_finish("abort")
        self.abort_delays.append(self._num_steps - requested_at_step)

    def _forget(self, request_id: str) -> bool:
        self._non_streaming.discard(request_id)
        return self._timing.pop(request_id, None) is not None

    def _abort_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine is already broken; its blocks are no longer trustworthy
                logger.exception("could not abort %s", request_id)
        self._timing.clear()
        self._non_streaming.clear()
        self.failed = str(error)
        self._loop.call_soon_threadsafe(self._fail_all, error)

    def _observe(self, outputs: list[RequestOutput], now: float) -> list[RequestOutput]:
        """Record latencies; return the outputs the front end needs (non-streaming requests only need
        their last one)."""
        forward = []
        for out in outputs:
            timing = self._timing.get(out.request_id)
            if timing is None:
                continue
            arrival, first = timing
            if not first:
                timing[1] = first = now
                self.metrics.ttft.observe(now - arrival)
            if out.finished:
                self._forget(out.request_id)
                completion = out.outputs[0]
                n = len(completion.token_ids)
                self.metrics.observe_finish(completion.finish_reason, now - arrival, len(out.prompt_token_ids), n)
                if n > 1:
                    self.metrics.tpot.observe((now - first) / (n - 1))
                forward.append(out)
            elif out.request_id not in self._non_streaming:
                forward.append(out)
        return forward

    def _publish_stats(self) -> None:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        self.stats = EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            num_preemptions=sched.num_preemptions,
            num_steps=self._num_steps,
            max_step_gap_s=self.gaps.max_gap,
        )
