"""Input errors of the compression tools: each one prints as a single line and makes the CLI exit non-zero."""

from slimserve.errors import SlimserveError


class QuantConfigError(SlimserveError):
    """A scheme, preset, method or option that does not exist or does not fit the model."""


class RecipeError(SlimserveError):
    """A YAML recipe that cannot be read or names unknown stages or fields."""


class OutputExistsError(SlimserveError):
    """The output folder already exists: compression never overwrites a checkpoint."""


class CalibrationError(SlimserveError):
    """Calibration data that cannot be produced (empty text, too short for one sample, ...)."""
