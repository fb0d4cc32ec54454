"""`python -m slimserve.serve MODEL [options]` runs the server as `slimserve serve` does."""

from __future__ import annotations

import argparse

from slimserve.errors import run_reporting_bad_input
from slimserve.serve.cli import configure_serve_parser


def main(argv: list[str] | None = None) -> None:
    parser = configure_serve_parser(argparse.ArgumentParser(prog="python -m slimserve.serve"))
    args = parser.parse_args(argv)
    run_reporting_bad_input("serve", lambda: args.func(args))


if __name__ == "__main__":
    main()
