"""`slimserve serve MODEL`: the OpenAI-compatible server on the engine."""

from __future__ import annotations

import argparse
import logging


def configure_serve_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from slimserve.cli import add_engine_args

    add_engine_args(p)
    group = p.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    group.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return configure_serve_parser(
        subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    )


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from slimserve.cli import engine_kwargs
    from slimserve.config import EngineConfig
    from slimserve.serve.app import create_app

    logging.getLogger("slimserve").setLevel(args.log_level.upper())
    config = EngineConfig(model=args.model, **engine_kwargs(args))
    app = create_app(config, args.served_model_name or args.model, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
