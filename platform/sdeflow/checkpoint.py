"""Checkpoints: plain state dicts written atomically and read back with ``weights_only=True``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import SdeflowError


@contextlib.contextmanager
def _atomic(path: str | Path, mode: str):
    """A temporary file beside ``path``, flushed to disk and renamed over ``path`` on success.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` that never leaves a torn checkpoint."""
    with _atomic(path, "wb") as f:
        torch.save(obj, f)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a text file (config, metrics, results, summaries) in one step."""
    with _atomic(path, "w") as f:
        f.write(text)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints and names, by hashing: distinct tuples give unrelated
    streams (a linear formula such as seed·K + step would make rank r at step k replay another rank)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise SdeflowError(f"{path}: no checkpoint there") from None
    except Exception as e:  # unpickling errors come in many types
        raise SdeflowError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
