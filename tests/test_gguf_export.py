"""GGUF export: the file reads back through the gguf package's reader with every tensor equal to what was
written, its tokenizer encodes like the original, and our GGUF loader gives the logits of the original model
with its weights rounded the way the file stores them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimserve.checkpoint.convert import convert_gguf
from slimserve.checkpoint.gguf_export import export_gguf, gguf_tensor_name
from slimserve.cli import main as cli_main
from slimserve.errors import SlimserveError
from tests.test_gguf import CORPUS, logits, tiny_model, vocab, write_gguf  # noqa: F401  (vocab is a fixture)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, vocab):  # noqa: F811
    """Hugging Face folders (with a byte-level BPE tokenizer) of a tied Llama and an untied Qwen2."""
    out = {}
    for arch, tied in (("llama", True), ("qwen2", False)):
        root = tmp_path_factory.mktemp(arch)
        src = write_gguf(root / "src.gguf", tiny_model(arch, len(vocab[0]), tied), arch, vocab, add_bos=arch == "llama")
        out[arch] = convert_gguf(str(src), str(root / "hf"), progress=False)
    return out


def _rounded(tensor: torch.Tensor, qtype: Q) -> torch.Tensor:
    if tensor.ndim == 1:
        return tensor
    if qtype == Q.F16:
        return tensor.half().float()
    data = gguf.quants.quantize(tensor.numpy().astype(np.float32), qtype)
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(tensor.shape).copy())


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "f16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_round_trips(tmp_path, hf_folders, arch, qtype):
    folder = hf_folders[arch]
    out = tmp_path / "model.gguf"
    written = export_gguf(folder, out, qtype, progress=False)

    reader = gguf.GGUFReader(str(out))
    assert {t.name for t in reader.tensors} == set(written)
    for t in reader.tensors:
        expected = written[t.name]
        assert t.tensor_type == expected.ggml_type, t.name
        assert np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), expected.data.view(np.uint8).ravel()), t.name
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"

    # Our loader: the same logits as the original model with each weight rounded as the file stores it.
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    qt = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16}[qtype]
    with torch.no_grad():
        for name, p in original.named_parameters():
            if gguf_tensor_name(name) in written:
                p.copy_(_rounded(p.detach(), qt))
    back = convert_gguf(str(out), str(tmp_path / "back"), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    ids = [5, 17, 42, 99, 3, 250, 7]
    torch.testing.assert_close(logits(reloaded, ids), logits(original, ids), atol=1e-4, rtol=1e-4)

    tok_a, tok_b = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(back)
    for text in CORPUS:
        assert tok_a(text)["input_ids"] == tok_b(text)["input_ids"]
    assert tok_a.chat_template == tok_b.chat_template


def test_cli_and_bad_inputs(tmp_path, hf_folders, capsys):
    out = tmp_path / "m.gguf"
    cli_main(["export-gguf", hf_folders["qwen2"], str(out), "--type", "q8_0"])
    assert out.is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export-gguf", hf_folders["qwen2"], str(out)])  # refuses to overwrite
    assert exit_info.value.code == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SlimserveError, match="unknown GGUF type"):
        export_gguf(hf_folders["qwen2"], tmp_path / "x.gguf", "q3_k")
    assert not list(tmp_path.glob(".*partial"))
