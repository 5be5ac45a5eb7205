"""Errors raised by the inversion and editing engine."""


class EngineInputError(ValueError):
    """An argument the engine cannot use; the message names the argument and the fix."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared in one image's computation; the message names the image and the step."""
