"""The ``sdeflow`` command: its commands (``commands``) and their arguments (``parser``); ``main`` runs one."""

from .commands import main

__all__ = ["main"]
