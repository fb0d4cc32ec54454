"""Sequential calibration: the captured inputs are the model's own, layer by layer; calibration text sources."""

import pytest
import torch

from slimserve.compress import Calibration, Int4WeightOnly, quantize_
from slimserve.compress.calibration import advance_inputs, capture_inputs
from slimserve.compress.corpus import generic_samples, generic_texts, token_windows
from slimserve.compress.errors import CalibrationError
from slimserve.compress.selfgen import CHAT_REQUESTS, PROMPTS, _prompts, self_samples

from .conftest import byte_tokenizer, samples, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_layer_by_layer_replays_the_model(family):
    model = tiny_model(family)
    data = samples(3, 16)
    layers = model.model.layers
    hidden, kwargs = capture_inputs(model, layers, data, torch.device("cpu"))
    assert len(hidden) == 3 and len(kwargs) == len(layers)
    assert all(isinstance(m, type(layers[0])) for m in layers)  # the recorders are gone
    for i, layer in enumerate(layers):
        advance_inputs(layer, hidden, kwargs[i])
    with torch.no_grad():
        expected = model(data[2], output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(model.model.norm(hidden[2]), expected, atol=1e-5)


def test_report_records_layers_and_calibration():
    model = tiny_model("llama")
    config = Int4WeightOnly(group_size=64, method="gptq")
    report = quantize_(model, config, Calibration(samples(), "generic"), progress=False)
    assert report.calibration == {"source": "generic", "num_samples": 4, "seq_len": 48, "tokens": 192}
    assert [r.index for r in report.layers] == [0, 1]
    rec = report.layers[0].linears["mlp.down_proj"]
    assert rec.method == "gptq" and rec.output_error < rec.weight_error
    assert report.skipped == ["lm_head"]
    assert report.peak_memory_mb > 0


def test_gptq_layers_beat_rtn_layers():
    data = Calibration(samples(8, 64), "test")
    first_layer = {}
    for method in ("rtn", "gptq"):
        report = quantize_(tiny_model("llama"), Int4WeightOnly(group_size=32, method=method), data, progress=False)
        first_layer[method] = report.layers[0].linears  # same weights, same inputs
    for name, rec in first_layer["gptq"].items():
        assert rec.output_error < first_layer["rtn"][name].output_error, name


def test_generic_corpus_ships_with_the_package():
    texts = generic_texts()
    assert len(texts) == 2 and all(len(t) > 100_000 for t in texts)
    heldout_opening = "Sir Walter Elliot, of Kellynch Hall"
    assert heldout_opening not in "".join(texts)
    tok = byte_tokenizer()
    data = generic_samples(tok, 5, 32)
    assert len(data) == 5 and all(s.shape == (1, 32) for s in data)


def test_token_windows_errors():
    tok = byte_tokenizer()
    with pytest.raises(CalibrationError):
        token_windows(["too short"], tok, 2, 16)
    with pytest.raises(CalibrationError):
        token_windows(["long enough " * 100], tok, 0, 16)


def test_self_calibration_writes_full_length_samples():
    model = tiny_model("llama")
    tok = byte_tokenizer()
    data = self_samples(model, tok, num_samples=3, seq_len=24, batch_size=2)
    assert len(data) == 3 and all(s.shape == (1, 24) for s in data)
    again = self_samples(model, tok, num_samples=3, seq_len=24, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(data, again))  # seeded


def test_self_calibration_prompts_mix_chat_turns_and_plain_openings():
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    n = len(PROMPTS) + len(CHAT_REQUESTS)
    texts = [tok.decode(p) for p in _prompts(tok, n, seq_len=4096, seed=0)]
    chats = [t for t in texts if t.startswith("<|user|>") and t.endswith("<|assistant|>")]
    assert len(chats) == len(CHAT_REQUESTS) and len(set(texts)) == n  # every start used once
    assert any(t.startswith("<|user|>") for t in texts[:8]) and not all(t.startswith("<|user|>") for t in texts[:8])
    assert max(len(p) for p in _prompts(tok, n, seq_len=40, seed=0)) <= 20  # prompts leave room to generate
