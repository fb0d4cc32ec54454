"""If the engine fails, its requests end with an error (a JSON 5xx, or an error event in the stream) and
/health turns 503: a failing step leaves the server answering, a dead engine process makes it refuse
work. A request the engine itself refuses is a 400. No request ever hangs."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx2

from tests.serve.engines import UNLUCKY_SEED, FlakyEngine, PickyEngine
from tests.serve.server import MODEL_NAME, ServerThread

BODY = {"model": MODEL_NAME, "prompt": "w5 w6", "max_tokens": 4}
LONG = {**BODY, "max_tokens": 480, "ignore_eos": True}


def data_lines(response_text: str) -> list[str]:
    return [line for line in response_text.splitlines() if line]


def test_a_failing_step_fails_its_requests_not_the_server(tiny_folder):
    with ServerThread(tiny_folder, engine_factory=FlakyEngine, block_size=4, num_kv_blocks=64) as server:
        url = f"{server.url}/v1/completions"
        response = httpx2.post(url, json=BODY)
        assert response.status_code == 500 and "device lost" in response.json()["error"]["message"]
        streamed = httpx2.post(url, json={**BODY, "stream": True})
        lines = data_lines(streamed.text)
        assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert httpx2.get(f"{server.url}/health").status_code == 503
        assert httpx2.post(url, json=BODY).status_code == 200
        server.wait_idle()
        assert server.pool_is_whole()


def test_a_request_the_engine_refuses_is_a_400(tiny_folder):
    with ServerThread(tiny_folder, engine_factory=PickyEngine, block_size=4, num_kv_blocks=64) as server:
        url = f"{server.url}/v1/completions"
        # Choice i is seeded with seed + i: the engine takes the first choice, then refuses the second.
        body = {**BODY, "n": 2, "seed": UNLUCKY_SEED - 1}
        for stream in (False, True):
            response = httpx2.post(url, json={**body, "stream": stream}, timeout=30)
            assert response.status_code == 400, response.text
            assert "refused" in response.json()["error"]["message"]
        server.wait_idle()
        assert server.pool_is_whole()
        assert httpx2.post(url, json={**body, "seed": 1}, timeout=30).status_code == 200
        assert httpx2.get(f"{server.url}/health").status_code == 200


def test_a_dead_engine_process_fails_requests_and_health(tiny_folder):
    with ServerThread(tiny_folder, block_size=4, num_kv_blocks=512) as server:
        url = f"{server.url}/v1/completions"
        assert server.ctx.engine.pid != os.getpid()
        with ThreadPoolExecutor(1) as pool:
            whole = pool.submit(httpx2.post, url, json=LONG, timeout=30)
            with httpx2.stream("POST", url, json={**LONG, "stream": True}, timeout=30) as streamed:
                lines = (line for line in streamed.iter_lines() if line)
                assert next(lines).startswith("data: {")  # generating
                os.kill(server.ctx.engine.pid, signal.SIGKILL)
                rest = list(lines)
            assert '"error"' in rest[-2] and rest[-1] == "data: [DONE]"
            response = whole.result()
        assert response.status_code == 503 and "exited" in response.json()["error"]["message"]
        health = httpx2.get(f"{server.url}/health")
        assert health.status_code == 503 and "exited" in health.json()["reason"]
        later = httpx2.post(url, json=BODY, timeout=10)
        assert later.status_code == 503 and set(later.json()["error"]) == {"message", "type", "param", "code"}
