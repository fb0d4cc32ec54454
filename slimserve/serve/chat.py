"""POST /v1/chat/completions: a conversation, formatted by the model's chat template, in; assistant
messages out."""

from __future__ import annotations

from slimserve.serve.choice_output import Delta
from slimserve.serve.errors import APIError
from slimserve.serve.logprobs import chat_logprobs
from slimserve.serve.protocol import ChatCompletionRequest
from slimserve.serve.serving import Choice, Endpoint


class ChatEndpoint(Endpoint):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    body: ChatCompletionRequest

    def prompts(self) -> list[list[int]]:
        if self.body.top_logprobs and not self.body.logprobs:
            raise APIError("top_logprobs needs logprobs to be true", param="top_logprobs")
        ids = self.ctx.preprocessor.encode_chat(self.body.conversation())
        self.ctx.preprocessor.check_prompt(ids, "messages")
        return [ids]

    def max_tokens(self) -> tuple[int | None, int | None, str]:
        if self.body.max_completion_tokens is not None:
            return self.body.max_completion_tokens, None, "max_completion_tokens"
        return self.body.max_tokens, None, "max_tokens"

    def num_logprobs(self) -> int | None:
        return (self.body.top_logprobs or 0) if self.body.logprobs else None

    def _logprobs(self, token_ids: list[int], entries) -> dict | None:
        if not self.body.logprobs or entries is None:
            return None
        return chat_logprobs(token_ids, entries, self.body.top_logprobs or 0, self.decode_token)

    def response_choice(self, choice: Choice) -> dict:
        output = choice.output
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": output.text},
            "logprobs": self._logprobs(output.token_ids, output.logprobs),
            "finish_reason": output.finish_reason,
            "stop_reason": output.stop_reason,
        }

    def opening_chunks(self) -> list[dict]:
        # The first chunk of each choice carries the role, as OpenAI's do.
        delta = {"role": "assistant", "content": ""}
        return [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None} for c in self.choices]

    def chunk_choice(self, choice: Choice, delta: Delta) -> dict:
        return {
            "index": choice.index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": self._logprobs(delta.token_ids, delta.logprobs),
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
