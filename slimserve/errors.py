"""Errors that mean "the input is wrong", so the CLI can print one line and exit non-zero."""

import sys
from collections.abc import Callable


class SlimserveError(ValueError):
    """Base class: every user-facing input error is a ValueError subclass."""


class ModelNotFoundError(SlimserveError):
    """A model folder or file that does not exist or lacks weights/config."""


class UnsupportedArchitectureError(SlimserveError):
    """An architecture name no model class is registered for."""


class CheckpointError(SlimserveError):
    """A tensor that is missing, corrupt, or of the wrong shape or dtype."""


class SamplingParamsError(SlimserveError):
    """An impossible sampling parameter (top_p <= 0, temperature < 0, ...)."""


class PromptTooLongError(SlimserveError):
    """A prompt that does not fit into max_model_len."""


def run_reporting_bad_input(command: str, run: Callable[[], object]) -> None:
    """Run a command-line handler; bad input becomes one line on stderr and exit status 1."""
    try:
        run()
    except SlimserveError as e:
        print(f"slimserve {command}: error: {e}", file=sys.stderr)
        sys.exit(1)
