"""Greedy output of a real quantized model on a GPU: slimserve against `transformers` running the same
compressed-tensors checkpoint, both in bf16.

The model (a GGUF file or a Hugging Face folder, e.g. SmolLM2-135M-Instruct) is quantized by slimserve's
compressor (W8A16 round-to-nearest per output channel, FP8 with dynamic per-token activations: neither
needs calibration data), saved as compressed-tensors, then generated from by both. For each prompt the
tokens are compared; where they part, the logit margin between transformers' top two candidates there
says whether it is a near-tie (bf16 rounding of two correct implementations) or a real difference.
Writes benchmarks/results/quant-greedy-<model>-<date>.json.

usage: python benchmarks/quant_greedy.py MODEL [--schemes W8A16 FP8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.resolve import resolve_model
from slimserve.compress import preset, quantize_, save_compressed
from slimserve.compress.loading import load_causal_lm

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "Water boils at a temperature of",
    "Here is a short poem about the sea:\n",
    "The three primary colours are",
]
CHATS = [
    "What is the largest planet in the solar system?",
    "Write a Python function that reverses a string.",
    "Give me three tips for a good night's sleep.",
]


def prompt_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    for question in CHATS:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [list(map(int, p)) for p in ids]


def transformers_greedy(folder: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    model, _ = load_causal_lm(folder, dtype=torch.bfloat16)
    model = model.cuda()
    results = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)  # fmt: skip
        top2 = [s[0].float().topk(2).values for s in out.scores]
        results.append(
            {"tokens": out.sequences[0, len(prompt) :].tolist(), "margins": [(t[0] - t[1]).item() for t in top2]}
        )
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def slimserve_greedy(folder: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    llm = LLM(folder, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


def compare(ours: list[list[int]], theirs: list[dict]) -> dict:
    rows = []
    for mine, ref in zip(ours, theirs):
        first = next((i for i, (a, b) in enumerate(zip(mine, ref["tokens"])) if a != b), None)
        row = {"identical": first is None, "first_divergence": first}
        if first is not None:
            row["transformers_top2_margin_there"] = ref["margins"][first]
        rows.append(row)
    return {"prompts": len(rows), "identical": sum(r["identical"] for r in rows), "per_prompt": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="GGUF file or Hugging Face folder")
    parser.add_argument("--schemes", nargs="+", default=["W8A16", "FP8"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/quant_greedy.py needs a CUDA GPU", file=sys.stderr)
        return 1
    source = resolve_model(args.model)
    name = Path(args.model).stem.split(".")[0].lower()
    result = {
        "model": name,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "dtype": "bfloat16",
        "max_tokens": args.max_tokens,
        "schemes": {},
    }
    with tempfile.TemporaryDirectory() as work:
        for scheme in args.schemes:
            model, tokenizer = load_causal_lm(source)
            # Per-channel INT8 (llm-compressor's W8A16): group 128 does not divide every model's widths.
            config = preset(scheme, **({"group_size": None} if scheme.upper() == "W8A16" else {}))
            quantize_(model, config, None, progress=False)
            folder = str(save_compressed(model, config, Path(work) / scheme, tokenizer=tokenizer))
            del model
            prompts = prompt_ids(tokenizer)
            ours = slimserve_greedy(folder, prompts, args.max_tokens)
            theirs = transformers_greedy(folder, prompts, args.max_tokens)
            result["schemes"][scheme] = compare(ours, theirs)
            summary = result["schemes"][scheme]
            print(f"{scheme}: {summary['identical']}/{summary['prompts']} prompts identical", flush=True)
            for row in summary["per_prompt"]:
                if not row["identical"]:
                    print(
                        f"  parts at token {row['first_divergence']}, transformers' top-2 logit margin there "
                        f"{row['transformers_top2_margin_there']:.4f}"
                    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"quant-greedy-{name}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
