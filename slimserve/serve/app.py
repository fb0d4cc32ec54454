"""The FastAPI app: routes, API-key check, HTTP metrics. Built by create_app from an engine config; the
engine process starts and stops with the app."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import AutoTokenizer

from slimserve.checkpoint.resolve import resolve_model
from slimserve.config import EngineConfig
from slimserve.engine.engine import LLMEngine
from slimserve.serve.chat import ChatEndpoint
from slimserve.serve.completions import CompletionEndpoint
from slimserve.serve.engine_client import EngineClient
from slimserve.serve.engine_process import EngineFactory
from slimserve.serve.errors import APIError, from_validation_error, install_error_handlers
from slimserve.serve.metrics import ServerMetrics
from slimserve.serve.preprocess import Preprocessor
from slimserve.serve.protocol import ChatCompletionRequest, CompletionRequest
from slimserve.serve.serving import ServerContext, serve

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class _HTTPMetrics:
    """Counts responses by route and status (a plain ASGI wrapper: it leaves streaming untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.http_requests.labels(route, str(status)).inc()


def _context(request: Request) -> ServerContext:
    return request.app.state.ctx


def _check_api_key(request: Request) -> None:
    key = _context(request).api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError("invalid or missing API key (Authorization: Bearer KEY)", 401, code="invalid_api_key")


async def _parse(request: Request, schema: type[BaseModel]) -> BaseModel:
    # Parsed by hand rather than by FastAPI, so malformed JSON and wrong types share one error path.
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise from_validation_error(e) from e


def _openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])

    @router.post("/completions", openapi_extra={"requestBody": _body_schema(CompletionRequest)})
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        return await serve(CompletionEndpoint(_context(request), body), request)

    @router.post("/chat/completions", openapi_extra={"requestBody": _body_schema(ChatCompletionRequest)})
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest)
        return await serve(ChatEndpoint(_context(request), body), request)

    @router.get("/models")
    async def models(request: Request) -> dict:
        ctx = _context(request)
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "slimserve",
            "max_model_len": ctx.preprocessor.max_model_len,
            "vocab_size": ctx.preprocessor.vocab_size,
        }
        return {"object": "list", "data": [card]}

    return router


def _body_schema(schema: type[BaseModel]) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}


def create_app(
    config: EngineConfig,
    model_name: str | None = None,
    api_key: str | None = None,
    engine_factory: EngineFactory = LLMEngine,
) -> FastAPI:
    """The server of `config`'s model; `engine_factory` builds the engine inside the engine process."""
    # Resolved here, so that a bad model argument fails before anything starts, and converted only once.
    model_path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    metrics = ServerMetrics()
    engine = EngineClient(replace(config, model=model_path), metrics, engine_factory)
    metrics.watch_engine(lambda: engine.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        info = await engine.start()
        preprocessor = Preprocessor(tokenizer, info.max_model_len, info.vocab_size)
        app.state.ctx = ServerContext(engine, preprocessor, model_name or config.model, api_key)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="slimserve", description="OpenAI-compatible API", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(_openai_router())

    @app.get("/health")
    async def health() -> Response:
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": engine.failed or "the engine is not running"}, 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_HTTPMetrics, metrics=metrics)
    return app
