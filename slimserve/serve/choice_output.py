"""One choice's output, assembled in the front end from the engine's token deltas: token ids, logprobs and
text. The engine decodes text only where it must (requests with stop strings, which it checks) and once
at the finish; the streamed text of other requests is decoded here, token by token."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from slimserve.config import SamplingParams
from slimserve.engine.detokenizer import IncrementalDetokenizer
from slimserve.serve.engine_messages import TokenDelta


@dataclass
class Delta:
    """What one choice gained since the last chunk (several engine steps may be merged)."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    text_offset: int = 0


class ChoiceOutput:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], params: SamplingParams, stream: bool
    ) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = None if params.logprobs is None else []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Without streaming, the engine's text at the finish is all there is to send.
        decode_here = stream and not params.stop
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids) if decode_here else None

    def add(self, deltas: list[TokenDelta]) -> Delta:
        tokens_before, chars_before = len(self.token_ids), len(self.text)
        for d in deltas:
            self.token_ids += d.token_ids
            if self.logprobs is not None and d.logprobs is not None:
                self.logprobs += d.logprobs
            self.text += self._new_text(d)
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
        return Delta(
            text=self.text[chars_before:],
            token_ids=self.token_ids[tokens_before:],
            logprobs=None if self.logprobs is None else self.logprobs[tokens_before:],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            text_offset=chars_before,
        )

    def _new_text(self, delta: TokenDelta) -> str:
        detok = self._detokenizer
        if detok is None:
            return delta.text
        text = "".join(detok.add(t) for t in delta.token_ids)
        # At the finish the engine has decoded the whole output at once: send what the incremental decoder
        # still held back (an incomplete character), as the engine does when it streams.
        if delta.finish_reason is not None and delta.text.startswith(detok.text):
            text += delta.text[len(detok.text) :]
        return text
