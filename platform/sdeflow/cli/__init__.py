"""The ``sdeflow`` command: its commands (main) and their arguments (parser)."""

from .main import main

__all__ = ["main"]
