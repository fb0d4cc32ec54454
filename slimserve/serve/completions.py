"""POST /v1/completions: prompts (texts or token ids, one or several) in, text completions out."""

from __future__ import annotations

from slimserve.serve.choice_output import Delta
from slimserve.serve.logprobs import completion_logprobs
from slimserve.serve.protocol import CompletionRequest
from slimserve.serve.serving import Choice, Endpoint


class CompletionEndpoint(Endpoint):
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    body: CompletionRequest

    def prompts(self) -> list[list[int]]:
        pre = self.ctx.preprocessor
        prompts = [pre.encode(p) for p in self.body.prompts()]
        for ids in prompts:
            pre.check_prompt(ids, "prompt")
        return prompts

    def max_tokens(self) -> tuple[int | None, int | None, str]:
        # OpenAI's default of 16 applies when the field is left out; an explicit null means "as many as fit".
        return self.body.max_tokens, None, "max_tokens"

    def num_logprobs(self) -> int | None:
        return self.body.logprobs

    def _logprobs(self, token_ids: list[int], entries, offset: int) -> dict | None:
        if self.body.logprobs is None or entries is None:
            return None
        return completion_logprobs(token_ids, entries, self.body.logprobs, self.decode_token, offset)

    def response_choice(self, choice: Choice) -> dict:
        output = choice.output
        return {
            "index": choice.index,
            "text": output.text,
            "logprobs": self._logprobs(output.token_ids, output.logprobs, 0),
            "finish_reason": output.finish_reason,
            "stop_reason": output.stop_reason,
        }

    def chunk_choice(self, choice: Choice, delta: Delta) -> dict:
        return {
            "index": choice.index,
            "text": delta.text,
            "logprobs": self._logprobs(delta.token_ids, delta.logprobs, delta.text_offset),
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
