"""CPU INT8/INT4 weight-only linears: each layer equals a float linear over the rounded weight, and the
engine's greedy output equals transformers' over the same rounded weights, token for token."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from slimserve import LLM, SamplingParams
from slimserve.errors import SlimserveError
from slimserve.layers.cpu_quant import Int4CpuLinear, Int8CpuLinear, cpu_threads
from tests.tiny_models import build_tiny_model


def int8_rounded(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round().clamp(-128, 127) * scale


def int4_rounded(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    group = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    return (((g - lo) / scale).round().clamp(0, 15) * scale + lo).view(n, k)


@pytest.mark.parametrize("cls,rounded", [(Int8CpuLinear, int8_rounded), (Int4CpuLinear, int4_rounded)])
def test_layer_equals_float_linear_of_rounded_weight(cls, rounded):
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(48, 192, generator=g), torch.randn(48, generator=g), torch.randn(2, 5, 192, generator=g)
    out = cls(w, b, torch.float32)(x)
    torch.testing.assert_close(out, nn.functional.linear(x, rounded(w), b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama3.2", "qwen2.5"])
def test_engine_greedy_equals_transformers_on_rounded_weights(tmp_path, mode, family):
    folder = build_tiny_model(family, str(tmp_path / family))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rounded = int8_rounded if mode == "int8" else int4_rounded
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(rounded(module.weight))
        # The output head is INT8 in both modes; the embedding keeps its float weight.
        model.lm_head.weight = nn.Parameter(int8_rounded(model.lm_head.weight.detach().clone()))
    prompts = [[5, 9, 33, 2, 71], list(range(3, 40))]
    expected = [
        model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    llm = LLM(folder, device="cpu", dtype="float32", cpu_quantization=mode, num_kv_blocks=64)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_bad_mode_and_device_are_one_line_errors(llama_folder):
    with pytest.raises(SlimserveError, match="cpu_quantization"):
        LLM(llama_folder, device="cpu", cpu_quantization="int3")
    assert cpu_threads() >= 1
