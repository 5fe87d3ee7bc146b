"""One error model: every failure rewardlab reports is a :class:`RewardLabError` that names its input.

``str(error)`` is one line, ``<what> — <how to fix>``; the CLI prints it as ``error: ...`` and exits
with ``error.exit_code`` (2 for usage and configuration errors, 1 otherwise). Each subclass also derives
from the built-in exception callers would expect (``ValueError``, ``FileNotFoundError`` ...), so existing
``except`` clauses keep working.
"""

from __future__ import annotations


class RewardLabError(Exception):
    """Base class. ``message`` names the input (file, line, key, option); ``hint`` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class UsageError(RewardLabError, ValueError):
    """A bad option or argument (CLI flag, keyword argument)."""

    exit_code = 2


class ConfigError(RewardLabError, ValueError):
    """A bad configuration file or setting."""

    exit_code = 2


class UnknownModelError(UsageError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would show repr(message)
        return RewardLabError.__str__(self)


class DataError(RewardLabError, ValueError):
    """A malformed data file, row or field; the message names the file, line and field."""


class ImageLoadError(RewardLabError, ValueError):
    """An input image is missing, unreadable or of an unsupported kind; ``name`` says which."""

    def __init__(self, name: str, reason: str, hint: str | None = None):
        super().__init__(f"{name}: {reason}", hint)
        self.name = name
        self.reason = reason


class CheckpointError(RewardLabError, RuntimeError):
    """A checkpoint could not be read, is unsafe, or does not match the model."""


class WeightsNotFoundError(RewardLabError, FileNotFoundError):
    """No weight file could be had for a model."""

    def __str__(self) -> str:
        return RewardLabError.__str__(self)


class NonFiniteError(RewardLabError, ArithmeticError):
    """A NaN or infinite number where a finite one is required (scores, losses, weights)."""


class DeviceError(UsageError):
    """A device that this machine does not have."""
