"""`slimserve` command line: generate, chat, serve, bench, demo, convert, compress, eval, train-draft, prune,
convert-gqa, distill, export-gguf."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from typing import Any

from slimserve.checkpoint.export_cli import add_export_gguf_parser
from slimserve.compress.cli import add_compress_parser, add_eval_parser
from slimserve.compress.prune.cli import add_convert_gqa_parser, add_prune_parser
from slimserve.diffusion.cli import add_diffuse_parser, add_distill_steps_parser
from slimserve.distill.cli import add_distill_parser
from slimserve.engine.speculative.cli import add_train_draft_parser
from slimserve.errors import run_reporting_bad_input
from slimserve.serve.bench_client import add_bench_serve_parser
from slimserve.serve.cli import add_serve_parser

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options, named as vLLM names them."""
    parser.add_argument(
        "model",
        nargs="?",
        default="default",
        help="HF model folder, .gguf file, or a built-in name (default: SmolLM2-135M-Instruct)",
    )
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    group.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights, activations and KV cache",
    )
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="token budget of one step (longer prefills are chunked)",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of shared prompt prefixes",
    )
    group.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs")
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="GPUs (CPU processes) to split the model over; several nodes: start every rank with torchrun",
    )
    group.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="MoE models: split the experts over the tensor-parallel ranks instead of slicing each expert",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the engine's random generator")
    group.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        "(methods: draft, ngram, eagle; keys: model, disable_by_batch_size, prompt_lookup_min/max)",
    )
    group.add_argument(
        "--sparse-kernels",
        action="store_true",
        help="run 2:4 checkpoints on sparse tensor cores (default: dense GEMMs)",
    )
    group.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8", "fp8_e4m3", "int8"],
        default="auto",
        help="KV-cache storage: auto (the model's dtype), fp8 or int8 (with the checkpoint's per-head scales)",
    )
    group.add_argument(
        "--kv-cache-skip-layers",
        default=None,
        metavar="LAYERS",
        help="decoder layers whose KV cache stays in the model's dtype with --kv-cache-dtype fp8/int8, e.g. 0,1,4 "
        "or 0-4,7 (default: the layers the checkpoint names, if any)",
    )
    group.add_argument(
        "--load-format", choices=["auto", "dummy"], default="auto", help="dummy: random weights (speed runs)"
    )
    group.add_argument(
        "--cpu-quantization", choices=["int8", "int4"], help="weight-only INT8/INT4 CPU kernels, quantized at load"
    )
    group.add_argument("--quantization", choices=["fp8"], help="round a full-precision checkpoint to FP8 at load")
    group.add_argument("--cpu-threads", type=int, help="threads for CPU inference (default: the usable cores)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        sparse_kernels=args.sparse_kernels,
        seed=args.seed,
        speculative_config=args.speculative_config,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_skip_layers=args.kv_cache_skip_layers,
        load_format=args.load_format,
        cpu_quantization=args.cpu_quantization,
        quantization=args.quantization,
        cpu_threads=args.cpu_threads,
    )


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0, help="0 disables")
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible output)")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):
    from slimserve.config import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from slimserve import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        completion = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": completion.text,
                        "token_ids": completion.token_ids,
                        "finish_reason": completion.finish_reason,
                    }
                )
            )
        else:
            print(
                f"### {prompt}\n{completion.text}\n[{completion.finish_reason}, {len(completion.token_ids)} tokens]\n"
            )


def cmd_chat(args: argparse.Namespace) -> None:
    from slimserve import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    for turn in range(1 << 30):
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        engine = llm.engine
        engine.add_request(f"chat-{turn}", llm.apply_chat_template(messages), params)
        reply = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                print(out.new_text, end="", flush=True)
                if out.finished:
                    reply = out.outputs[0].text
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_bench(args: argparse.Namespace) -> None:
    """Offline throughput on random token prompts, as vLLM's throughput benchmark measures it."""
    from slimserve import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    rng = random.Random(args.seed)
    vocab = llm.engine.model_config.vocab_size

    def length(mean: int) -> int:
        low, high = int(mean * (1 - args.random_range_ratio)), int(mean * (1 + args.random_range_ratio))
        return max(1, rng.randint(low, high))

    prompts, params = [], []
    for _ in range(args.num_prompts):
        prompts.append([rng.randrange(vocab) for _ in range(length(args.input_len))])
        params.append(SamplingParams(temperature=1.0, max_tokens=length(args.output_len), ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "num_prompts": args.num_prompts,
        "elapsed_s": elapsed,
        "requests_per_s": args.num_prompts / elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_in + num_out) / elapsed,
        "input_tokens": num_in,
        "output_tokens": num_out,
    }
    print(
        f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.1f} total tokens/s, "
        f"{result['output_tokens_per_s']:.1f} output tokens/s"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


def cmd_demo(args: argparse.Namespace) -> None:
    from slimserve import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in DEMO_PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(DEMO_PROMPTS, outputs):
        print(f"user: {prompt}\nassistant: {out.outputs[0].text.strip()}\n")


def cmd_convert(args: argparse.Namespace) -> None:
    from slimserve.checkpoint.convert import convert_gguf

    convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimserve",
        description="Compress Hugging Face language models without retraining and serve them fast.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="complete prompts (from --prompt or stdin, one per line)")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens to the terminal")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmarks: offline throughput, or a running server")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p = bench_sub.add_parser("throughput", help="offline throughput on random prompts (requests/s, tokens/s)")
    add_engine_args(p)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512, help="mean prompt length in tokens")
    p.add_argument("--output-len", type=int, default=256, help="mean output length in tokens")
    p.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths are uniform in [len*(1-r), len*(1+r)]"
    )
    p.add_argument("--output-json", default=None, help="write the results here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="answer a few questions with the embedded default model")
    add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face model folder")
    p.add_argument("gguf", help="path to a .gguf file")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 for dequantized tensors), float16, bfloat16")
    p.set_defaults(func=cmd_convert)

    add_bench_serve_parser(bench_sub)
    add_serve_parser(sub)
    add_compress_parser(sub)
    add_eval_parser(sub)
    add_train_draft_parser(sub)
    add_diffuse_parser(sub)
    add_distill_steps_parser(sub)
    add_prune_parser(sub)
    add_convert_gqa_parser(sub)
    add_distill_parser(sub)
    add_export_gguf_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run_reporting_bad_input(args.command, lambda: args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
