"""FP8 mixture-of-experts checkpoints written by slimserve's compressor (tiny random Mixtral, Qwen2-MoE with
its shared expert, Qwen3-MoE, built from real configs) run in the engine with FP8 expert banks, and give the
greedy tokens and log-probabilities of `transformers` + compressed-tensors on the same checkpoint (CPU, fp32).

transformers keeps each layer's experts as two stacked tensors, dequantized at load, and leaves their inputs
unrounded; the checkpoint's scheme rounds them (every expert projection is a quantized Linear target, as
vLLM runs it). The oracle therefore unfuses the experts and rounds each expert projection's input with
compressed-tensors' own `forward_quantize` and the checkpoint's arguments."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimserve import LLM, SamplingParams
from slimserve.compress import preset, quantize_, save_compressed
from slimserve.compress.api import Calibration
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.moe import ExpertMLP, checkpoint_name, unfuse_experts
from slimserve.errors import SlimserveError
from slimserve.layers.moe_fp8 import Fp8FusedExperts
from slimserve.layers.quantized import QuantLinearBase
from tests.tiny_models import VOCAB, build_tiny_model

MAX_NEW = 6
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(40, 63)), [300, 301, 302, 9, 9, 9, 17, 18, 19, 20, 21]]


@contextlib.contextmanager
def one_thread():
    """The experts are many small ops: on a shared machine one thread runs them several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compressed_moe(tmp_path, family: str, scheme: str, **options) -> str:
    folder = build_tiny_model(family, str(tmp_path / family))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = preset(scheme, **options)
    calib = None
    if config.needs_calibration:
        g = torch.Generator().manual_seed(0)
        calib = Calibration([torch.randint(3, VOCAB, (1, 64), generator=g) for _ in range(4)], "test")
    with one_thread():
        quantize_(model, config, calib, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return str(save_compressed(model, config, tmp_path / f"{family}-{scheme}", tokenizer=tokenizer))


def round_expert_inputs(model: torch.nn.Module, folder: str) -> None:
    """Give every expert projection its input rounding (compressed-tensors' function, the checkpoint's args)."""
    with open(f"{folder}/config.json") as f:
        q = json.load(f)["quantization_config"]
    (group,) = q["config_groups"].values()
    if group["input_activations"] is None:
        return
    args = QuantizationArgs(**group["input_activations"])
    tensors = load_file(f"{folder}/model.safetensors")
    unfuse_experts(model)
    model_type = model.config.model_type
    for name, module in model.named_modules():
        if not isinstance(module, ExpertMLP):
            continue
        for proj in module.names:
            linear = getattr(module, proj)
            linear.quantization_status = QuantizationStatus.FROZEN
            if not args.dynamic:
                linear.input_scale = tensors[f"{checkpoint_name(model_type, name)}.{proj}.input_scale"]
                linear.input_zero_point = None
            # Rows are tokens: compressed-tensors takes per-token scales over the last dimension of [batch,
            # tokens, features] inputs (of a 2D input it would take one scale per element).
            linear.register_forward_pre_hook(lambda m, inp: (forward_quantize(m, inp[0][None], "input", args)[0],))


def transformers_greedy(folder: str) -> list[tuple[list[int], list[float]]]:
    model, _ = load_causal_lm(folder)
    round_expert_inputs(model, folder)
    results = []
    for prompt in PROMPTS:
        with torch.no_grad(), one_thread():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        tokens = out.sequences[0, len(prompt) :].tolist()
        results.append((tokens, [s[0].log_softmax(-1)[t].item() for s, t in zip(out.scores, tokens)]))
    return results


def engine_greedy(folder: str, **kwargs) -> tuple[LLM, list[tuple[list[int], list[float]]]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    with one_thread():
        llm = LLM(folder, dtype="float32", device="cpu", block_size=4, cpu_threads=1, **kwargs)
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    return llm, [(o.token_ids, [e[t] for e, t in zip(o.logprobs, o.token_ids)]) for o in outs]


# Rounded activations amplify 1e-7 differences between two correct fp32 implementations whenever a value sits
# on a rounding boundary (see tests/quant/test_engine_quantized.py).
CASES = [
    ("mixtral", "FP8_STATIC", {"weight_granularity": "tensor"}, 1e-4),
    ("qwen2-moe", "FP8_WEIGHT_ONLY", {}, 1e-4),
    ("qwen3-moe", "FP8", {}, 1e-4),
]


@pytest.mark.parametrize("family,scheme,options,atol", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_fp8_moe_matches_transformers(tmp_path, family, scheme, options, atol):
    folder = compressed_moe(tmp_path, family, scheme, **options)
    llm, ours = engine_greedy(folder)
    model = llm.engine.runner.model
    banks = [m for m in model.modules() if isinstance(m, Fp8FusedExperts)]
    assert banks and all(b.w13_weight.dtype == torch.float8_e4m3fn for b in banks)
    assert any(isinstance(m, QuantLinearBase) for m in model.modules())  # attention (and shared expert) layers
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(ours, transformers_greedy(folder)):
        assert tokens == want_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=atol, rtol=0)


def with_quantization_config(tmp_path, family: str, group: dict) -> str:
    """A tiny MoE folder whose config.json declares `group` for every linear layer (the weights stay bf16)."""
    folder = build_tiny_model(family, str(tmp_path / family))
    with open(f"{folder}/config.json") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "compressed-tensors", "quantization_status": "compressed",
                                     "config_groups": {"group_0": {"targets": ["Linear"], **group}}}  # fmt: skip
    with open(f"{folder}/config.json", "w") as f:
        json.dump(config, f)
    return folder


FP8_CHANNEL = dict(num_bits=8, type="float", symmetric=True, strategy="channel")


def test_dummy_fp8_experts_from_config_alone(tmp_path):
    """load_format="dummy" (speed runs) draws FP8 banks and their scales."""
    group = {"format": "float-quantized", "weights": FP8_CHANNEL,
             "input_activations": dict(num_bits=8, type="float", strategy="token", dynamic=True)}  # fmt: skip
    folder = with_quantization_config(tmp_path, "qwen3-moe", group)
    with one_thread():
        llm = LLM(folder, dtype="float32", device="cpu", load_format="dummy", cpu_threads=1)
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        out = llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_integer_experts_are_refused_in_one_line(tmp_path):
    group = {"format": "pack-quantized", "weights": dict(num_bits=4, type="int", strategy="group", group_size=8)}
    with pytest.raises(SlimserveError, match="quantized MoE experts in ct-int int4/group are not supported"):
        LLM(with_quantization_config(tmp_path, "mixtral", group), dtype="float32", device="cpu")


def test_unquantized_expert_tensors_in_an_fp8_checkpoint_are_refused(tmp_path):
    folder = with_quantization_config(tmp_path, "mixtral", {"format": "float-quantized", "weights": FP8_CHANNEL})
    with pytest.raises(SlimserveError, match="expected float8_e4m3fn"):
        LLM(folder, dtype="float32", device="cpu")


@pytest.mark.parametrize("family", ["llama3.2", "qwen2-moe"])
def test_fp8_at_load_equals_the_compressed_checkpoint(tmp_path, family):
    """quantization="fp8" (vLLM's --quantization fp8) on a full-precision checkpoint computes what the engine
    computes on the same model compressed with the FP8 scheme (and that, transformers: see above)."""
    folder = build_tiny_model(family, str(tmp_path / family))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    quantize_(model, preset("FP8"), progress=False)
    compressed = str(
        save_compressed(model, preset("FP8"), tmp_path / "fp8", tokenizer=AutoTokenizer.from_pretrained(folder))
    )
    llm, online = engine_greedy(folder, quantization="fp8")
    layers = list(llm.engine.runner.model.modules())
    assert any(isinstance(m, QuantLinearBase) for m in layers)
    assert family == "llama3.2" or any(isinstance(m, Fp8FusedExperts) for m in layers)
    _, stored = engine_greedy(compressed)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(online, stored):
        assert tokens == want_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=1e-5, rtol=0)
    with pytest.raises(SlimserveError, match="already quantized"):
        LLM(compressed, dtype="float32", device="cpu", quantization="fp8")
