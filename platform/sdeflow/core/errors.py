"""Errors a user can act on: each prints as one line and makes the CLI exit with status 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SdeflowError(Exception):
    """A mistake in the user's input (config, plugin, data), reported without a traceback."""


class ConfigError(SdeflowError):
    """A config file or override is malformed, names something unknown or holds a wrong value."""


class PluginError(SdeflowError):
    """A plugin failed to load or registered something it should not."""


class DataError(SdeflowError):
    """A data set is missing or unreadable."""


class InvalidArgument(ValueError):
    """Raised by a component's constructor for one bad argument, so the kernel can name the dotted key."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


def require(condition: bool, argument: str, message: str) -> None:
    """Raise :class:`InvalidArgument` for ``argument`` unless ``condition`` holds."""
    if not condition:
        raise InvalidArgument(argument, message)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def blame_overrides(error: ConfigError, source: str, overridden: Iterable[str], where: str) -> ConfigError:
    """``error`` about a key set by an override, re-addressed from the file (``source``) to ``where``
    (the command line, the API's overrides); any other error is returned as it is."""
    text = str(error)
    if not text.startswith(f"{source}: "):
        return error
    rest = text[len(source) + 2:]
    key = rest.split(":", 1)[0].strip()
    for name in overridden:
        if key == name or key.startswith(f"{name}.") or name.startswith(f"{key}."):
            return type(error)(f"{where}: {rest}")
    return error
