"""`slimserve prune`, `convert-gqa` and `distill` end to end on a tiny model folder, and their bad input."""

import json

import pytest
from transformers import AutoModelForCausalLM

from slimserve.cli import main
from slimserve.layers.sparse import is_24_sparse
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return build_tiny_model("llama3.1", str(tmp_path_factory.mktemp("llama3.1")))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("It is a truth universally acknowledged that a single man in possession of a fortune " * 30)
    return str(path)


def test_prune_two_four(folder, text, tmp_path):
    out = tmp_path / "s"
    main(["prune", folder, "--method", "wanda", "--structure", "2:4", "--calib", text, "--num-samples", "2",
          "--seq-len", "32", "--out", str(out), "--device", "cpu"])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert is_24_sparse(model.model.layers[0].mlp.down_proj.weight)
    assert json.loads((out / "slimserve_report.json").read_text())["scheme"]["global_sparsity"] == 0.5


def test_structured_then_distill_then_resume(folder, text, tmp_path, capsys):
    small = tmp_path / "small"
    main(["prune", folder, "--mlp-ratio", "0.5", "--drop-layers", "1", "--calib", text, "--num-samples", "2",
          "--seq-len", "32", "--out", str(small), "--device", "cpu"])  # fmt: skip
    cfg = json.loads((small / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 1)
    run = tmp_path / "run"
    args = ["distill", "--teacher", folder, "--student", str(small), "--data", text, "--out", str(run), "--rows", "4",
            "--seq-len", "32", "--batch-size", "2", "--steps", "4", "--save-every", "2", "--device", "cpu"]  # fmt: skip
    main([*args, "--max-minutes", "0"])  # stops after the first step, with a checkpoint
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] == 1 and first["model"] is None
    main(args)
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["resumed_from"] == 1 and done["steps"] == 4
    assert AutoModelForCausalLM.from_pretrained(run / "model").config.num_hidden_layers == 1


def test_convert_gqa(folder, tmp_path):
    out = tmp_path / "mqa"
    main(["convert-gqa", folder, "--kv-heads", "1", "--out", str(out)])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "{folder}", "--heads", "3"], "--heads must be a multiple of the 2 KV heads"),
        (["prune", "{folder}", "--structure", "3:3"], "need 0 < zeros < group width"),
        (["prune", "{folder}", "--target-params", "1B"], "not below the model's"),
        (["prune", "{folder}", "--target-params", "lots"], "expected a count like"),
        (["convert-gqa", "{folder}", "--kv-heads", "3"], "must divide the model's 2 KV heads"),
        (["distill", "--teacher", "{folder}", "--student", "/nonexistent", "--steps", "0"], "must be positive"),
    ],
)
def test_bad_input_is_one_line(folder, tmp_path, capsys, args, message):
    argv = [a.format(folder=folder) for a in args] + ["--out", str(tmp_path / "never")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar, if any
    assert last.startswith(f"slimserve {args[0]}: error: ") and message in last
    assert not (tmp_path / "never").exists()
