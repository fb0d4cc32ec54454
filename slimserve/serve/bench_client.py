"""`slimserve bench serve`: load an OpenAI-compatible server with random prompts at a request rate and
report throughput, TTFT, TPOT, ITL, end-to-end latency and goodput.

Prompts are random token ids sent to /v1/completions, so their lengths are exact without a tokenizer
on the client; outputs run to their length (ignore_eos). Arrivals follow a gamma process (Poisson at
burstiness 1) or all come at once (rate inf); --max-concurrency caps requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import sys
import time
from dataclasses import dataclass

from slimserve.errors import SlimserveError, run_reporting_bad_input
from slimserve.serve.bench_metrics import RequestResult, format_table, parse_slos, summarize


@dataclass
class BenchRequest:
    prompt: list[int]
    output_len: int


def random_requests(
    num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int
) -> list[BenchRequest]:
    """Lengths uniform in [len * (1 - r), len * (1 + r)]; token ids avoid the first few (special) ids."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    return [
        BenchRequest([rng.randrange(3, vocab_size) for _ in range(length(input_len))], length(output_len))
        for _ in range(num)
    ]


def arrival_gaps(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed + 1)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(num)]


async def _one(client, url: str, model: str, request: BenchRequest, headers: dict) -> RequestResult:
    result = RequestResult(prompt_len=len(request.prompt))
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if not result.ttft_s:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
        result.e2e_s = time.perf_counter() - start
        result.success = result.output_tokens > 0
        result.error = "" if result.success else "no usage in the stream"
    except Exception as e:  # a refused or dropped connection counts as a failed request
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _server_info(client, base: str, headers: dict) -> dict:
    try:
        response = await client.get(f"{base}/v1/models", headers=headers)
    except Exception as e:  # refused, unresolvable, timed out: one line, not a traceback
        raise SlimserveError(f"cannot reach {base}: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise SlimserveError(f"{base}/v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]


async def run_benchmark(args: argparse.Namespace) -> dict:
    import httpx2

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or args.num_prompts
    limits = httpx2.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(None), limits=limits) as client:
        info = await _server_info(client, base, headers)
        model = args.model or info["id"]
        vocab = args.random_vocab_size or info.get("vocab_size") or 1000
        requests = random_requests(
            args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, vocab, args.seed
        )
        gaps = arrival_gaps(args.num_prompts, args.request_rate, args.burstiness, args.seed)
        gate = asyncio.Semaphore(limit)
        url = base + "/v1/completions"

        async def limited(request: BenchRequest) -> RequestResult:
            async with gate:
                return await _one(client, url, model, request, headers)

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(limited(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration, parse_slos(args.goodput))
    config = {
        "url": base,
        "model": model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "seed": args.seed,
    }
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "config": config, **summary}


def _rate(value: str) -> float:
    rate = float(value)
    if rate <= 0:
        raise argparse.ArgumentTypeError("the request rate must be positive (or inf)")
    return rate


def add_bench_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return configure_bench_serve_parser(
        subparsers.add_parser("serve", help="benchmark a running OpenAI-compatible server (latency, throughput)")
    )


def configure_bench_serve_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random"], default="random")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=_rate, default=float("inf"), help="requests per second, or inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-vocab-size", type=int, default=None, help="token ids to draw (default: the server's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--goodput", nargs="+", default=None, metavar="SLO", help="SLOs in ms for goodput, e.g. ttft:200 tpot:50"
    )
    p.add_argument("--output-json", default=None, help="write the results here")
    p.set_defaults(func=cmd_bench_serve)
    return p


def cmd_bench_serve(args: argparse.Namespace) -> None:
    parse_slos(args.goodput)  # fail on a bad SLO before sending anything
    result = asyncio.run(run_benchmark(args))
    print(format_table(result))
    if result["failed"]:
        print(f"errors: {result['errors']}", file=sys.stderr)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    parser = configure_bench_serve_parser(argparse.ArgumentParser(prog="python -m slimserve.serve.bench_client"))
    args = parser.parse_args(argv)
    run_reporting_bad_input("bench serve", lambda: args.func(args))


if __name__ == "__main__":
    main()
