"""`python -m slimserve.serve MODEL [options]` runs the server as `slimserve serve` does."""

from __future__ import annotations

import argparse
import sys

from slimserve.errors import SlimserveError
from slimserve.serve.cli import configure_serve_parser


def main(argv: list[str] | None = None) -> None:
    parser = configure_serve_parser(argparse.ArgumentParser(prog="python -m slimserve.serve"))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SlimserveError as e:
        print(f"slimserve serve: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
