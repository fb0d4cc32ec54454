"""A client that goes away has its request aborted (sequence and KV blocks freed) before the engine's
next step, whether it was streaming or waiting for a whole response."""

import time

import httpx2
import openai
import pytest

from tests.serve.metrics_text import finished, scrape
from tests.serve.server import MODEL_NAME

LONG = dict(model=MODEL_NAME, prompt="w5 w6 w7", max_tokens=480, temperature=0, extra_body={"ignore_eos": True})


def aborts(server) -> float:
    return finished(scrape(server.url), "abort")


def test_stream_disconnect_aborts_within_one_step(server):
    server.wait_idle()
    before = aborts(server)
    server.ctx.engine.abort_delays.clear()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(stream=True, **LONG)
    for received, _ in enumerate(stream, 1):
        if received == 3:
            break
    stream.close()
    server.wait_idle()
    assert aborts(server) == before + 1
    delays = list(server.ctx.engine.abort_delays)
    assert delays and max(delays) <= 1
    assert server.pool_is_whole()


def test_non_streaming_disconnect_aborts(server):
    server.wait_idle()
    before = aborts(server)
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(
            f"{server.url}/v1/completions",
            json={k: v for k, v in LONG.items() if k != "extra_body"} | {"ignore_eos": True},
            timeout=0.3,
        )
    deadline = time.monotonic() + 10
    while aborts(server) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert aborts(server) == before + 1
    server.wait_idle()
    assert server.pool_is_whole()
