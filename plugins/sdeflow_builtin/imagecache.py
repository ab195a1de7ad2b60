"""A converted copy of an image data set on disk (a memory-mappable .npy), never held in RAM whole.

Files in a data set's own format (pickles, .npz, PNG or JPEG folders, a .zip) are converted once into
one uint8 array of shape (N, C, H, W), stored as a ``.npy`` file with a JSON record beside it (``.json``:
the array's shape, a fingerprint of the source files, that is their names relative to the data's root,
sizes and modification times, and a checksum of a few rows). Later runs check the record against the
source files and the array file, and rebuild a cache that is stale, truncated or corrupt with one
printed line; nothing in a bad cache can crash a run.

Where: ``sdeflow-cache/`` beside the data (inside the data folder, or beside a .zip) when that folder
can be written; otherwise ``$XDG_CACHE_HOME/sdeflow/images/<name>-<hash of the path>/`` (default
``~/.cache``); ``cache_dir`` names a folder instead. A fresh cache in a read-only data folder (built by
someone who could write there) is used as it is. Writes are atomic (a temporary file, then ``os.replace``;
the old record is removed first, so a crash leaves no record rather than a wrong one), and a lock file
makes concurrent builders (DDP ranks, array jobs) wait for the first instead of racing it.

:class:`MemmapImages` reads the array as float tensors k/255 of shape C×H×W, bit for bit what
torchvision's ``ToTensor`` gives for the same bytes. It opens its file lazily in each process, so it
pickles to DataLoader workers as a path, and it reads each image with ``preadv`` (a copy out of the page
cache) rather than through the map, so a worker's resident size stays a few batches whatever the size
of the file (measured: benchmarks/data_loading.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sdeflow.plugin import DataError

CACHE_FOLDER = "sdeflow-cache"
"""The cache's folder beside the data; data-set walkers skip it."""

RECORD_FORMAT = 1
"""Bumped when the record or the array layout changes: every older cache is then rebuilt."""

LISTED_FILES = 64
"""Sources with at most this many files are listed by name in the record (more: counted and hashed)."""

PROBE_ROWS = 17
"""Evenly spaced rows whose checksum the record keeps (the first and last among them)."""


def say(message: str) -> None:
    print(f"sdeflow: {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------
# Where a cache lives and what it was built from


def cache_folders(data_path: str, cache_dir: str | None) -> list[str]:
    """Folders to look in, in order; a cache is built in the first one that can be written."""
    if cache_dir is not None:
        return [os.path.abspath(os.path.expanduser(cache_dir))]
    data_path = os.path.abspath(data_path)
    folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha1(data_path.encode()).hexdigest()[:12]
    fallback = os.path.join(base, "sdeflow", "images", f"{os.path.basename(data_path)}-{key}")
    return [os.path.join(folder, CACHE_FOLDER), fallback]


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def fingerprint(paths: Sequence[str], root: str) -> dict[str, Any]:
    """Names (relative to ``root``), sizes and modification times of ``paths``, as a count and a hash."""
    digest = hashlib.sha1()
    total = 0
    names = []
    prefix = os.path.join(root, "")
    for path in paths:
        stat = os.stat(path)
        # relpath costs 20 µs a file: 25 s for the old version's 1.3 million, on every run
        name = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        total += stat.st_size
        names.append(name)
    out: dict[str, Any] = {"files": len(paths), "bytes": total, "sha1": digest.hexdigest()}
    if len(paths) <= LISTED_FILES:
        out["names"] = names
    return out


# ---------------------------------------------------------------------------------------------------
# Writing


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class CacheWriter:
    """Appends uint8 blocks (k, *item_shape) to a ``.npy`` file whose length is known only at the end.

    numpy pads a header so that the first dimension can grow to 21 digits in place, so the header
    written first (length 0) is rewritten with the final length without moving the data.
    """

    def __init__(self, path: str, item_shape: tuple[int, ...]):
        self.item_shape = tuple(item_shape)
        self.count = 0
        self.file = open(path, "wb")  # closed by close(), or by _build after an error
        self.file.write(_npy_header((0, *self.item_shape)))

    def append(self, block: np.ndarray) -> None:
        if block.shape[1:] != self.item_shape:
            raise ValueError(f"block of shape {block.shape} for items of shape {self.item_shape}")
        self.file.write(memoryview(np.ascontiguousarray(block, dtype=np.uint8)).cast("B"))
        self.count += len(block)

    def close(self) -> None:
        header = _npy_header((self.count, *self.item_shape))
        if len(header) != len(_npy_header((0, *self.item_shape))):
            raise ValueError("the .npy header changed length")
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _probe(images: np.ndarray) -> str:
    """A CRC-32 of a few evenly spaced rows and of the shape."""
    crc = zlib.crc32(repr(tuple(images.shape)).encode())
    if len(images):
        for row in np.unique(np.linspace(0, len(images) - 1, PROBE_ROWS).astype(np.int64)):
            crc = zlib.crc32(np.ascontiguousarray(images[row]).tobytes(), crc)
    return f"{crc:08x}"


def _record_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _write_json_atomic(path: str, value: dict[str, Any]) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        _remove(temporary)


def _build(path: str, source: dict[str, Any], item_shape: tuple[int, ...],
           write: Callable[[CacheWriter], None], label: str) -> None:
    """Convert the source into ``path`` (and its record), atomically."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        writer = CacheWriter(temporary, item_shape)
        try:
            write(writer)
            writer.close()
        finally:
            writer.file.close()  # after an error in write(); a no-op after close()
        images = np.load(temporary, mmap_mode="r")
        record = {"format": RECORD_FORMAT, "what": label, "shape": list(images.shape),
                  "probe": _probe(images), "source": source}
        del images
        _remove(_record_path(path))  # first: a crash below leaves no record, never a wrong one
        os.replace(temporary, path)
        _write_json_atomic(_record_path(path), record)
    except OSError as e:
        raise DataError(f"{label}: could not write the image cache {path} ({one_line(e)}); "
                        "free some space or set data.cache_dir") from None
    finally:
        _remove(temporary)


# ---------------------------------------------------------------------------------------------------
# Checking and opening


def stale_reason(path: str, source: dict[str, Any], item_shape: tuple[int, ...]) -> str | None:
    """Why the cache at ``path`` cannot be used for ``source``, or None when it is fresh."""
    if not os.path.exists(path) and not os.path.exists(_record_path(path)):
        return "missing"
    try:
        with open(_record_path(path)) as f:
            record = json.load(f)
        shape, probe, built_from = record["shape"], record["probe"], record["source"]
        same_format = record["format"] == RECORD_FORMAT
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its record is missing or unreadable ({one_line(e, 80)})"
    if not same_format:
        return "it was written by another version of sdeflow"
    if built_from != source:
        return f"its source files changed ({_describe_change(built_from, source)})"
    try:
        images = np.load(path, mmap_mode="r")
    except Exception as e:  # a truncated or overwritten file: numpy raises several kinds
        return f"it is unreadable ({one_line(e, 80)})"
    if images.dtype != np.uint8 or list(images.shape) != shape or tuple(images.shape[1:]) != tuple(item_shape):
        return f"its shape {tuple(images.shape)} is not the {tuple(shape)} its record gives"
    if os.path.getsize(path) != images.offset + images.nbytes:
        return "its size is not what its header says"
    if _probe(images) != probe:
        return "its contents do not match its record"
    return None


def _describe_change(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict) or "files" not in old:
        return "unknown before"
    if old["files"] != new["files"]:
        return f"{old['files']:,} → {new['files']:,} files"
    if old.get("bytes") != new["bytes"]:
        return f"{old.get('bytes', 0):,} → {new['bytes']:,} bytes"
    return "a file's name or modification time"


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path``.lock (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builders may race, and the last os.replace wins
        yield
        return
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_cache(name: str, folders: Sequence[str], source: dict[str, Any], item_shape: tuple[int, ...],
               write: Callable[[CacheWriter], None], label: str) -> MemmapImages:
    """The cached images ``name`` (a file name) for ``source``, converted by ``write`` when no folder
    holds a fresh copy; building prints one line."""
    for folder in folders:
        if stale_reason(os.path.join(folder, name), source, item_shape) is None:
            return MemmapImages(os.path.join(folder, name))
    writable = next((f for f in folders if _writable(f)), None)
    if writable is None:
        raise DataError(f"{label}: no folder to write the image cache in ({', '.join(folders)}); "
                        "set data.cache_dir to a writable folder")
    path = os.path.join(writable, name)
    with _locked(path):
        reason = stale_reason(path, source, item_shape)  # another process may have built it meanwhile
        if reason is not None:
            files = f"{source['files']:,} source file{'s' if source['files'] != 1 else ''}"
            if reason == "missing":
                say(f"{label}: converting {files} into the image cache {path} (once)")
            else:
                say(f"{label}: the image cache {path} is stale ({reason}); rebuilding it from {files}")
            _build(path, source, item_shape, write, label)
    return MemmapImages(path)


# ---------------------------------------------------------------------------------------------------
# Reading


def to_unit(images: np.ndarray) -> Tensor:
    """uint8 k → float32 k/255 of a writable array, as ToTensor computes it (a division: bit-identical)."""
    return torch.from_numpy(images).to(torch.get_default_dtype()).div_(255)  # in place: twice as fast


class MemmapImages(Dataset):
    """The images of a cache file as float tensors k/255 of shape C×H×W.

    ``images`` is the file as an np.memmap, opened on first use in each process (a pickled copy carries
    only the path). Items are read with ``os.preadv`` (where the OS has it; else through the map): a
    mapped read maps the pages around it into the reader (a whole large folio, up to 2 MB, on Linux
    6.x), so an epoch of random reads through the map makes each worker's resident size approach the
    size of the file, while preadv copies just the image out of the page cache. ``transform`` (an
    augmentation) is applied to each tensor.
    """

    def __init__(self, path: str, transform: Callable[[Tensor], Tensor] | None = None):
        self.path = path
        self.transform = transform
        self._images: np.memmap | None = None
        self._fd: int | None = None
        self.shape = tuple(self.images.shape)
        self.offset = int(self.images.offset)
        self.item_bytes = int(np.prod(self.shape[1:]))

    @property
    def images(self) -> np.memmap:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_fd": None}

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def with_transform(self, transform: Callable[[Tensor], Tensor] | None) -> MemmapImages:
        """The same file under another ``transform`` (the augmented train view of unaugmented data)."""
        other = MemmapImages.__new__(MemmapImages)
        other.__dict__.update(self.__getstate__(), transform=transform)
        return other

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and not (0 <= rows.min() and rows.max() < len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return rows

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """The images at ``rows`` as a uint8 array, read in file order (one preadv each)."""
        block = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        order = np.argsort(rows, kind="stable")
        if not hasattr(os, "preadv"):
            block[order] = self.images[rows[order]]
            return block
        if self._fd is None:  # a forked worker may share its parent's: preadv has no file position
            self._fd = os.open(self.path, os.O_RDONLY)
        flat, size = memoryview(block).cast("B"), self.item_bytes
        for position, row in zip(order.tolist(), rows[order].tolist()):
            got = os.preadv(self._fd, [flat[position * size:(position + 1) * size]], self.offset + row * size)
            if got != size:
                raise DataError(f"the image cache {self.path} became shorter while in use; run again to rebuild it")
        return block

    def _apply(self, x: Tensor) -> Tensor:
        return x if self.transform is None else self.transform(x)

    def __getitem__(self, index: int) -> Tensor:
        return self._apply(to_unit(self._read(self._rows([int(index)])))[0])

    def __getitems__(self, indices: Sequence[int]) -> list[Tensor]:
        """A batch (what the DataLoader asks a worker for), read in file order, returned in the order asked.

        Each image becomes its own float tensor: views of one batch tensor measured +800 MB of heap per
        DataLoader worker (glibc keeps the freed batch-sized blocks), separate tensors none.
        """
        return [self._apply(to_unit(image)) for image in self._read(self._rows(indices))]


# ---------------------------------------------------------------------------------------------------
# Decoding image files into blocks


def decode_blocks(items: Iterable[Any], decode: Callable[[Any], np.ndarray], chunk: int = 1024,
                  threads: int | None = None) -> Iterator[np.ndarray]:
    """uint8 blocks (≤ ``chunk``, C, H, W) of ``decode(item)`` for each item, in order, decoded by a
    thread pool (PIL releases the GIL while it decodes and resizes)."""
    threads = threads or min(8, os.cpu_count() or 1)
    batch: list[Any] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for item in items:
            batch.append(item)
            if len(batch) == chunk:
                yield np.stack(list(pool.map(decode, batch)))
                batch = []
        if batch:
            yield np.stack(list(pool.map(decode, batch)))
