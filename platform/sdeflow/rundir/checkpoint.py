"""Checkpoints: plain state dicts written atomically and read back with ``weights_only=True``.

Every file a run writes goes through :func:`atomic_file`: a temporary ``.NAME.*.tmp`` beside the target,
flushed and renamed over it, with the user's normal permissions (umask), so a crash, a kill or a full
disk leaves the old file or the new one, never a torn one. A process killed mid-write leaves its
temporary file behind; :func:`remove_stale_temporaries` clears them when the next writer starts.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.errors import SdeflowError

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path: str | Path, error: OSError) -> SdeflowError:
    """A disk-full, permission or missing-folder error as one line naming the file."""
    reason = error.strerror or str(error) or type(error).__name__
    return SdeflowError(f"{path}: cannot write ({reason}); nothing was replaced")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """A temporary file beside ``path``, flushed to disk and renamed over ``path`` on success.

    A crash at any moment leaves either the old file or the new one, never a torn one. An OSError
    (full disk, no permission) becomes a one-line :class:`SdeflowError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: teammates could not read the run
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that killed writers left under ``folder`` (call it only while
    holding the run's lock, so no live writer's file is taken)."""
    removed = []
    for tmp in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def save_atomic(obj: dict[str, Any], path: str | Path, *, keep_previous: Path | None = None) -> None:
    """``torch.save`` that never leaves a torn checkpoint.

    With ``keep_previous``, the file being replaced is moved there first, so the checkpoint before
    this one survives too (a crash between the two renames leaves only ``keep_previous``; resuming
    falls back to it).
    """
    path = Path(path)
    with atomic_file(path, "wb") as f:
        recorder = _RecordingWriter(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error:  # torch's zip writer turns a full disk into "unexpected pos ..."
                raise recorder.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)


class _RecordingWriter:
    """A binary file for ``torch.save`` that remembers the OSError a write raised."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a text file (config, metrics, results, summaries) in one step."""
    with atomic_file(path, "w") as f:
        f.write(text)


WEIGHT_KEYS = ("model", "ema", "components", "ema_components", "optimizer")
"""The parts of a checkpoint that hold weights, and the optimizer's moments that move them."""


def non_finite_entries(state: dict[str, Any]) -> list[str]:
    """The weights in a checkpoint's state (``model``, ``ema`` and component states) that hold a NaN or an
    infinity, as ``part.name`` (empty: every weight is finite)."""
    bad = []
    for part in WEIGHT_KEYS:
        for name, value in _tensors(state.get(part) or {}, part):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
    return bad


def _tensors(tree: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}")


class UnreadableCheckpoint(SdeflowError):
    """A checkpoint file that is missing, torn, not a checkpoint, or holds something else."""


CHECKPOINT_KEYS = ("model", "ema", "step")


def load(path: str | Path, map_location: str | torch.device = "cpu",
         required: tuple[str, ...] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only) and check it holds ``required``."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UnreadableCheckpoint(f"{path}: no checkpoint there") from None
    except Exception as e:  # unpickling errors come in many types
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint ({_reason(e)})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else f"no {', '.join(missing)}"
        raise UnreadableCheckpoint(f"{path}: not an sdeflow checkpoint ({what})")
    return state


def _reason(error: Exception) -> str:
    """Why torch could not read a file, in a few words; never torch's advice to load unsafely."""
    text = str(error)
    if isinstance(error, EOFError) or not text.strip():
        return "empty or truncated file"
    if isinstance(error, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        return f"holds something other than tensors and plain containers: {detail}"
    first = text.strip().splitlines()[0].split(". ")[0]
    if "weights_only" in first:
        return type(error).__name__
    return f"{type(error).__name__}: {first}"[:200]
