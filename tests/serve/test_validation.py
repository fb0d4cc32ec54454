"""Bad requests get a 4xx JSON error in OpenAI's shape, never a 5xx, and leak no KV blocks."""

import httpx2
import pytest

from tests.serve.server import MODEL_NAME, ServerThread

OK_COMPLETION = {"model": MODEL_NAME, "prompt": "w5 w6", "max_tokens": 4}
OK_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 4}

BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {**OK_COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("completions", {"model": MODEL_NAME}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "max_tokens": "4"}, 400, "max_tokens"),
    ("completions", {**OK_COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {**OK_COMPLETION, "max_tokens": 10**12}, 400, "max_tokens"),
    ("completions", {**OK_COMPLETION, "temperature": -0.5}, 400, "temperature"),
    ("completions", {**OK_COMPLETION, "temperature": "hot"}, 400, "temperature"),
    ("completions", {**OK_COMPLETION, "top_p": 0}, 400, "top_p"),
    ("completions", {**OK_COMPLETION, "n": 0}, 400, "n"),
    ("completions", {**OK_COMPLETION, "n": 10**6}, 400, "n"),
    ("completions", {**OK_COMPLETION, "logprobs": 99}, 400, "logprobs"),
    ("completions", {**OK_COMPLETION, "presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {**OK_COMPLETION, "seed": 2**70}, 400, "seed"),
    ("completions", {**OK_COMPLETION, "stream": "yes"}, 400, "stream"),
    ("completions", {**OK_COMPLETION, "stop": [1, 2]}, 400, "stop"),
    ("completions", {**OK_COMPLETION, "prompt": ""}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "prompt": []}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "prompt": [5, 99999]}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "prompt": [5, -1]}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "prompt": " ".join(["w7"] * 600)}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "echo": True}, 400, "echo"),
    ("chat/completions", {**OK_CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {**OK_CHAT, "messages": [{"role": "wizard", "content": "w5"}]}, 400, None),
    ("chat/completions", {**OK_CHAT, "messages": [{"content": "w5"}]}, 400, None),
    ("chat/completions", {**OK_CHAT, "messages": "w5"}, 400, "messages"),
    ("chat/completions", {**OK_CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat/completions", {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {**OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("chat/completions", {**OK_CHAT, "model": None}, 400, "model"),
]


def check_error(response: httpx2.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    return error


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_request(server, route, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    free = server.stats.num_free_blocks
    for stream in (False, True):
        if stream and isinstance(body, dict):
            kwargs = {"json": {**body, "stream": True}} if "stream" not in body else kwargs
        check_error(httpx2.post(f"{server.url}/v1/{route}", **kwargs), status, param)
    server.wait_idle()
    assert server.stats.num_free_blocks == free


def test_unknown_route_and_method(server):
    check_error(httpx2.get(f"{server.url}/v1/nothing"), 404, None)
    check_error(httpx2.get(f"{server.url}/v1/completions"), 405, None)


def test_good_requests_still_work(server):
    for route, body in (("completions", OK_COMPLETION), ("chat/completions", OK_CHAT)):
        response = httpx2.post(f"{server.url}/v1/{route}", json=body)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


def test_api_key(tiny_folder):
    with ServerThread(tiny_folder, api_key="s3cret", block_size=4, num_kv_blocks=64) as s:
        url = f"{s.url}/v1/completions"
        check_error(httpx2.post(url, json=OK_COMPLETION), 401, None)
        check_error(httpx2.post(url, json=OK_COMPLETION, headers={"Authorization": "Bearer wrong"}), 401, None)
        check_error(httpx2.get(f"{s.url}/v1/models"), 401, None)
        ok = httpx2.post(url, json=OK_COMPLETION, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx2.get(f"{s.url}/health").status_code == 200  # probes need no key
