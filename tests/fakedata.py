"""Tiny image data sets in their official on-disk formats, for tests that need image data.

MNIST is written as the four uncompressed IDX files torchvision reads from ``root/MNIST/raw/``; CIFAR-10
as the pickled batches of ``root/cifar-10-batches-py/``; downsampled ImageNet in both versions (the new
one's pickles or .npz files in the download's folders, ImageNet64's in its two parts; the old one's PNG
folders); a tree or .zip of PNG / JPEG files for ``image_folder``. Pixels are seeded random bytes,
returned so a test can check they come back unchanged. Usage::

    images = write_mnist(tmp_path, n_train=20, n_test=10)
    write_cifar10(tmp_path); use_fake_cifar10_checksums(monkeypatch, tmp_path)
    images = write_imagenet_new(tmp_path, resolution=64, n_train=30, n_test=5, npz=True)
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import numpy as np
from PIL import Image

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


# --- downsampled ImageNet ---------------------------------------------------------------------------

IMAGENET_BATCHES = range(1, 11)


def imagenet_train_folder(resolution: int, batch: int, npz: bool = False) -> str:
    """The folder a download unpacks ``train_data_batch_<batch>`` into (ImageNet64's comes in two parts)."""
    name = f"Imagenet{resolution}_train"
    if resolution == 64:
        name += "_part1" if batch <= 5 else "_part2"
    return name + ("_npz" if npz else "")


def _imagenet_file(path: Path, images: np.ndarray, labels: np.ndarray, npz: bool, mean: bool) -> None:
    # Rows are the 3r² bytes of one image: the red plane, then green, then blue, each in row order.
    rows = images.reshape(len(images), -1)
    if npz:
        np.savez(path.with_name(path.name + ".npz"), data=rows, labels=labels.astype(np.int64))
        return
    entry = {"data": rows, "labels": [int(v) for v in labels]}
    if mean:
        entry["mean"] = rows.mean(axis=0)
    _write_pickle(path, entry)


def write_imagenet_new(root: str | os.PathLike, resolution: int = 32, n_train: int = 20, n_test: int = 6,
                       seed: int = 0, npz: bool = False, batches: Iterable[int] = IMAGENET_BATCHES,
                       val: bool = True) -> FakeImages:
    """Chrabaszcz et al. 2017's layout: ``Imagenet{r}_train/train_data_batch_1..10`` (ImageNet64:
    ``Imagenet64_train_part1`` holds 1..5, ``_part2`` 6..10) and ``Imagenet{r}_val/val_data``, pickled
    dicts or, with ``npz``, ``.npz`` files in ``..._npz`` folders; labels 1..1000.

    The n_train images are split over the ten batches in order; only ``batches`` are written, and the
    returned train images are those written, in batch order.
    """
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, 3, resolution, resolution), dtype=np.uint8)
    train_labels = rng.integers(1, 1001, size=n_train)
    test = rng.integers(0, 256, size=(n_test, 3, resolution, resolution), dtype=np.uint8)
    test_labels = rng.integers(1, 1001, size=n_test)
    written = []
    for batch, part in zip(IMAGENET_BATCHES, np.array_split(np.arange(n_train), 10)):
        if batch in set(batches):
            folder = Path(root) / imagenet_train_folder(resolution, batch, npz)
            folder.mkdir(parents=True, exist_ok=True)
            _imagenet_file(folder / f"train_data_batch_{batch}", train[part], train_labels[part], npz, mean=True)
            written.append(part)
    if val:
        folder = Path(root) / (f"Imagenet{resolution}_val" + ("_npz" if npz else ""))
        folder.mkdir(parents=True, exist_ok=True)
        _imagenet_file(folder / "val_data", test, test_labels, npz, mean=False)
    kept = np.concatenate(written) if written else np.arange(0)
    return FakeImages(train[kept], train_labels[kept], test, test_labels)


def write_png(path: str | os.PathLike, image: np.ndarray, **save_args) -> None:
    """A (3, H, W) uint8 image as an RGB file (PNG, or JPEG by the suffix)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB").save(path, **save_args)


def write_imagenet_old(root: str | os.PathLike, resolution: int = 32, n_train: int = 20, n_test: int = 6,
                       seed: int = 0) -> FakeImages:
    """van den Oord et al. 2016's layout: ``train_{r}x{r}/`` and ``valid_{r}x{r}/`` of numbered PNG files
    (sorted by name = written order); this version has no labels (returned as zeros)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("valid", n_test)):
        images = rng.integers(0, 256, size=(n, 3, resolution, resolution), dtype=np.uint8)
        for i, image in enumerate(images):
            write_png(Path(root) / f"{split}_{resolution}x{resolution}" / f"{i + 1:07d}.png", image)
        splits[split] = images
    zeros = np.zeros(0, dtype=np.uint8)
    return FakeImages(splits["train"], zeros, splits["valid"], zeros)


# --- image folders ----------------------------------------------------------------------------------


def write_image_folder(root: str | os.PathLike, names: Sequence[str], resolution: int = 8, seed: int = 0,
                       zip_path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Random r×r RGB images at ``names`` (paths below ``root``, .png or .jpg), or as members of the
    .zip ``zip_path`` (``root`` unused then); returns each name's (3, r, r) uint8 image."""
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, size=(3, resolution, resolution), dtype=np.uint8) for name in names}
    if zip_path is None:
        for name, image in images.items():
            write_png(Path(root) / name, image)
        return images
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, image in images.items():
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0), mode="RGB").save(buffer, format=_format(name))
            archive.writestr(name, buffer.getvalue())
    return images


def _format(name: str) -> str:
    return "PNG" if name.lower().endswith(".png") else "JPEG"
