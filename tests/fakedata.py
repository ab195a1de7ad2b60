"""Tiny MNIST and CIFAR-10 folders in torchvision's own on-disk formats, for tests that need image data.

MNIST is written as the four uncompressed IDX files torchvision reads from ``root/MNIST/raw/``; CIFAR-10
as the pickled batches of ``root/cifar-10-batches-py/``. Pixels are seeded random bytes, returned so a
test can check they come back unchanged. Usage::

    images = write_mnist(tmp_path, n_train=20, n_test=10)
    write_cifar10(tmp_path); use_fake_cifar10_checksums(monkeypatch, tmp_path)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from pathlib import Path

import attrs
import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FOLDER = "cifar-10-batches-py"
IDX_UBYTE = 0x08


@attrs.frozen
class FakeImages:
    """What a writer put on disk: uint8 images (N, C, H, W) and integer labels (N,) per split."""

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


def _random_split(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes: magic 0x00 0x00 0x08 ndim, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(header + array.tobytes())


def write_mnist(root: str | os.PathLike, n_train: int = 20, n_test: int = 10, seed: int = 0) -> FakeImages:
    """Write ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; images are (N, 1, 28, 28)."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {"train": _random_split(rng, n_train, (1, 28, 28))}
    splits["t10k"] = _random_split(rng, n_test, (1, 28, 28))
    for prefix, (images, labels) in splits.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return FakeImages(*splits["train"], *splits["t10k"])


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    # Rows are the 3072 bytes of one image in channel-major order (1024 red, then green, then blue).
    return {
        "batch_label": name,
        "data": images.reshape(len(images), -1),
        "labels": [int(v) for v in labels],
        "filenames": [f"fake_{name}_{i}.png" for i in range(len(images))],
    }


def write_cifar10(root: str | os.PathLike, n_train: int = 10, n_test: int = 10, seed: int = 0) -> FakeImages:
    """Write ``root/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta); images (N, 3, 32, 32).

    The train images are split over the five batches in order. torchvision checks each file's md5
    against the real download's: see :func:`use_fake_cifar10_checksums`.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train, train_labels = _random_split(rng, n_train, (3, 32, 32))
    test, test_labels = _random_split(rng, n_test, (3, 32, 32))
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        batch = _cifar_batch(train[part], train_labels[part], f"training batch {i} of 5")
        _write_pickle(folder / f"data_batch_{i}", batch)
    _write_pickle(folder / "test_batch", _cifar_batch(test, test_labels, "testing batch 1 of 1"))
    _write_pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_vis": 3072})
    return FakeImages(train, train_labels, test, test_labels)


def md5(path: str | os.PathLike) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def use_fake_cifar10_checksums(monkeypatch, root: str | os.PathLike) -> None:
    """Point torchvision's CIFAR10 checksum table at the md5s of the fake files under ``root``.

    torchvision's CIFAR10 refuses any batch whose md5 differs from the real download's, so fake files
    can only be read if the table changes. Patching the table (not the check) keeps the real class and
    its integrity check in play: a fake file changed after this call is still refused.
    """
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10_FOLDER
    for table in ("train_list", "test_list"):
        entries = [[name, md5(folder / name)] for name, _ in getattr(CIFAR10, table)]
        monkeypatch.setattr(CIFAR10, table, entries)
    meta = dict(CIFAR10.meta, md5=md5(folder / CIFAR10.meta["filename"]))
    monkeypatch.setattr(CIFAR10, "meta", meta)
