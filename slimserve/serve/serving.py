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

from slimserve.engine.outputs import CompletionOutput, RequestOutput
from slimserve.serve.engine_loop import EngineFailure, EngineLoop, EngineRequest
from slimserve.serve.errors import APIError
from slimserve.serve.preprocess import Preprocessor, sampling_params
from slimserve.serve.protocol import SamplingFields
from slimserve.serve.request_stream import RequestStream


@dataclass
class ServerContext:
    """Everything a request handler needs; one per app (no module-level state)."""

    loop: EngineLoop
    preprocessor: Preprocessor
    model_name: str
    api_key: str | None = None


@dataclass
class Choice:
    index: int
    request: EngineRequest


@dataclass
class Delta:
    """What one choice gained since the last chunk (several engine steps may be merged)."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    text_offset: int = 0


@dataclass
class _ChoiceProgress:
    tokens_sent: int = 0
    chars_sent: int = 0

    def delta(self, outputs: list[RequestOutput]) -> Delta:
        last: CompletionOutput = outputs[-1].outputs[0]
        text = "".join(o.new_text for o in outputs)
        sent = self.tokens_sent
        delta = Delta(
            text=text,
            token_ids=last.token_ids[sent:],
            logprobs=None if last.logprobs is None else last.logprobs[sent:],
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
            text_offset=self.chars_sent,
        )
        self.tokens_sent = len(last.token_ids)
        self.chars_sent += len(text)
        return delta


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
    def response_choice(self, choice: Choice, output: CompletionOutput) -> dict: ...

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
                self.choices.append(Choice(p * n + i, request))

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


async def _collect(stream: RequestStream) -> dict[str, RequestOutput]:
    finals: dict[str, RequestOutput] = {}
    async for batch in stream.batches():
        for out in batch:
            if out.finished:
                finals[out.request_id] = out
    return finals


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
    if isinstance(error, EngineFailure):
        return APIError(str(error), 500, "internal_server_error")
    return APIError(str(error))


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
    stream = ctx.loop.submit([c.request for c in endpoint.choices], stream=bool(endpoint.body.stream))
    if endpoint.body.stream:
        return StreamingResponse(
            _events(endpoint, stream),
            media_type="text/event-stream",
            # Runs however the stream ends, a client disconnect included: nothing keeps generating.
            background=BackgroundTask(ctx.loop.abort, stream),
        )
    work = asyncio.ensure_future(_collect(stream))
    try:
        if not await _until_disconnect(request, work):
            return Response(status_code=499)
        finals = work.result()
    except (ValueError, EngineFailure) as e:
        raise _stream_error(e) from e
    finally:
        ctx.loop.abort(stream)
    choices = [endpoint.response_choice(c, finals[c.request.request_id].outputs[0]) for c in endpoint.choices]
    body = endpoint.envelope(choices, endpoint.object_name)
    body["usage"] = endpoint.usage(sum(len(out.outputs[0].token_ids) for out in finals.values()))
    return JSONResponse(body)


async def _events(endpoint: Endpoint, stream: RequestStream) -> AsyncIterator[str]:
    by_id = {c.request.request_id: c for c in endpoint.choices}
    progress = {request_id: _ChoiceProgress() for request_id in by_id}
    include_usage = endpoint.body.include_usage()
    usage_field = {"usage": None} if include_usage else {}
    try:
        for chunk in endpoint.opening_chunks():
            yield _sse(endpoint.envelope([chunk], endpoint.chunk_object) | usage_field)
        async for batch in stream.batches():
            grouped: dict[str, list[RequestOutput]] = {}
            for out in batch:
                grouped.setdefault(out.request_id, []).append(out)
            for request_id, outputs in grouped.items():
                delta = progress[request_id].delta(outputs)
                if not delta.text and not delta.finish_reason and delta.logprobs is None:
                    continue
                choice = endpoint.chunk_choice(by_id[request_id], delta)
                yield _sse(endpoint.envelope([choice], endpoint.chunk_object) | usage_field)
        if include_usage:
            usage = endpoint.usage(sum(p.tokens_sent for p in progress.values()))
            yield _sse(endpoint.envelope([], endpoint.chunk_object) | {"usage": usage})
    except (ValueError, EngineFailure) as e:
        yield _sse(_stream_error(e).body())
    yield _sse("[DONE]")
