"""Speculative decoding: acceptance on real weights (CPU) and decode speed (GPU).

--acceptance (CPU is enough; real pretrained weights): greedy decoding of real prompts with each proposer;
  acceptance rate, mean accepted length (tokens per verification), and whether the output equals plain
  greedy decoding token for token.
    * draft pair: Qwen2.5-Coder-0.5B-Instruct drafting for Qwen2.5-Coder-1.5B-Instruct, code prompts;
    * n-gram prompt lookup on the same code prompts (1.5B target) and on SmolLM2-135M-Instruct (chat and
      Austen prompts; Austen passages come from the held-out Persuasion);
    * trained draft heads (`slimserve train-draft`) on SmolLM2-135M and Qwen2.5-Coder-0.5B.
--speed (GPU): batch-1 decode tok/s on real SmolLM2-135M weights without speculation, with n-gram lookup and
  with the trained head; batches of 8 and 32 (above disable_by_batch_size speculation turns itself off). For
  the draft pair, step costs are measured at the real shapes (random weights: their drafts are rejected) and
  combined with the acceptance measured by --acceptance: a computed speedup, labelled as such.

usage:
  python benchmarks/speculative.py --acceptance [--only NAME ...] [--smollm-head DIR] [--qwen-head DIR]
  python benchmarks/speculative.py --speed --smollm GGUF_OR_FOLDER --smollm-head DIR
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from importlib import resources

import torch

from slimserve import LLM, SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ACCEPTANCE_JSON = os.path.join(RESULTS, "speculative-acceptance.json")

CODE_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that checks whether a number is prime.",
    "Implement binary search over a sorted list in Python.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a function that merges two sorted lists into one sorted list.",
    "Write a Python function that counts word frequencies in a text and returns the top 10.",
    "Implement quicksort in Python.",
    "Write a Python function that parses a CSV line with quoted fields.",
)
CHAT_PROMPTS = (
    "What are three good habits for staying healthy?",
    "Explain what a black hole is in simple terms.",
    "Give me a recipe for pancakes.",
    "Why do leaves change colour in autumn?",
)


def austen_prompts(count: int, words: int = 120) -> list[str]:
    """Passages from the held-out novel, to be continued."""
    text = " ".join(resources.files("slimserve.eval.data").joinpath("persuasion.txt").read_text("utf-8").split())
    tokens = text.split(" ")
    step = len(tokens) // (count + 1)
    return [" ".join(tokens[(i + 1) * step : (i + 1) * step + words]) for i in range(count)]


def meta(command: str) -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(device=device, command=command, date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


def chat_ids(llm: LLM, prompts) -> list[list[int]]:
    return [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


# ---- acceptance ---------------------------------------------------------------------------------------
def run_acceptance(name: str, target: str, prompts_of, spec: dict, max_tokens: int, compare: bool) -> dict:
    """Greedy decoding of the prompts (batched) with speculation; optionally plain decoding to compare."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm = LLM(target, device="cpu", dtype="float32", speculative=spec, max_model_len=1024, max_num_seqs=16)
    prompts = prompts_of(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    stats = llm.engine.speculative.stats
    result = dict(
        name=name,
        target=target,
        speculative=spec,
        num_prompts=len(prompts),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
        cpu_seconds=elapsed,
        **stats.as_dict(),
        per_request_mean_accepted_length=[o.speculative.mean_accepted_length for o in outs if o.speculative],
    )
    if compare:
        del llm
        release()
        plain = LLM(target, device="cpu", dtype="float32", max_model_len=1024, max_num_seqs=16)
        ref = plain.generate(prompts, params)
        same = [o.outputs[0].token_ids == r.outputs[0].token_ids for o, r in zip(outs, ref)]
        result["matches_plain_greedy"] = f"{sum(same)}/{len(same)}"
    print(
        f"{name:28s} acceptance {result['acceptance_rate']:.3f}  mean accepted length "
        f"{result['mean_accepted_length']:.2f}  ({result['output_tokens']} tokens"
        + (f", equal to plain greedy: {result['matches_plain_greedy']})" if compare else ")"),
        flush=True,
    )
    return result


def acceptance(args: argparse.Namespace) -> None:
    k = args.k
    smollm_prompts = lambda llm: chat_ids(llm, CHAT_PROMPTS) + austen_prompts(4)  # noqa: E731
    code_prompts = lambda llm: chat_ids(llm, CODE_PROMPTS)  # noqa: E731
    runs = {
        "draft qwen-coder 0.5b->1.5b": lambda: run_acceptance(
            "draft qwen-coder 0.5b->1.5b", "qwen2.5-coder-1.5b", code_prompts,
            {"method": "draft", "model": "qwen2.5-coder-0.5b", "num_speculative_tokens": k}, args.max_tokens, True,
        ),
        "ngram qwen-coder-1.5b": lambda: run_acceptance(
            "ngram qwen-coder-1.5b", "qwen2.5-coder-1.5b", code_prompts,
            {"method": "ngram", "num_speculative_tokens": k}, args.max_tokens, False,
        ),
        "ngram smollm2-135m": lambda: run_acceptance(
            "ngram smollm2-135m", "smollm2-135m", smollm_prompts,
            {"method": "ngram", "num_speculative_tokens": k}, args.max_tokens, True,
        ),
        "eagle smollm2-135m": lambda: run_acceptance(
            "eagle smollm2-135m", "smollm2-135m", smollm_prompts,
            {"method": "eagle", "model": args.smollm_head, "num_speculative_tokens": k}, args.max_tokens, True,
        ),
        "eagle qwen-coder-0.5b": lambda: run_acceptance(
            "eagle qwen-coder-0.5b", "qwen2.5-coder-0.5b", code_prompts,
            {"method": "eagle", "model": args.qwen_head, "num_speculative_tokens": k}, args.max_tokens, True,
        ),
    }  # fmt: skip
    previous = {}
    if os.path.isfile(ACCEPTANCE_JSON):
        with open(ACCEPTANCE_JSON) as f:
            previous = {r["name"]: r for r in json.load(f)["runs"]}
    for name in args.only or list(runs):
        if name not in runs:
            sys.exit(f"unknown run {name!r}; choose from {', '.join(runs)}")
        if "eagle smollm" in name and not args.smollm_head or "eagle qwen" in name and not args.qwen_head:
            print(f"{name}: skipped (no --smollm-head / --qwen-head)")
            continue
        previous[name] = runs[name]() | meta(" ".join(sys.argv))
        gc.collect()
        os.makedirs(RESULTS, exist_ok=True)
        with open(ACCEPTANCE_JSON + ".tmp", "w") as f:
            json.dump({"runs": list(previous.values())}, f, indent=2)
        os.replace(ACCEPTANCE_JSON + ".tmp", ACCEPTANCE_JSON)
    print_acceptance_table()


def print_acceptance_table() -> None:
    with open(ACCEPTANCE_JSON) as f:
        runs = json.load(f)["runs"]
    print("| run | target | prompts | acceptance rate | mean accepted length | equal to plain greedy |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['name']} | {r['target']} | {r['num_prompts']} x {r['output_tokens'] // r['num_prompts']} tokens "
            f"| {r['acceptance_rate']:.3f} | {r['mean_accepted_length']:.2f} | {r.get('matches_plain_greedy', '-')} |"
        )


# ---- speed --------------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release() -> None:
    """Free a deleted engine's memory before the next one sizes its KV cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed_generate(llm: LLM, prompts, params: SamplingParams) -> tuple[float, list]:
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    return time.perf_counter() - start, outs


def decode_speed(llm: LLM, prompts: list, batch: int, max_tokens: int) -> dict:
    """Output tok/s of `batch` concurrent requests (batch 1: the prompts one after another)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    # Warm-up with the timed shapes: Triton compiles a kernel variant the first time it meets one (a prefill
    # of each prompt length among them).
    if batch == 1:
        for p in prompts:
            timed_generate(llm, [p], params)
    else:
        timed_generate(llm, (prompts * batch)[:batch], params)
    spec = llm.engine.speculative
    before = dict(spec.stats.as_dict()) if spec else {}
    if batch == 1:
        elapsed, outs = 0.0, []
        for p in prompts:
            t, o = timed_generate(llm, [p], params)
            elapsed, outs = elapsed + t, outs + o
    else:
        elapsed, outs = timed_generate(llm, (prompts * batch)[:batch], params)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row = dict(batch=batch, tokens=tokens, seconds=elapsed, tok_per_s=tokens / elapsed)
    if spec:
        after = spec.stats.as_dict()
        drafts = after["num_drafts"] - before.get("num_drafts", 0)
        draft_tokens = after["num_draft_tokens"] - before.get("num_draft_tokens", 0)
        accepted = after["num_accepted_tokens"] - before.get("num_accepted_tokens", 0)
        row.update(
            verifications=drafts,
            acceptance_rate=accepted / draft_tokens if draft_tokens else 0.0,
            mean_accepted_length=1 + accepted / drafts if drafts else 0.0,
        )
    row["token_ids"] = [o.outputs[0].token_ids for o in outs]
    return row


QWEN_SHAPES = {
    "qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
}


def random_qwen(name: str, folder: str) -> str:
    from transformers import AutoConfig

    from slimserve.checkpoint.random_model import save_random_model

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    config = AutoConfig.for_model(
        "qwen2", vocab_size=151936, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **QWEN_SHAPES[name],
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return save_random_model(config, folder, dtype=torch.bfloat16, device=device)


def speed(args: argparse.Namespace) -> None:
    k = args.k
    engine = dict(max_num_seqs=32, max_model_len=args.max_model_len, gpu_memory_utilization=0.6)
    results: dict = meta(" ".join(sys.argv)) | dict(num_speculative_tokens=k, max_tokens=args.max_tokens, runs=[])
    configs = {"plain": None}
    for ngram_k in args.ngram_k or [k]:
        name = "ngram" if ngram_k == k else f"ngram k={ngram_k}"
        configs[name] = {"method": "ngram", "num_speculative_tokens": ngram_k}
    if args.smollm_head:
        configs["eagle"] = {"method": "eagle", "model": args.smollm_head, "num_speculative_tokens": k}
    plain_tokens: dict[tuple[str, int], list] = {}
    for name, spec in configs.items():
        llm = LLM(args.smollm, speculative=spec, **engine)
        chat = chat_ids(llm, CHAT_PROMPTS)
        austen = [llm.get_tokenizer().encode(p) for p in austen_prompts(4)]
        # Batch 1 runs the chat prompts and the Austen passages apart (n-gram lookup finds more in the
        # latter); batches 8 and 32 mix them.
        for prompt_set, batch, prompts in (("chat", 1, chat), ("austen", 1, austen), ("mixed", 8, chat + austen),
                                           ("mixed", 32, chat + austen)):  # fmt: skip
            row = decode_speed(llm, prompts, batch, args.max_tokens)
            ids = row.pop("token_ids")
            if spec is None:
                plain_tokens[prompt_set, batch] = ids
            reference = plain_tokens[prompt_set, batch]
            same = sum(a == b for a, b in zip(ids, reference))
            # Where speculative and plain greedy part (bf16: the verification pass rounds differently).
            diverge = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ids, reference)]
            row.update(
                model="smollm2-135m (real)",
                method=name,
                prompts=prompt_set,
                equal_to_plain=f"{same}/{len(ids)}",
                first_divergence=diverge,
            )
            results["runs"].append(row)
            print({k_: v for k_, v in row.items()}, flush=True)
        del llm
        release()
    if not args.skip_draft_pair:
        results["draft_pair"] = draft_pair_speed(args, engine)
    out = os.path.join(RESULTS, f"speculative-speed-{datetime.date.today()}.json")
    os.makedirs(RESULTS, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print_speed_table(results)
    print(out)


def draft_pair_speed(args: argparse.Namespace, engine: dict) -> dict:
    """Batch-1 step costs at the real Qwen2.5-Coder shapes (random weights): the plain decode time per
    token, and the time of one speculative step (k draft steps + one verification). With random weights
    almost every draft is rejected, so a step emits one token; with the acceptance measured on real
    weights a step emits L tokens (L = mean accepted length): computed speedup = L * t_token / t_step."""
    root = args.random_dir
    target = random_qwen("qwen2.5-coder-1.5b", os.path.join(root, "qwen-1.5b"))
    draft = random_qwen("qwen2.5-coder-0.5b", os.path.join(root, "qwen-0.5b"))
    prompt = [[(i * 7919) % 150000 + 10 for i in range(64)]]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    measured = {}
    for name, spec in (
        ("plain", None),
        ("draft", {"method": "draft", "model": draft, "num_speculative_tokens": args.k}),
    ):
        llm = LLM(target, speculative=spec, **engine)
        timed_generate(llm, prompt, params)
        before = llm.engine.speculative.stats.num_drafts if spec else 0
        elapsed, outs = timed_generate(llm, prompt, params)
        tokens = len(outs[0].outputs[0].token_ids)
        steps = llm.engine.speculative.stats.num_drafts - before if spec else tokens
        measured[name] = dict(seconds=elapsed, tokens=tokens, steps=steps)
        del llm
        release()
    t_token = measured["plain"]["seconds"] / measured["plain"]["tokens"]
    t_step = measured["draft"]["seconds"] / measured["draft"]["steps"]
    pair = dict(t_plain_token_ms=t_token * 1e3, t_spec_step_ms=t_step * 1e3, measured=measured)
    return with_real_acceptance(pair)


def with_real_acceptance(pair: dict) -> dict:
    """Combine the GPU step costs with the draft pair's acceptance on real weights (from --acceptance)."""
    runs = {}
    if os.path.isfile(ACCEPTANCE_JSON):
        with open(ACCEPTANCE_JSON) as f:
            runs = {r["name"]: r for r in json.load(f)["runs"]}
    real = runs.get("draft qwen-coder 0.5b->1.5b")
    if real is None:
        return pair
    length, t_token, t_step = real["mean_accepted_length"], pair["t_plain_token_ms"], pair["t_spec_step_ms"]
    return pair | dict(
        label="computed: GPU step costs at the real shapes x acceptance measured on real weights (CPU)",
        mean_accepted_length_real=length,
        acceptance_rate_real=real["acceptance_rate"],
        plain_tok_per_s=1e3 / t_token,
        computed_spec_tok_per_s=1e3 * length / t_step,
        computed_speedup=length * t_token / t_step,
    )


def combine(path: str) -> None:
    """Fill in the computed draft-pair speedup of a --speed result once the acceptance is measured."""
    with open(path) as f:
        results = json.load(f)
    results["draft_pair"] = with_real_acceptance(results["draft_pair"])
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    print_speed_table(results)


def print_speed_table(results: dict) -> None:
    print("\n| model | method | prompts | batch | tok/s | speedup | acceptance | mean accepted length | equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {(r.get("prompts"), r["batch"]): r["tok_per_s"] for r in results["runs"] if r["method"] == "plain"}
    for r in results["runs"]:
        speedup = r["tok_per_s"] / base[r.get("prompts"), r["batch"]]
        print(
            f"| {r['model']} | {r['method']} | {r.get('prompts', '-')} | {r['batch']} | {r['tok_per_s']:.0f} "
            f"| {speedup:.2f}x | {r.get('acceptance_rate', 0):.2f} | {r.get('mean_accepted_length', 0):.2f} "
            f"| {r['equal_to_plain']} |"
        )
    d = results.get("draft_pair")
    if d is None:
        return
    if "computed_speedup" not in d:
        print(f"draft pair step costs: {d['t_plain_token_ms']:.2f} ms/token plain, {d['t_spec_step_ms']:.2f} ms/step")
        return
    print(
        f"| qwen2.5-coder 0.5b->1.5b ({d['label']}) | draft | code | 1 | {d['computed_spec_tok_per_s']:.0f} "
        f"(plain {d['plain_tok_per_s']:.0f}) | {d['computed_speedup']:.2f}x | {d['acceptance_rate_real']:.2f} "
        f"| {d['mean_accepted_length_real']:.2f} | - |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--acceptance", action="store_true", help="acceptance on real weights (CPU)")
    mode.add_argument("--speed", action="store_true", help="decode speed (GPU)")
    mode.add_argument("--combine", metavar="SPEED_JSON", help="add the computed draft-pair speedup to a result")
    parser.add_argument("--only", nargs="*", help="acceptance runs to do (default: all)")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--smollm", default="smollm2-135m", help="SmolLM2-135M GGUF or folder (--speed)")
    parser.add_argument("--smollm-head", default=None, help="draft head trained for SmolLM2-135M")
    parser.add_argument("--qwen-head", default=None, help="draft head trained for Qwen2.5-Coder-0.5B")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--ngram-k", nargs="+", type=int, help="num_speculative_tokens for n-gram runs (--speed)")
    parser.add_argument("--skip-draft-pair", action="store_true", help="no draft-pair step costs (--speed)")
    parser.add_argument("--random-dir", default="/tmp/speculative-random", help="random-weight folders (--speed)")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine)
    elif args.acceptance:
        args.max_tokens = args.max_tokens or 128
        acceptance(args)
    else:
        args.max_tokens = args.max_tokens or 256
        speed(args)


if __name__ == "__main__":
    main()
