"""`slimserve compress` and `slimserve eval` end to end on a tiny model folder, and their bad-input errors."""

import json

import pytest
import torch

from slimserve.compress.cli import main
from slimserve.compress.loading import load_causal_lm
from slimserve.eval.metrics import compare, windows

from .conftest import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_compress_then_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "w4"
    args = ["compress", str(model_dir), "--scheme", "W4A16", "--group-size", "32", "--method", "gptq"]
    args += ["--num-samples", "4", "--seq-len", "32", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "slimserve_report.json").read_text())
    assert report["calibration"]["source"] == "generic"
    assert (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    text = tmp_path / "heldout.txt"
    text.write_text("It was a truth universally acknowledged, and so on. " * 40)
    plot, numbers = tmp_path / "p.png", tmp_path / "e.json"
    args = ["eval", str(out), "--reference", str(model_dir), "--text", str(text), "--context", "256"]
    assert main([*args, "--plot", str(plot), "--json", str(numbers)]) == 0
    table = capsys.readouterr().out
    assert "| reference |" in table and "perplexity" in table
    result = json.loads(numbers.read_text())
    assert 0 <= result[str(out)]["kl_divergence"] < 1 and result[str(out)]["top1_agreement"] > 0.5
    assert plot.stat().st_size > 1000


def test_self_calibration_and_recipe(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: W8A8\nstages:\n  - smoothquant: {alpha: 0.5}\n  - rtn: {}\n")
    out = tmp_path / "w8a8"
    args = ["compress", str(model_dir), "--recipe", str(recipe), "--calib", "self"]
    assert main([*args, "--num-samples", "2", "--seq-len", "24", "--out", str(out)]) == 0
    report = json.loads((out / "slimserve_report.json").read_text())
    assert report["calibration"]["source"] == "self" and report["scheme"]["smoothquant"] == 0.5


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--scheme", "W5A16"], "unknown scheme"),
        (["--scheme", "W4A16", "--group-size", "128"], "does not divide"),
        (["--scheme", "W4A16", "--group-size", "48"], "group size must be"),
        (["--scheme", "FP8_BLOCK"], "block width 128 does not divide"),
        (["--scheme", "FP8", "--method", "awq"], "does not apply"),
        ([], "exactly one of --recipe and --scheme"),
    ],
)
def test_bad_input_one_line_nothing_written(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["compress", str(model_dir), "--out", str(out), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_model_folder_without_weights(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert main(["compress", str(folder), "--scheme", "W4A16", "--out", str(tmp_path / "out")]) == 2
    assert "no weights" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nope"), "--scheme", "W4A16", "--out", str(tmp_path / "o")]) == 2


def test_existing_output_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", str(model_dir), "--scheme", "W4A16", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_eval_identical_models_agree(model_dir):
    ref, _ = load_causal_lm(str(model_dir))
    same, _ = load_causal_lm(str(model_dir))
    ids = torch.randint(3, 259, (300,))
    q = compare(ref, {"same": same}, windows(ids, 100), progress=False)
    assert len(windows(ids, 100)) == 3
    assert q["same"].kl_divergence == pytest.approx(0, abs=1e-6) and q["same"].top1_agreement == 1.0
    assert q["same"].perplexity == pytest.approx(q["reference"].perplexity)
