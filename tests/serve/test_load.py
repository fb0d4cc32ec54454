"""200 concurrent streaming requests, a third of them dropped by their clients at random points: the
rest complete with the offline API's output, and afterwards the KV pool is whole and /metrics agrees."""

import asyncio
import random

import openai

from slimserve import SamplingParams
from tests.serve.metrics_text import finished, scrape
from tests.serve.server import MODEL_NAME, ServerThread

NUM_REQUESTS = 200
NUM_PROMPTS = 20
# Long enough that a client dropping within its first 8 chunks leaves before its request can finish, however
# slow the client side is (a busy machine).
MAX_TOKENS = 64
NUM_KV_BLOCKS = 600


def test_concurrent_streams_with_cancellations(tiny_folder, offline):
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(3, 512)}" for _ in range(rng.randint(4, 16))) for _ in range(NUM_PROMPTS)]
    expected = [
        offline.generate(p, SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
        for i, p in enumerate(prompts)
    ]
    cancel_after = {i: rng.randint(0, 8) for i in rng.sample(range(NUM_REQUESTS), NUM_REQUESTS // 3)}

    # A KV pool smaller than the load needs: requests are also preempted and recomputed.
    with ServerThread(tiny_folder, block_size=4, num_kv_blocks=NUM_KV_BLOCKS) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> tuple[str, str | None] | None:
            stream = await client.completions.create(
                model=MODEL_NAME,
                prompt=prompts[i % NUM_PROMPTS],
                temperature=1.0,
                seed=i % NUM_PROMPTS,
                max_tokens=MAX_TOKENS,
                stream=True,
            )
            text, reason, chunks = "", None, 0
            async for chunk in stream:
                if i in cancel_after and chunks >= cancel_after[i]:
                    await stream.close()
                    return None
                chunks += 1
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

        async def main():
            return await asyncio.gather(*[one(i) for i in range(NUM_REQUESTS)])

        server.ctx.engine.gaps.reset()
        results = asyncio.run(main())
        gaps = server.ctx.engine.gaps.summary()
        print(f"\nstep gaps under load: {gaps['gap']}\nsteps: {gaps['step']}")

        for i, result in enumerate(results):
            if i not in cancel_after:
                want = expected[i % NUM_PROMPTS].outputs[0]
                assert result == (want.text, want.finish_reason), i

        server.wait_idle()
        assert server.pool_is_whole()
        metrics = scrape(server.url)
        assert metrics["slimserve_num_requests_running"] == 0 and metrics["slimserve_num_requests_waiting"] == 0
        assert metrics["slimserve_kv_cache_usage_perc"] == 0
        assert metrics["slimserve_kv_cache_free_blocks"] == metrics["slimserve_kv_cache_blocks"] == NUM_KV_BLOCKS
        done = finished(metrics, "stop") + finished(metrics, "length")
        assert done + finished(metrics, "abort") == NUM_REQUESTS
        assert NUM_REQUESTS - len(cancel_after) <= done
        assert 0 < finished(metrics, "abort") <= len(cancel_after)
        assert metrics["slimserve_num_preemptions_total"] > 0
        assert metrics['slimserve_http_requests_total{route="/v1/completions",status="200"}'] == NUM_REQUESTS
