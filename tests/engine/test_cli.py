"""The command line on a tiny model: generate, chat (stdin), bench throughput, help texts."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from slimserve import LLM, SamplingParams


def slimserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slimserve.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_generate_json_equals_api(llama_folder):
    proc = slimserve("generate", llama_folder, "--device", "cpu", "--prompt", "w5 w6 w7", "--max-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip())
    llm = LLM(llama_folder, device="cpu")
    expected = llm.generate(["w5 w6 w7"], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0]
    assert line["token_ids"] == expected.outputs[0].token_ids
    assert line["text"] == expected.outputs[0].text


def test_chat_streams_replies_from_stdin(llama_folder):
    proc = slimserve("chat", llama_folder, "--device", "cpu", "--max-tokens", "5", stdin="w5 w6\nw7\n\n")
    assert proc.returncode == 0, proc.stderr
    # Each prompt "> " is followed on the same line by the streamed reply; the last prompt got an empty line.
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[-1] == "> "
    assert all(len(line.split()) == 6 for line in lines[:2])  # "> " and five generated words


def test_bench_throughput_reports_rates(llama_folder, tmp_path):
    out = tmp_path / "bench.json"
    proc = slimserve(
        "bench",
        "throughput",
        llama_folder,
        "--device",
        "cpu",
        "--num-prompts",
        "6",
        "--input-len",
        "20",
        "--output-len",
        "8",
        "--random-range-ratio",
        "0.5",
        "--output-json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "requests/s" in proc.stdout and "output tokens/s" in proc.stdout
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 6 and result["output_tokens"] >= 6 * 4


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["bench", "throughput"], ["demo"], ["serve"]])
def test_help(command):
    proc = slimserve(*command, "--help")
    assert proc.returncode == 0 and "usage: slimserve" in proc.stdout


def test_sharded_checkpoint_loads(tmp_path, llama_folder):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama_folder).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_text((tmp_path.parent / llama_folder / name).read_text())
    assert (sharded / "model.safetensors.index.json").exists()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ours = LLM(str(sharded), device="cpu").generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    reference = LLM(llama_folder, device="cpu").generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert ours == reference
