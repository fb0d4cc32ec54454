"""If the engine itself fails, its requests end with an error (500, or an error event in the stream),
/health turns 503, and the server goes on answering."""

import httpx2

from tests.serve.server import MODEL_NAME, ServerThread

BODY = {"model": MODEL_NAME, "prompt": "w5 w6", "max_tokens": 4}


def test_a_failing_step_fails_its_requests_not_the_server(tiny_folder):
    with ServerThread(tiny_folder, block_size=4, num_kv_blocks=64) as server:
        real_step = server.engine.step
        failures = iter([True, True])

        def flaky_step():
            if next(failures, False):
                raise RuntimeError("device lost")
            return real_step()

        server.engine.step = flaky_step
        response = httpx2.post(f"{server.url}/v1/completions", json=BODY)
        assert response.status_code == 500 and "device lost" in response.json()["error"]["message"]
        streamed = httpx2.post(f"{server.url}/v1/completions", json={**BODY, "stream": True})
        lines = [line for line in streamed.text.splitlines() if line]
        assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert httpx2.get(f"{server.url}/health").status_code == 503
        assert httpx2.post(f"{server.url}/v1/completions", json=BODY).status_code == 200
        server.wait_idle()
        assert server.engine.block_manager.num_free_blocks == server.engine.block_manager.num_blocks
