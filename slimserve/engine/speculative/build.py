"""Builds the speculative decoder an EngineConfig asks for: the proposer and what it owns."""

from __future__ import annotations

import dataclasses

import torch

from slimserve.checkpoint.resolve import resolve_model
from slimserve.config import EngineConfig, ModelConfig
from slimserve.engine.runner import ModelRunner
from slimserve.engine.speculative.config import SpeculativeConfig
from slimserve.engine.speculative.decoder import SpeculativeDecoder
from slimserve.engine.speculative.draft_model import DraftModelProposer
from slimserve.engine.speculative.ngram import NgramProposer
from slimserve.engine.speculative.ngram_window import NgramWindows
from slimserve.engine.speculative.proposer import Proposer


def _kv_bytes(cfg: ModelConfig, num_layers: int, block_size: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize * block_size


def proposer_kv_bytes_per_block(
    spec: SpeculativeConfig, target: ModelConfig, block_size: int, dtype: torch.dtype
) -> int:
    """KV-cache memory the proposer keeps beside each of the target's blocks."""
    if spec.method == "draft":
        draft = ModelConfig.from_folder(resolve_model(spec.model))
        return _kv_bytes(draft, draft.num_hidden_layers, block_size, dtype)
    if spec.method == "eagle":
        return _kv_bytes(target, 1, block_size, dtype)
    return 0


def _draft_proposer(spec: SpeculativeConfig, config: EngineConfig, target: ModelRunner) -> Proposer:
    path = resolve_model(spec.model)
    draft_config = ModelConfig.from_folder(path)
    # A draft with another tokenizer stays lossless (the target verifies every token), it is just rarely right.
    # The draft mirrors the target's cache layout: as many blocks, the same block tables. The layers kept out
    # of a quantized cache are the target's; the draft takes those its own checkpoint names.
    draft_engine_config = dataclasses.replace(
        config,
        model=path,
        kv_cache_skip_layers=None,
        num_kv_blocks=target.num_blocks,
        max_model_len=target.max_model_len,
        max_num_seqs=min(config.max_num_seqs, spec.disable_by_batch_size),
        speculative_config=None,
    )
    runner = ModelRunner(draft_engine_config, draft_config, path, target.device, target.dtype)
    return DraftModelProposer(runner, target.model_config.vocab_size, config.seed)


def build_speculative(
    spec: SpeculativeConfig, config: EngineConfig, runner: ModelRunner, decode_steps: int
) -> SpeculativeDecoder:
    """decode_steps: the longest decode window the scheduler grants (the most iterations a device window runs)."""
    if spec.method == "ngram":
        proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        limits = (spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
        windows = NgramWindows(runner, *limits, spec.disable_by_batch_size, decode_steps)
        return SpeculativeDecoder(spec, runner, proposer, config.seed, windows)
    if spec.method == "draft":
        proposer: Proposer = _draft_proposer(spec, config, runner)
    else:
        from slimserve.engine.speculative.eagle import EagleProposer

        proposer = EagleProposer.load(spec.model, runner, config.seed, spec.disable_by_batch_size)
    return SpeculativeDecoder(spec, runner, proposer, config.seed)
