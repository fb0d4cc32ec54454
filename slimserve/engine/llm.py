"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import itertools
from typing import Any

from tqdm import tqdm

from slimserve.config import EngineConfig, SamplingParams
from slimserve.engine.engine import LLMEngine
from slimserve.engine.outputs import RequestOutput

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, str]


def _prompt_of(prompt: Prompt) -> str | list[int]:
    """A text, a list of token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": [...]}."""
    if isinstance(prompt, dict):
        return prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
    return prompt


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        speculative: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """speculative: e.g. {"method": "ngram", "num_speculative_tokens": 4} (also as speculative_config)."""
        if speculative is not None:
            kwargs["speculative_config"] = speculative
        config = EngineConfig(
            model=model or "default",
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            **kwargs,
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        order: dict[str, int] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params_list)):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, _prompt_of(prompt), p, stream=False)
                order[request_id] = i
        except ValueError:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Generate replies to one or several conversations, formatted by the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, **template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[Message], **template_kwargs: Any) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False, **template_kwargs
        )
