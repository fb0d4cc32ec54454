"""LLMEngine: requests in, one scheduling step at a time, outputs (with text deltas) out."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from slimserve.checkpoint.resolve import resolve_model
from slimserve.config import EngineConfig, ModelConfig, SamplingParams, parse_dtype
from slimserve.distributed.launch import launch_tensor_parallel
from slimserve.engine.detokenizer import IncrementalDetokenizer
from slimserve.engine.kv_cache import BlockManager
from slimserve.engine.outputs import CompletionOutput, RequestOutput
from slimserve.engine.runner import ModelRunner
from slimserve.engine.scheduler import Scheduler
from slimserve.engine.sequence import Sequence
from slimserve.engine.speculative.build import build_speculative, proposer_kv_bytes_per_block
from slimserve.errors import PromptTooLongError, SlimserveError
from slimserve.layers.cpu_quant import cpu_threads

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    # Text deltas every step (streaming, stop strings); otherwise the text is decoded once at the end.
    incremental: bool = True
    num_cached_tokens: int = 0
    # One copy of the prompt shared by every output (copying a long prompt per token costs O(prompt)).
    prompt_token_ids: list[int] = field(default_factory=list)


def _eos_token_ids(path: str, model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """generation_config.json decides (as in transformers' generate); config.json and the tokenizer fill in."""
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return set([eos] if isinstance(eos, int) else eos)
    if model_config.eos_token_ids:
        return set(model_config.eos_token_ids)
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def describe_kv_cache(
    num_blocks: int,
    block_size: int,
    bytes_per_block: int,
    max_model_len: int,
    world_size: int,
    layers: str | None = None,
) -> str:
    """The KV-cache plan in one line: blocks, tokens that fit, and how many sequences of the full
    max_model_len fit at once; `layers` says which layers a mixed cache keeps in full precision."""
    tokens = num_blocks * block_size
    per_seq = -(-max_model_len // block_size) * block_size
    ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
    mixed = f"; {layers}" if layers else ""
    return (
        f"KV cache: {num_blocks} blocks of {block_size} tokens = {tokens} tokens "
        f"({num_blocks * bytes_per_block / 2**30:.2f} GiB{ranks}{mixed}); max_model_len {max_model_len}: "
        f"{tokens / per_seq:.2f} sequences of that length fit at once"
    )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # Random weights need only config.json (and a tokenizer); everything else is a model to resolve.
        dummy = config.load_format == "dummy" and os.path.isfile(os.path.join(config.model, "config.json"))
        self.model_path = config.model if dummy else resolve_model(config.model)
        self.model_config = ModelConfig.from_folder(self.model_path)
        if config.max_model_len and config.max_model_len > self.model_config.max_context_len:
            raise SlimserveError(
                f"max_model_len={config.max_model_len} exceeds the model's context of "
                f"{self.model_config.max_context_len} tokens (max_position_embeddings and rope scaling)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.eos_token_ids = _eos_token_ids(self.model_path, self.model_config, self.tokenizer)
        self.device = torch.device(config.device) if config.device else default_device()
        self.dtype = parse_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads or cpu_threads())
        # Under tensor parallelism this process is rank 0; it starts (or, under torchrun, meets) the others.
        self.tensor_parallel = launch_tensor_parallel(config, self.model_config, self.model_path, self.device)
        self._shutdown = weakref.finalize(self, self.tensor_parallel.shutdown)
        self.device = self.tensor_parallel.device
        spec = config.speculative_config
        extra_kv = proposer_kv_bytes_per_block(spec, self.model_config, config.block_size, self.dtype) if spec else 0
        self.runner = ModelRunner(
            config, self.model_config, self.model_path, self.device, self.dtype, self.tensor_parallel.parallel, extra_kv
        )
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        decode_steps = config.num_decode_steps or (16 if self.device.type == "cuda" else 1)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len, decode_steps)
        self.speculative = build_speculative(spec, config, self.runner, decode_steps) if spec else None
        if self.speculative:
            self.speculative.eos_token_ids = self.eos_token_ids
        self.requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self.kv_cache_plan = describe_kv_cache(
            self.runner.num_blocks,
            config.block_size,
            self.runner.kv_bytes_per_block,
            self.max_model_len,
            self.tensor_parallel.parallel.world_size,
            self.runner.describe_kv_layers(),
        )
        logger.info("%s", self.kv_cache_plan)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (also done when the engine is garbage collected)."""
        self._shutdown()

    # ---- requests ------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, stream: bool = True
    ) -> None:
        if request_id in self.requests:
            raise SlimserveError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise SlimserveError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens does not fit max_model_len={self.max_model_len} "
                "(at least one token must be generated)"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise SlimserveError(f"prompt token ids must be in [0, {vocab})")
        seq = Sequence(request_id=request_id, token_ids=ids, params=params, arrival=next(self._arrivals))
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(params.seed)
        detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
        self.requests[request_id] = _Request(
            seq, text, detokenizer, incremental=stream or bool(params.stop), prompt_token_ids=list(ids)
        )
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and not request.seq.finished:
            self.scheduler.finish(request.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        spec = self.speculative
        window = spec.window(self.scheduler) if spec else 1
        lookahead = spec.lookahead(len(self.scheduler.running), window) if spec else 0
        batch = self.scheduler.schedule(lookahead)
        if not batch.seqs:
            return []
        for seq in batch.seqs:
            request = self.requests[seq.request_id]
            if seq.num_output_tokens == 0 and not request.num_cached_tokens:
                request.num_cached_tokens = seq.num_computed_tokens
        result = None
        if spec:
            spec.release(self.requests)
            if lookahead and batch.is_decode_only:
                result = spec.execute(batch, window)
        speculated = result is not None
        if result is None:
            result = self.runner.execute(batch)
            if spec:
                spec.observe(batch, self.runner.last_hidden if batch.num_steps == 1 else None)
        if batch.num_steps == 1 and not speculated:
            # Register computed blocks before the new token lands: a prefill's blocks are shareable even
            # if the request finishes right away.
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                seq.num_computed_tokens += n
                self.block_manager.register_full_blocks(seq)
        outputs = []
        for j, i in enumerate(result.rows):
            seq = batch.seqs[i]
            request = self.requests[seq.request_id]
            deltas, new_ids = [], []
            for step, token in enumerate(result.token_ids[j]):
                seq.token_ids.append(token)
                if result.logprobs is not None:
                    logprob = result.logprobs[j][step]
                    seq.cumulative_logprob += logprob
                    if seq.params.logprobs is not None:
                        entry = {token: logprob}
                        if result.top_logprobs is not None:
                            entry.update(list(result.top_logprobs[j][step].items())[: seq.params.logprobs])
                        seq.logprobs.append(entry)
                new_ids.append(token)
                deltas.append(self._advance(request, token))
                if seq.finished:
                    break
            # One output per request per step, however many tokens the step produced: building an output
            # copies the sequence's tokens, so one per token would cost quadratic time over a long output.
            outputs.append(self._output(request, "".join(deltas), new_ids))
            if batch.num_steps > 1 and not seq.finished:
                seq.num_computed_tokens += batch.num_steps
                self.block_manager.register_full_blocks(seq)
            elif speculated and not seq.finished:
                # The last token and the accepted drafts are now in the cache; the rejected drafts' blocks go back.
                seq.num_computed_tokens += len(result.token_ids[j])
                self.block_manager.register_full_blocks(seq)
                self.block_manager.trim(seq)
        return outputs

    def _advance(self, request: _Request, token: int) -> str:
        """Checks the new token against the stop conditions (finishing the request on one) and returns
        the text it adds."""
        seq = request.seq
        params = seq.params
        delta = request.detokenizer.add(token) if request.incremental else ""
        reason, stop_reason = None, None
        if not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif params.stop:
            reason, stop_reason, delta = self._check_stop_strings(request, delta)
        if reason is None and (seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if stop_reason is None or isinstance(stop_reason, int):
                delta += self._flush_text(request)
            self.scheduler.finish(seq, reason)
            seq.stop_reason = stop_reason
            del self.requests[seq.request_id]
        return delta

    @staticmethod
    def _check_stop_strings(request: _Request, delta: str) -> tuple[str | None, str | None, str]:
        """A stop string ends the output just before it (and is not returned)."""
        detok = request.detokenizer
        longest = max(len(s) for s in request.seq.params.stop)
        search_from = max(0, len(detok.text) - len(delta) - longest + 1)
        hits = [(detok.text.find(s, search_from), s) for s in request.seq.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return None, None, delta
        pos, stop = min(hits)
        emitted_before = len(detok.text) - len(delta)
        detok.text = detok.text[:pos]
        return "stop", stop, detok.text[emitted_before:]

    def _flush_text(self, request: _Request) -> str:
        """At the end, decode all output tokens at once; emit whatever the incremental decoder held back."""
        detok = request.detokenizer
        full = detok.full_text(request.seq.output_token_ids)
        tail = full[len(detok.text) :] if full.startswith(detok.text) else ""
        detok.text += tail
        return tail

    def _output(self, request: _Request, delta: str, new_ids: list[int]) -> RequestOutput:
        seq = request.seq
        completion = CompletionOutput(
            index=0,
            text=request.detokenizer.text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=seq.finished,
            new_text=delta,
            new_token_ids=new_ids,
            num_cached_tokens=request.num_cached_tokens,
            speculative=self._speculative_stats(seq.request_id),
        )

    def _speculative_stats(self, request_id: str):
        stats = self.speculative.request_stats.get(request_id) if self.speculative else None
        return dataclasses.replace(stats) if stats is not None else None
