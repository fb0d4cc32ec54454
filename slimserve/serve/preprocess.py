"""Turn a validated request into engine requests: tokenize, check the context fits, build sampling
parameters per choice. Runs in the front end so that the engine process only ever receives token ids."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from slimserve.config import SamplingParams
from slimserve.errors import SlimserveError
from slimserve.serve.errors import APIError
from slimserve.serve.protocol import SamplingFields

# Below this a temperature overflows the logits; the distribution is one-hot anyway.
MIN_TEMPERATURE = 1e-5


class Preprocessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        # As the engine process reported them at startup.
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def encode(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        try:
            return self.tokenizer.encode(prompt)
        except Exception as e:  # a tokenizer without an unknown-token fallback rejects unseen text
            raise APIError(f"the tokenizer cannot encode the prompt: {e}", param="prompt") from e

    def encode_chat(self, conversation: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise APIError("this model has no chat template; use /v1/completions", param="messages")
        try:
            return list(
                self.tokenizer.apply_chat_template(
                    conversation, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        except Exception as e:  # a template may reject a conversation (roles out of order, ...)
            raise APIError(f"the chat template rejected the messages: {e}", param="messages") from e

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError("the prompt is empty", param=param)
        if len(ids) >= self.max_model_len:
            raise APIError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate",
                param=param,
                code="context_length_exceeded",
            )
        if max(ids) >= self.vocab_size:
            raise APIError(f"token ids must be below the vocabulary size {self.vocab_size}", param=param)

    def max_tokens(self, requested: int | None, default: int | None, prompt_len: int, param: str) -> int:
        """The requested budget must fit the context; without one, what the default allows and fits."""
        room = self.max_model_len - prompt_len
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(
                f"this model's context is {self.max_model_len} tokens: {prompt_len} prompt tokens leave room for "
                f"{room}, but {param}={requested}",
                param=param,
                code="context_length_exceeded",
            )
        return requested


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    """Choice i of a seeded request is seeded with seed + i: reproducible, and the choices differ."""
    temperature = 1.0 if req.temperature is None else req.temperature
    try:
        return SamplingParams(
            temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=None if req.seed is None else req.seed + choice,
            max_tokens=max_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos),
            logprobs=logprobs,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
        )
    except SlimserveError as e:
        raise APIError(str(e)) from e
