"""What the engine returns for a request, shaped like vLLM's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.engine.speculative.stats import SpeculativeStats


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # Per generated token: {token_id: logprob} with the chosen token and the requested top alternatives.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # What this step added, for streaming.
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    # Draft acceptance of this request so far, when speculative decoding is on.
    speculative: SpeculativeStats | None = None
