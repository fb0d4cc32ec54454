"""Checkpoints written by slimserve's compressor run in the engine with the logits that `transformers` computes
through the compressed-tensors package (CPU, fp32): greedy tokens equal, log-probabilities within rounding."""

import json

import pytest
import torch
from safetensors.torch import load_file

from slimserve import LLM, SamplingParams
from slimserve.compress import Calibration, preset, quantize_, save_compressed
from slimserve.compress.configs import KVCacheConfig
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.quant import kv as kv_quant
from slimserve.errors import SlimserveError
from slimserve.layers.quantized import QuantLinearBase
from tests.compress.conftest import byte_tokenizer, samples, tiny_model

MAX_NEW = 8
PROMPTS = [samples(1, n, seed=s)[0][0].tolist() for n, s in ((20, 5), (7, 6), (33, 8))]


def compressed_folder(tmp_path, family: str, scheme: str, layers: int = 2, **options) -> str:
    model = tiny_model(family, num_hidden_layers=layers)
    model.config.architectures = [type(model).__name__]
    config = preset(scheme, **options)
    calib = Calibration(samples(), "test") if config.needs_calibration else None
    report = quantize_(model, config, calib, progress=False)
    return str(save_compressed(model, config, tmp_path / scheme, tokenizer=byte_tokenizer(), report=report))


def transformers_greedy(folder: str, model=None) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens and their log-probabilities (the checkpoint's, or `model`)."""
    model = model or load_causal_lm(folder)[0]
    results = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        tokens = out.sequences[0, len(prompt) :].tolist()
        results.append((tokens, [s[0].log_softmax(-1)[t].item() for s, t in zip(out.scores, tokens)]))
    return results


def engine_greedy(folder: str, **kwargs) -> tuple[LLM, list[tuple[list[int], list[float]]]]:
    llm = LLM(folder, dtype="float32", device="cpu", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    return llm, [(o.token_ids, [e[t] for e, t in zip(o.logprobs, o.token_ids)]) for o in outs]


# Schemes that round activations at run time (W4A8, W8A8) amplify the 1e-7 fp32 differences between two
# correct implementations (another summation order in a norm) whenever a value sits on a rounding boundary:
# that element moves by one grid step, and the log-probabilities by ~1e-2.
CASES = [
    ("llama", "W4A16", {}, 1e-4),
    ("qwen2", "W4A16_ASYM", {"group_size": 64}, 1e-4),
    ("llama", "W8A16", {}, 1e-4),
    ("llama", "W4A16", {"ignore": ()}, 1e-4),  # the output head quantized too
    ("llama", "W2A16", {}, 1e-4),
    ("qwen2", "W3A16", {}, 1e-4),
    ("llama", "W3A16", {"symmetric": True, "group_size": 32}, 1e-4),
    ("qwen2", "TERNARY", {}, 1e-4),
    ("qwen2", "FP8", {}, 1e-4),
    ("llama", "FP8_STATIC", {}, 1e-4),
    ("llama", "FP8_BLOCK", {}, 1e-4),
    ("qwen2", "W4A8", {}, 0.05),
    ("llama", "W8A8", {}, 0.1),
]


@pytest.mark.parametrize(
    "family,scheme,options,atol", CASES, ids=[f"{c[1]}-{c[0]}{'-head' if 'ignore' in c[2] else ''}" for c in CASES]
)
def test_engine_matches_transformers(tmp_path, family, scheme, options, atol):
    folder = compressed_folder(tmp_path, family, scheme, **options)
    llm, ours = engine_greedy(folder)
    model = llm.engine.runner.model
    assert any(isinstance(m, QuantLinearBase) for m in model.modules())
    assert isinstance(model.head_linear, QuantLinearBase) == ("ignore" in options)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(ours, transformers_greedy(folder)):
        assert tokens == want_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("family,scheme,options", [("llama", "W4A16", {}), ("qwen2", "W2A16", {"group_size": 32})])
def test_one_row_decode_carries_the_norms_in_the_gemvs(tmp_path, family, scheme, options):
    """One sequence at a time, integer-weight layers chain their RMSNorms and the MLP's activation through the
    GEMV epilogues (no norm or activation kernel inside the stack): the same greedy tokens and log-probabilities
    as transformers (q|k|v bias too)."""
    folder = compressed_folder(tmp_path, family, scheme, **options)
    llm = LLM(folder, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    for prompt, (want_tokens, want_logprobs) in zip(PROMPTS, transformers_greedy(folder)):
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == want_tokens
        logprobs = [e[t] for e, t in zip(out.logprobs, out.token_ids)]
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=1e-4, rtol=0)
    assert llm.engine.runner.model._chains


def rounded_cache_model(folder: str, kv: KVCacheConfig, skip: tuple[int, ...] = ()):
    """transformers with its keys and values rounded as they enter the cache, with the checkpoint's scales
    (the compressor's calibration hook), so its attention reads what a quantized cache holds; the `skip`
    layers keep theirs unrounded."""
    model, _ = load_causal_lm(folder)
    tensors = load_file(f"{folder}/model.safetensors")
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.register_buffer("k_scale", tensors[f"model.layers.{i}.self_attn.k_scale"])
        attn.register_buffer("v_scale", tensors[f"model.layers.{i}.self_attn.v_scale"])
        if i not in skip:
            kv_quant.attach(attn, kv.args())
    return model


def transformers_first_logprobs(folder: str, kv: KVCacheConfig) -> list[torch.Tensor]:
    model = rounded_cache_model(folder, kv)
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, -1].log_softmax(-1) for p in PROMPTS]


@pytest.mark.parametrize("kv_type,kv_dtype", [("int", "int8"), ("float", "fp8")])
def test_quantized_kv_cache_with_calibrated_scales(tmp_path, kv_type, kv_dtype):
    kv = KVCacheConfig(kv_type)
    folder = compressed_folder(tmp_path, "llama", "W8A16", kv_cache=kv)
    full_llm, _ = engine_greedy(folder)
    llm, quantized = engine_greedy(folder, kv_cache_dtype=kv_dtype)
    attn = llm.engine.runner.model.attention_layers()[0]
    assert attn.k_cache.dtype == (torch.int8 if kv_dtype == "int8" else torch.float8_e4m3fn)
    assert attn.has_kv_scales and not torch.equal(attn.k_scale, torch.ones_like(attn.k_scale))
    assert llm.engine.runner.kv_bytes_per_block * 4 == full_llm.engine.runner.kv_bytes_per_block  # fp32 -> 1 byte
    # The first token attends only over the prompt's rounded keys and values (rounding flips: see CASES).
    for (tokens, logprobs), want in zip(quantized, transformers_first_logprobs(folder, kv)):
        assert tokens[0] == want.argmax().item()
        assert abs(logprobs[0] - want[tokens[0]].item()) < 0.02


def test_kv_cache_skip_layers_match_transformers(tmp_path):
    """Layers kept out of the FP8 cache (the checkpoint's choice, or the engine's) hold the model's dtype; the
    others FP8. Greedy tokens and log-probabilities equal transformers' with only the other layers' keys and
    values rounded, token after token."""
    kv = KVCacheConfig("float", skip_layers=(1,))
    folder = compressed_folder(tmp_path, "qwen2", "W8A16", layers=3, kv_cache=kv)
    with open(f"{folder}/config.json") as f:
        assert json.load(f)["quantization_config"]["kv_cache_skip_layers"] == [1]
    for engine_skip, skip in ((None, (1,)), ([0, 2], (0, 2))):
        llm, ours = engine_greedy(folder, kv_cache_dtype="fp8", kv_cache_skip_layers=engine_skip)
        runner = llm.engine.runner
        dtypes = [a.k_cache.dtype for a in runner.model.attention_layers()]
        assert dtypes == [torch.float32 if i in skip else torch.float8_e4m3fn for i in range(3)]
        assert [a.v_cache.dtype for a in runner.model.attention_layers()] == dtypes
        assert f"; fp8, layers {', '.join(map(str, skip))} in float32)" in llm.engine.kv_cache_plan
        want = transformers_greedy(folder, rounded_cache_model(folder, kv, skip))
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(ours, want):
            assert tokens == want_tokens
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=1e-4, rtol=0)


def test_int8_kv_cache_needs_scales(tmp_path):
    folder = compressed_folder(tmp_path, "llama", "W4A16")
    with pytest.raises(SlimserveError, match="k_scale"):
        LLM(folder, dtype="float32", device="cpu", kv_cache_dtype="int8")


@pytest.mark.parametrize("scheme", ["W4A8"])
def test_dummy_weights_from_config_alone(tmp_path, scheme):
    """load_format="dummy" (speed runs): config.json and a tokenizer, no weights; each layer draws random
    tensors in its checkpoint layout."""
    folder = compressed_folder(tmp_path, "llama", scheme)
    for f in tmp_path.glob(f"{scheme}/*.safetensors"):
        f.unlink()
    llm = LLM(folder, dtype="float32", device="cpu", load_format="dummy", kv_cache_dtype="fp8")
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_dummy_weights_with_an_8bit_head_beside_4bit_layers(tmp_path):
    """A second config group that names lm_head (8-bit) beside 4-bit Linear layers: the engine builds each
    projection with its own group, the head included."""
    folder = compressed_folder(tmp_path, "llama", "W4A16")
    path = tmp_path / "W4A16" / "config.json"
    cfg = json.loads(path.read_text())
    q = cfg["quantization_config"]
    head = json.loads(json.dumps(q["config_groups"]["group_0"]))
    head["targets"], head["weights"]["num_bits"] = ["lm_head"], 8
    q["config_groups"]["group_1"], q["ignore"], cfg["tie_word_embeddings"] = head, [], False
    path.write_text(json.dumps(cfg))
    llm = LLM(folder, dtype="float32", device="cpu", load_format="dummy")
    model = llm.engine.runner.model
    assert model.head_linear.scheme.bits == 8 and model.layers[0].mlp.down_proj.scheme.bits == 4
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_quantized_head_tied_to_the_embedding_is_refused(tmp_path):
    folder = compressed_folder(tmp_path, "llama", "W4A16", ignore=())
    path = tmp_path / "W4A16" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["tie_word_embeddings"] = True
    path.write_text(json.dumps(cfg))
    with pytest.raises(SlimserveError, match="lm_head is quantized but tied"):
        LLM(folder, dtype="float32", device="cpu")
