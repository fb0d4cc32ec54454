"""What both OpenAI endpoints share: a request becomes one engine request per choice, whose outputs come
back as one JSON response or as server-sent events. Endpoints only say how to build prompts and how a
choice looks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from slimserve.serve.choice_output import ChoiceOutput, Delta
from slimserve.serve.engine_client import EngineClient, EngineFailure, EngineUnavailable
from slimserve.serve.engine_messages import EngineRequest, TokenDelta
from slimserve.serve.errors import APIError
from slimserve.serve.preprocess import Preprocessor, sampling_params
from slimserve.serve.protocol import SamplingFields
from slimserve.serve.request_stream import RequestStream


@dataclass
class ServerContext:
    """Everything a request handler needs; one per app (no module-level state)."""

    engine: EngineClient
    preprocessor: Preprocessor
    model_name: str
    api_key: str | None = None


@dataclass
class Choice:
    index: int
    request: EngineRequest
    output: ChoiceOutput


class Endpoint(ABC):
    object_name: str
    chunk_object: str
    id_prefix: str

    def __init__(self, ctx: ServerContext, body: SamplingFields) -> None:
        self.ctx = ctx
        self.body = body
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_lens: list[int] = []
        self.choices: list[Choice] = []
        self._decode_cache: dict[int, str] = {}

    # ---- what an endpoint defines ------------------------------------------------------------------
    @abstractmethod
    def prompts(self) -> list[list[int]]:
        """Token ids of each prompt (blocking: runs in a worker thread)."""

    @abstractmethod
    def max_tokens(self) -> tuple[int | None, int | None, str]:
        """(requested, default, parameter name)."""

    @abstractmethod
    def num_logprobs(self) -> int | None:
        """Top alternatives per token, or None for no logprobs."""

    @abstractmethod
    def response_choice(self, choice: Choice) -> dict: ...

    @abstractmethod
    def chunk_choice(self, choice: Choice, delta: Delta) -> dict: ...

    def opening_chunks(self) -> list[dict]:
        return []

    # ---- shared ------------------------------------------------------------------------------------
    def decode_token(self, token_id: int) -> str:
        text = self._decode_cache.get(token_id)
        if text is None:
            text = self._decode_cache[token_id] = self.ctx.preprocessor.tokenizer.decode([token_id])
        return text

    def build_choices(self) -> None:
        pre = self.ctx.preprocessor
        requested, default, param = self.max_tokens()
        n = self.body.n or 1
        for p, ids in enumerate(self.prompts()):
            max_tokens = pre.max_tokens(requested, default, len(ids), param)
            self.prompt_lens.append(len(ids))
            for i in range(n):
                params = sampling_params(self.body, max_tokens, self.num_logprobs(), i)
                request = EngineRequest(f"{self.id}-{p}-{i}", ids, params)
                output = ChoiceOutput(pre.tokenizer, ids, params, bool(self.body.stream))
                self.choices.append(Choice(p * n + i, request, output))

    def envelope(self, choices: list[dict], object_name: str) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.ctx.model_name,
            "choices": choices,
        }

    def usage(self, completion: int) -> dict:
        prompt = sum(self.prompt_lens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _apply(by_id: dict[str, Choice], batch: list[TokenDelta]) -> list[tuple[Choice, Delta]]:
    """Each choice's share of a batch, added to its output (one Delta per choice that got some)."""
    grouped: dict[str, list[TokenDelta]] = {}
    for delta in batch:
        grouped.setdefault(delta.request_id, []).append(delta)
    return [(by_id[request_id], by_id[request_id].output.add(deltas)) for request_id, deltas in grouped.items()]


async def _collect(endpoint: Endpoint, stream: RequestStream) -> None:
    by_id = {c.request.request_id: c for c in endpoint.choices}
    async for batch in stream.batches():
        _apply(by_id, batch)


async def _until_disconnect(request: Request, work: asyncio.Future) -> bool:
    """Wait for `work`; False if the client went away first (then `work` is cancelled)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        return True
    work.cancel()
    return False


def _stream_error(error: BaseException) -> APIError:
    if isinstance(error, EngineUnavailable):
        return APIError(str(error), 503, "service_unavailable_error")
    if isinstance(error, EngineFailure):
        return APIError(str(error), 500, "internal_server_error")
    return APIError(str(error))


async def _submit(endpoint: Endpoint) -> RequestStream:
    """Hand the choices to the engine and wait until it has taken them, so that a refusal is a 4xx
    response rather than an error in a stream already begun."""
    engine = endpoint.ctx.engine
    stream = engine.submit([c.request for c in endpoint.choices])
    try:
        await stream.accepted()
    except BaseException:
        engine.abort(stream)
        raise
    return stream


async def serve(endpoint: Endpoint, request: Request) -> Response:
    ctx = endpoint.ctx
    if endpoint.body.model != ctx.model_name:
        raise APIError(
            f"the model {endpoint.body.model!r} does not exist", 404, "not_found_error", "model", "model_not_found"
        )
    name = endpoint.body.unsupported()
    if name:
        raise APIError(f"{name} is not supported", param=name)
    await asyncio.to_thread(endpoint.build_choices)
    try:
        stream = await _submit(endpoint)
    except (ValueError, EngineFailure) as e:
        raise _stream_error(e) from e
    if endpoint.body.stream:
        return StreamingResponse(
            _events(endpoint, stream),
            media_type="text/event-stream",
            # Runs however the stream ends, a client disconnect included: nothing keeps generating.
            background=BackgroundTask(ctx.engine.abort, stream),
        )
    work = asyncio.ensure_future(_collect(endpoint, stream))
    try:
        if not await _until_disconnect(request, work):
            return Response(status_code=499)
        work.result()
    except EngineFailure as e:
        raise _stream_error(e) from e
    finally:
        ctx.engine.abort(stream)
    choices = [endpoint.response_choice(c) for c in endpoint.choices]
    body = endpoint.envelope(choices, endpoint.object_name)
    body["usage"] = endpoint.usage(sum(len(c.output.token_ids) for c in endpoint.choices))
    return JSONResponse(body)


async def _events(endpoint: Endpoint, stream: RequestStream) -> AsyncIterator[str]:
    by_id = {c.request.request_id: c for c in endpoint.choices}
    include_usage = endpoint.body.include_usage()
    usage_field = {"usage": None} if include_usage else {}
    try:
        for chunk in endpoint.opening_chunks():
            yield _sse(endpoint.envelope([chunk], endpoint.chunk_object) | usage_field)
        async for batch in stream.batches():
            for choice, delta in _apply(by_id, batch):
                if not delta.text and not delta.finish_reason and delta.logprobs is None:
                    continue
                chunk = endpoint.chunk_choice(choice, delta)
                yield _sse(endpoint.envelope([chunk], endpoint.chunk_object) | usage_field)
        if include_usage:
            usage = endpoint.usage(sum(len(c.output.token_ids) for c in endpoint.choices))
            yield _sse(endpoint.envelope([], endpoint.chunk_object) | {"usage": usage})
    except EngineFailure as e:
        yield _sse(_stream_error(e).body())
    yield _sse("[DONE]")
