"""Errors a user can cause. Each renders as one line naming the key, the value and the fix."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input or study state; shown as one line, no traceback."""


class ConfigError(UserError):
    """A config key has a value that cannot work."""

    def __init__(self, key: str, value: Any, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


class UpstreamError(UserError):
    """A run needs a record of an earlier experiment that is missing or unusable."""


class DataError(UserError):
    """The corpus cannot give the windows the run needs."""
