"""The server as a process of its own (python -m slimserve.serve, as `slimserve serve` runs it): driven
by the benchmark client, its engine loop not starved by a flood of requests to parse, and Ctrl-C
stopping it cleanly."""

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import httpx2
import pytest

from slimserve.serve.bench_client import add_bench_serve_parser
from slimserve.serve.bench_client import main as bench_main
from slimserve.serve.bench_metrics import percentile
from slimserve.serve.cli import add_serve_parser
from tests.serve.metrics_text import histogram_delta, scrape

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 24, 12, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parsers_nest_under_a_main_parser():
    parser = argparse.ArgumentParser(prog="slimserve")
    sub = parser.add_subparsers(dest="command")
    add_serve_parser(sub)
    add_bench_serve_parser(sub.add_parser("bench").add_subparsers(dest="bench_command"))
    args = parser.parse_args(["serve", "folder", "--port", "9000", "--api-key", "k", "--max-num-seqs", "8"])
    assert (args.model, args.port, args.api_key, args.max_num_seqs, args.host) == ("folder", 9000, "k", 8, "127.0.0.1")
    args = parser.parse_args(["bench", "serve", "--request-rate", "inf", "--num-prompts", "3", "--goodput", "ttft:5"])
    assert args.request_rate == float("inf") and args.num_prompts == 3 and args.goodput == ["ttft:5"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "serve", "--request-rate", "-1"])


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([0, 10], 90) == 9


@pytest.fixture(scope="module")
def server_process(tiny_folder):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "slimserve.serve",
        tiny_folder,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--block-size",
        "4",
        "--served-model-name",
        "tiny",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx2.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx2.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start:\n{proc.stdout.read()}")
        time.sleep(0.2)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_bench_serve_against_a_server_process(server_process, tmp_path, capsys):
    proc, url = server_process
    out = tmp_path / "bench.json"
    for rate in ("20", "inf"):
        bench_main(
            [
                "--url",
                url,
                "--num-prompts",
                str(NUM_PROMPTS),
                "--request-rate",
                rate,
                "--max-concurrency",
                "16",
                "--random-input-len",
                str(INPUT_LEN),
                "--random-output-len",
                str(OUTPUT_LEN),
                "--goodput",
                "ttft:60000",
                "e2el:60000",
                "--output-json",
                str(out),
            ]
        )
        result = json.loads(out.read_text())
        assert result["completed"] == NUM_PROMPTS and result["failed"] == 0
        assert result["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        assert result["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
        assert result["request_goodput"] == pytest.approx(result["request_throughput"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            stats = result[key]
            assert 0 < stats["median"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert "Output token throughput" in capsys.readouterr().out
    metrics = scrape(url)
    assert metrics["slimserve_time_to_first_token_seconds_count"] == 2 * NUM_PROMPTS
    with capsys.disabled():
        gap_max = 1e3 * metrics["slimserve_engine_step_gap_max_seconds"]
        step_mean = 1e3 * metrics["slimserve_engine_step_seconds_sum"] / metrics["slimserve_engine_step_seconds_count"]
        print(f"\nserver process: step gap max {gap_max:.2f} ms, mean step {step_mean:.2f} ms")


async def _decode_streams(client: httpx2.AsyncClient, url: str, num: int, tokens: int) -> None:
    body = {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": tokens, "ignore_eos": True, "stream": True}

    async def one() -> None:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass

    await asyncio.gather(*[one() for _ in range(num)])


async def _flood(client: httpx2.AsyncClient, url: str, stop: asyncio.Event) -> int:
    """Requests the front end must parse, tokenize and template before rejecting (too long for the
    context): work for the HTTP side only, none for the engine."""
    words = " ".join(f"w{3 + i % 500}" for i in range(600))
    bodies = [
        ("completions", {"model": "tiny", "prompt": list(range(3, 603)), "max_tokens": 1}),
        ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": words}]}),
        ("completions", {"model": "tiny", "prompt": words, "stop": ["w1"] * 99}),
    ]
    sent = 0
    while not stop.is_set():
        responses = await asyncio.gather(*[client.post(f"{url}/v1/{r}", json=b) for r, b in bodies * 8])
        assert all(r.status_code == 400 for r in responses)
        sent += len(responses)
    return sent


def test_engine_loop_is_not_starved_by_parsing(server_process, capsys):
    _, url = server_process

    async def phase(flood: bool) -> tuple[dict, dict, int]:
        async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=100)) as client:
            before = scrape(url)
            stop = asyncio.Event()
            flooding = asyncio.ensure_future(_flood(client, url, stop)) if flood else None
            await _decode_streams(client, url, 32, 60)
            stop.set()
            sent = await flooding if flooding else 0
            after = scrape(url)
        gap = histogram_delta(before, after, "slimserve_engine_step_gap_seconds")
        step = histogram_delta(before, after, "slimserve_engine_step_seconds")
        return gap, step, sent

    quiet_gap, quiet_step, _ = asyncio.run(phase(flood=False))
    gap, step, sent = asyncio.run(phase(flood=True))
    with capsys.disabled():
        print(f"\nquiet:   step gaps {quiet_gap}, steps {quiet_step}")
        print(f"flooded: step gaps {gap}, steps {step}, {sent} requests rejected meanwhile")
    assert sent > 0 and gap["count"] >= 59
    # The engine process goes straight from one step to the next; the flood may slow its steps (the front
    # end's process competes for the same cores), never leave it waiting on the front end.
    assert gap["mean_ms"] < 10 and gap["p99_under_ms"] <= 50


def test_bench_reports_an_unreachable_server(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1"])
    assert exit_info.value.code == 1 and "cannot reach" in capsys.readouterr().err


def test_ctrl_c_stops_the_server(server_process):
    proc, _ = server_process
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
