"""What the front end and the engine process say to each other (pickled, one frame per message).

Front end to engine: AddRequests, AbortRequests, Shutdown. Engine to front end: EngineInfo (or
StartupFailure) once, then one StepReport per iteration of its loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.config import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class AddRequests:
    """The choices of one HTTP request: the engine takes all of them or refuses all of them."""

    requests: list[EngineRequest]


@dataclass
class AbortRequests:
    request_ids: list[str]
    # time.monotonic() at the front end: one clock for both processes (CLOCK_MONOTONIC), so the engine
    # can count the steps it started after the abort was sent.
    sent_at: float


@dataclass
class Shutdown:
    pass


Command = AddRequests | AbortRequests | Shutdown


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after an iteration, read by /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 1
    num_free_blocks: int = 1
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    max_step_gap_s: float = 0.0
    # Speculative decoding (zero when it is off): verifications with drafts, drafted and accepted tokens.
    spec_num_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


@dataclass
class EngineInfo:
    """Sent once the engine is ready: the facts the front end validates requests against."""

    max_model_len: int
    vocab_size: int
    stats: EngineStats


@dataclass
class StartupFailure:
    message: str


@dataclass
class TokenDelta:
    """What one request gained in one step (several tokens when several decode steps ran)."""

    request_id: str
    token_ids: list[int]
    # One {token_id: logprob} per new token, when the request asked for logprobs.
    logprobs: list[dict[int, float]] | None
    # Text the engine decoded in this step: deltas for requests with stop strings (it must see the text to
    # check them), and for the others nothing until the finish, where it is the whole output.
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Rejection:
    """The engine refused an AddRequests (a ValueError from add_request); none of its requests run."""

    request_ids: list[str]
    message: str


@dataclass
class StepReport:
    """One iteration of the engine loop: the commands it took, the step it ran, the state afterwards."""

    num_commands: int
    stats: EngineStats = EngineStats()
    deltas: list[TokenDelta] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Requests an abort ended (those that had finished already are not listed).
    aborted: list[str] = field(default_factory=list)
    # Per AbortRequests: steps started between its sending and its taking effect.
    abort_delays: list[int] = field(default_factory=list)
    # Set when the engine raised: every request it held was aborted.
    failure: str | None = None
    step_s: float | None = None
    # From the end of the previous step, when requests were unfinished all along.
    gap_s: float | None = None
