"""Mixture-of-experts families: greedy output equals transformers' token for token (fp32, CPU), with
batching, chunked prefill, prefix-cache hits, multi-step decode and preemption; both checkpoint layouts
of the experts load to the same weights; a missing expert is a clear error."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimserve.checkpoint.hf_folder import iter_safetensors
from slimserve.config import ModelConfig
from slimserve.errors import CheckpointError
from slimserve.layers.moe import SparseMoeBlock
from slimserve.models.registry import model_class
from tests.engine.test_exact_vs_transformers import check_engine, make_prompts, transformers_greedy
from tests.tiny_models import MOE_FAMILIES, build_tiny_model


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def moe_folder(request, tmp_path_factory):
    return build_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_greedy_equals_transformers(moe_folder):
    prompts = make_prompts(0)
    expected = transformers_greedy(moe_folder, prompts)
    llm = check_engine(moe_folder, expected, prompts, block_size=4, max_num_batched_tokens=24, num_decode_steps=4)
    assert llm.engine.block_manager.prefix_hits > 0
    # 16 blocks of 4 tokens: the batch does not fit, sequences are preempted and recomputed.
    llm = check_engine(moe_folder, expected, prompts, block_size=4, num_kv_blocks=16, num_decode_steps=1)
    assert llm.engine.scheduler.num_preemptions > 0


def _empty_model(folder: str):
    cfg = ModelConfig.from_folder(folder)
    return model_class(cfg)(cfg)


def test_stacked_and_per_expert_layouts_load_alike(moe_folder):
    per_expert = _empty_model(moe_folder)
    per_expert.load_weights(iter_safetensors(moe_folder, torch.device("cpu"), torch.float32))
    assert any(isinstance(layer.mlp, SparseMoeBlock) for layer in per_expert.layers)
    # transformers holds the experts of a layer stacked: experts.gate_up_proj [E, 2I, H], experts.down_proj.
    stacked = _empty_model(moe_folder)
    stacked.load_weights(AutoModelForCausalLM.from_pretrained(moe_folder).state_dict().items())
    for (name, a), (_, b) in zip(per_expert.named_parameters(), stacked.named_parameters()):
        assert torch.equal(a, b), name


def test_missing_expert_is_reported(moe_folder):
    tensors = [
        (name, t)
        for name, t in iter_safetensors(moe_folder, torch.device("cpu"), torch.float32)
        if ".experts.1." not in name
    ]
    with pytest.raises(CheckpointError, match="checkpoint lacks"):
        _empty_model(moe_folder).load_weights(tensors)
