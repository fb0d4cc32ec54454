"""Through the official openai client (sync and async, streaming or not) the server returns what
LLM.generate returns for the same prompt and seed: text, token counts, finish reasons, logprobs."""

import asyncio

import httpx2
import openai
import pytest

from slimserve import SamplingParams
from tests.serve.server import MODEL_NAME

PROMPTS = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13 w14 w15 w16 w17"]
MESSAGES = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30 w31 w32"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def offline_outputs(offline, prompts, **params):
    return [o.outputs[0] for o in offline.generate(prompts, SamplingParams(**params), use_tqdm=False)]


def stream_text(chunks) -> tuple[dict, dict, object]:
    """Concatenate streamed completion chunks per choice: texts, finish reasons, and the usage chunk."""
    texts, reasons, usage = {}, {}, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.0, max_tokens=12),
        dict(temperature=0.8, top_p=0.9, seed=1234, max_tokens=12),
        dict(temperature=0.0, max_tokens=12, presence_penalty=1.5, frequency_penalty=0.5),
    ],
    ids=["greedy", "seeded", "penalties"],
)
def test_completions_equal_offline(client, offline, params):
    expected = offline_outputs(offline, PROMPTS, **params)
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, **params)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert [c.finish_reason for c in response.choices] == [e.finish_reason for e in expected]
    assert response.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    assert response.usage.prompt_tokens == sum(len(p.split()) for p in PROMPTS)


def test_streamed_completion_equals_offline(client, offline):
    expected = offline_outputs(offline, PROMPTS[:1], temperature=0.7, seed=3, max_tokens=20)[0]
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[0],
        temperature=0.7,
        seed=3,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, reasons, usage = stream_text(stream)
    assert texts[0] == expected.text and reasons[0] == expected.finish_reason
    assert usage.completion_tokens == len(expected.token_ids) and usage.prompt_tokens == 4


def test_n_choices_are_seeded_one_apart(client, offline):
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[1], n=3, seed=10, temperature=1.0, max_tokens=8
    )
    for i, choice in enumerate(response.choices):
        assert choice.text == offline_outputs(offline, PROMPTS[1:2], temperature=1.0, seed=10 + i, max_tokens=8)[0].text
    assert len({c.text for c in response.choices}) > 1
    assert response.usage.prompt_tokens == 2 and response.usage.completion_tokens == 24


def test_stop_string_and_logprobs(client, offline):
    greedy = offline_outputs(offline, PROMPTS[:1], temperature=0.0, max_tokens=10, ignore_eos=True)[0]
    stop = greedy.text.split()[3]
    expected = offline_outputs(offline, PROMPTS[:1], temperature=0.0, max_tokens=10, stop=[stop], logprobs=2)[0]
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], temperature=0, max_tokens=10, stop=stop, logprobs=2
    )
    choice = response.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "stop"
    lp = choice.logprobs
    assert lp.token_logprobs == pytest.approx([e[t] for t, e in zip(expected.token_ids, expected.logprobs)])
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.tokens == [f"w{t}" for t in expected.token_ids]


def test_chat_equals_offline_chat(client, offline):
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert [t.token for t in choice.logprobs.content] == [f"w{t}" for t in expected.token_ids]
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)


def test_streamed_chat_equals_offline_chat(client, offline):
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0.9, seed=5, max_tokens=15), use_tqdm=False)[
        0
    ].outputs[0]
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            temperature=0.9,
            seed=5,
            max_completion_tokens=15,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_async_client_concurrent_streams_and_calls(async_client, offline):
    expected = offline_outputs(offline, PROMPTS, temperature=0.0, max_tokens=16)

    async def streamed(prompt: str) -> str:
        stream = await async_client.completions.create(
            model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=16, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def whole(prompt: str) -> str:
        response = await async_client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=16)
        return response.choices[0].text

    async def main():
        return await asyncio.gather(*[streamed(p) for p in PROMPTS], *[whole(p) for p in PROMPTS])

    texts = asyncio.run(main())
    assert texts == [e.text for e in expected] * 2


def test_models_health_and_default_lengths(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    # Chat without a limit generates until the context is full (or EOS); completions default to 16.
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens == 16
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.usage.prompt_tokens + response.usage.completion_tokens == server.ctx.preprocessor.max_model_len
    assert response.choices[0].finish_reason == "length"
    assert httpx2.get(f"{server.url}/health").json() == {"status": "ok"}
