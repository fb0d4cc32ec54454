"""The engine process: owns the LLMEngine (and the device) and steps it back to back. Between two steps it
takes whatever commands have arrived without waiting for more; it blocks only while it has nothing to run.
Each iteration goes back to the front end as one StepReport."""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import time
from collections import deque
from collections.abc import Callable

import torch

from slimserve.config import EngineConfig
from slimserve.engine.engine import LLMEngine
from slimserve.engine.outputs import RequestOutput
from slimserve.serve.engine_messages import (
    AbortRequests,
    AddRequests,
    Command,
    EngineInfo,
    EngineStats,
    Rejection,
    Shutdown,
    StartupFailure,
    StepReport,
    TokenDelta,
)
from slimserve.serve.framing import FrameSocket

logger = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], LLMEngine]

# Step start times kept to date aborts against; an abort later than this many steps reads as this many.
_STEP_STARTS_KEPT = 8


def token_deltas(outputs: list[RequestOutput]) -> list[TokenDelta]:
    """The step's outputs (one per request that advanced) as the deltas the front end streams."""
    deltas = []
    for out in outputs:
        completion = out.outputs[0]
        new = len(out.new_token_ids)
        logprobs = None if completion.logprobs is None else completion.logprobs[len(completion.logprobs) - new :]
        deltas.append(
            TokenDelta(
                out.request_id,
                out.new_token_ids,
                logprobs,
                out.new_text,
                completion.finish_reason,
                completion.stop_reason,
            )
        )
    return deltas


def run_engine(config: EngineConfig, sock: socket.socket, engine_factory: EngineFactory) -> None:
    """Main function of the engine process."""
    # Ctrl-C reaches the whole process group; the front end stops the engine once its requests are done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = FrameSocket(sock)
    try:
        engine = engine_factory(config)
    except Exception as e:  # reported to the front end, which fails its startup with the message
        message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        channel.send(pickle.dumps(StartupFailure(message)))
        channel.close()
        return
    if engine.device.type == "cpu":
        # The front end is a process of its own and needs a core; torch's threads would take them all
        # (and spin in its barriers while the front end runs).
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    worker = EngineWorker(engine, channel)
    info = EngineInfo(engine.max_model_len, engine.model_config.vocab_size, worker.stats())
    channel.send(pickle.dumps(info))
    worker.run()


class EngineWorker:
    def __init__(self, engine: LLMEngine, channel: FrameSocket) -> None:
        self.engine = engine
        self.channel = channel
        self._num_steps = 0
        self._max_gap = 0.0
        self._last_step_end: float | None = None
        self._step_starts: deque[float] = deque(maxlen=_STEP_STARTS_KEPT)

    def run(self) -> None:
        try:
            while (commands := self._receive()) is not None:
                self._iterate(commands)
        except (EOFError, ConnectionError):  # the front end is gone: there is no one to serve
            return
        self.channel.close()

    def _receive(self) -> list[Command] | None:
        """The commands that have arrived, waiting for the first only while there is nothing to run.
        None once the front end asks the engine to stop."""
        idle = not self.engine.has_unfinished_requests()
        if idle:
            self._last_step_end = None  # waiting for work is no gap between steps
        frames = self.channel.receive(block=idle)
        commands: list[Command] = [pickle.loads(frame) for frame in frames]
        if any(isinstance(c, Shutdown) for c in commands):
            return None
        return commands

    def _iterate(self, commands: list[Command]) -> None:
        report = StepReport(num_commands=len(commands))
        outputs: list[RequestOutput] = []
        try:
            for command in commands:
                if isinstance(command, AddRequests):
                    self._add(command, report)
                else:
                    self._abort(command, report)
            if self.engine.has_unfinished_requests():
                outputs = self._step(report)
        except Exception as e:  # a bug or a device error: fail what runs, keep serving
            logger.exception("the engine failed")
            self._abort_all()
            report.failure = f"the engine failed: {type(e).__name__}: {e}"
        report.stats = self.stats()
        report.deltas = token_deltas(outputs)
        self.channel.send(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))

    def _add(self, command: AddRequests, report: StepReport) -> None:
        added = []
        try:
            for r in command.requests:
                # No incremental text: the front end decodes. The engine still decodes requests with stop
                # strings as they run (to free their blocks as soon as one appears).
                self.engine.add_request(r.request_id, r.prompt_ids, r.params, stream=False)
                added.append(r.request_id)
        except ValueError as e:  # the front end validates first; this is the engine's second opinion
            for request_id in added:
                self.engine.abort_request(request_id)
            report.rejections.append(Rejection([r.request_id for r in command.requests], str(e)))

    def _abort(self, command: AbortRequests, report: StepReport) -> None:
        for request_id in command.request_ids:
            if request_id in self.engine.requests:
                self.engine.abort_request(request_id)
                report.aborted.append(request_id)
        report.abort_delays.append(sum(1 for start in self._step_starts if start > command.sent_at))

    def _step(self, report: StepReport) -> list[RequestOutput]:
        start = time.monotonic()
        self._step_starts.append(start)
        outputs = self.engine.step()
        end = time.monotonic()
        self._num_steps += 1
        report.step_s = end - start
        if self._last_step_end is not None:
            report.gap_s = start - self._last_step_end
            self._max_gap = max(self._max_gap, report.gap_s)
        self._last_step_end = end
        return outputs

    def _abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine is already broken; its blocks are no longer trustworthy
                logger.exception("could not abort %s", request_id)

    def stats(self) -> EngineStats:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        spec = self.engine.speculative.stats if self.engine.speculative else None
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            num_preemptions=sched.num_preemptions,
            num_steps=self._num_steps,
            max_step_gap_s=self._max_gap,
            spec_num_drafts=spec.num_drafts if spec else 0,
            spec_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_accepted_tokens=spec.num_accepted_tokens if spec else 0,
        )
