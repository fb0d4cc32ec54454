"""Property-based fuzzing of the HTTP API: bodies mixing valid fields with junk of every JSON type, and
raw bytes. Whatever comes in, the answer is a 2xx or a 4xx in OpenAI's error shape, never a 5xx."""

import json
from collections import Counter

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.server import MODEL_NAME, ServerThread

EXAMPLES = 150

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
words = st.lists(st.integers(0, 511).map(lambda i: f"w{i}"), min_size=1, max_size=8).map(" ".join)
token_ids = st.lists(st.integers(0, 511), min_size=1, max_size=8)

# Valid values; in half of the bodies, junk of any JSON type replaces one field.
COMMON = {
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 600),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(words, st.lists(words, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 600), max_size=3),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "best_of": st.just(1),
    "logit_bias": st.just({}),
}
COMPLETION = {
    **COMMON,
    "max_tokens": st.integers(1, 8),
    "logprobs": st.integers(0, 5),
    "echo": st.just(False),
    "suffix": st.just(""),
}
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": words}
)
CHAT = {
    **COMMON,
    "max_completion_tokens": st.integers(1, 8),
    "max_tokens": st.integers(1, 8),
    "logprobs": st.just(True),
    "top_logprobs": st.integers(0, 5),
    "tools": st.just([]),
    "response_format": st.just({"type": "text"}),
}
model = st.sampled_from([MODEL_NAME] * 8 + ["other"])
prompt = st.one_of(
    words, token_ids, st.lists(words, min_size=1, max_size=3), st.lists(token_ids, min_size=1, max_size=2)
)


def bodies(required: dict, optional: dict) -> st.SearchStrategy:
    valid = st.fixed_dictionaries(required, optional=optional)
    fields = sorted({*required, *optional})

    def spoil(args: tuple) -> dict:
        body, field, value, keep = args
        return body if keep else {**body, field: value}

    return st.tuples(valid, st.sampled_from(fields), junk, st.booleans()).map(spoil)


completion_bodies = bodies({"model": model, "prompt": prompt}, COMPLETION)
chat_bodies = bodies({"model": model, "messages": st.lists(message, min_size=1, max_size=3)}, CHAT)
raw_bodies = st.one_of(st.binary(max_size=64), junk.map(lambda v: json.dumps(v).encode()))


@pytest.fixture(scope="module")
def fuzz_server(tiny_folder):
    # A short context bounds what a valid fuzzed request can ask the engine to do.
    with ServerThread(tiny_folder, block_size=4, num_kv_blocks=256, max_model_len=48) as s:
        yield s


def check(response: httpx2.Response, streamed: bool) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    elif streamed:
        lines = [line for line in response.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        assert all("error" not in json.loads(line[6:]) for line in lines[:-1])
    else:
        assert response.json()["choices"]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_fuzz_bodies(fuzz_server, route, capsys):
    statuses = Counter()
    strategy = completion_bodies if route == "completions" else chat_bodies

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(strategy, strategy, strategy, raw_bodies))
    def run(body):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        streamed = isinstance(body, dict) and body.get("stream") is True
        response = httpx2.post(f"{fuzz_server.url}/v1/{route}", content=content, timeout=60)
        statuses[response.status_code] += 1
        check(response, streamed)

    run()
    fuzz_server.wait_idle()
    assert fuzz_server.pool_is_whole()
    with capsys.disabled():
        print(f"\nfuzzed /v1/{route}: {statuses.total()} cases, no 5xx; statuses {dict(sorted(statuses.items()))}")
