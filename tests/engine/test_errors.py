"""Bad input: one clear error (a ValueError subclass from the API, one line and exit 1 from the CLI)."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from slimserve import LLM, SamplingParams
from slimserve.errors import CheckpointError, ModelNotFoundError, PromptTooLongError, UnsupportedArchitectureError


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_folder():
    with pytest.raises(ModelNotFoundError):
        LLM("/no/such/model", device="cpu")


def test_unsupported_architecture_is_named(llama_folder, tmp_path):
    folder = copy_model(llama_folder, tmp_path / "m")
    config = json.load(open(f"{folder}/config.json"))
    config["architectures"] = ["GPT2LMHeadModel"]
    json.dump(config, open(f"{folder}/config.json", "w"))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(folder, device="cpu")


def test_wrong_tensor_shape_is_named(llama_folder, tmp_path):
    folder = copy_model(llama_folder, tmp_path / "m")
    tensors = load_file(f"{folder}/model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name):
        LLM(folder, device="cpu")


def test_missing_tensor_is_reported(llama_folder, tmp_path):
    folder = copy_model(llama_folder, tmp_path / "m")
    tensors = load_file(f"{folder}/model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        LLM(folder, device="cpu")


def test_corrupt_weights_file(llama_folder, tmp_path):
    folder = copy_model(llama_folder, tmp_path / "m")
    with open(f"{folder}/model.safetensors", "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="corrupt"):
        LLM(folder, device="cpu")


def test_prompt_longer_than_context(llama_folder):
    llm = LLM(llama_folder, device="cpu", max_model_len=32)
    with pytest.raises(PromptTooLongError):
        llm.generate([list(range(3, 40))], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_generation_stops_at_max_model_len(llama_folder):
    llm = LLM(llama_folder, device="cpu", max_model_len=32)
    out = llm.generate([list(range(3, 28))], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "/no/such/model", "--prompt", "hi"], "/no/such/model"),
        (["generate", "{model}", "--prompt", "hi", "--top-p", "0"], "top_p"),
        (
            ["generate", "{model}", "--prompt", "w5 w6 w7 w8 w9", "--max-model-len", "4", "--device", "cpu"],
            "max_model_len",
        ),
    ],
)
def test_cli_errors_are_one_line(llama_folder, args, message):
    args = [a.replace("{model}", llama_folder) for a in args]
    proc = subprocess.run([sys.executable, "-m", "slimserve.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
