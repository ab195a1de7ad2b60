"""Downsampled ImageNet at 32×32 and 64×64, in the two versions the likelihood literature reports on.

``version`` is required, because the two are different data sets whose bits per dimension are not
comparable (the new one is anti-aliased and easier to model: i-DODE's ImageNet32 is 3.43 bpd on the new
version and 3.69 on the old):

- ``new``: Chrabaszcz, Loshchilov & Hutter 2017, "A downsampled variant of ImageNet", the files
  image-net.org/download-images offers today (``Imagenet32_train.zip``, ``Imagenet32_val.zip``;
  ``Imagenet64_train_part1.zip``, ``..._part2.zip``, ``Imagenet64_val.zip``; and their ``_npz``
  variants). Training files ``train_data_batch_1`` … ``_10`` and the validation file ``val_data``,
  each a pickled dict (or an .npz) whose ``data`` is uint8 N × 3r² with the red plane, then green, then
  blue of each image in row order (so ``reshape(N, 3, r, r)`` is C×H×W). 1,281,167 training and 50,000
  validation images at either resolution. Flow Matching and i-DODE's "new" numbers use it.
- ``old``: van den Oord, Kalchbrenner & Kavukcuoglu 2016 (PixelRNN), once at image-net.org/small:
  folders ``train_32x32/`` and ``valid_32x32/`` (``_64x64``) of PNG files, 1,281,149 training and
  49,999 validation images. TFDS's ``downsampled_imagenet`` is this version: VDM, score_sde and
  i-DODE's "old" numbers use it.

The files are found by name anywhere under ``root`` (its subfolders are searched; where both
resolutions are there, the one whose folder names carry ``32`` or ``64`` is taken; where a batch is
there both pickled and as .npz, the .npz, which converts with less memory). Their numbers are checked
against the known sizes: the other version, a partial download or a missing part (ImageNet64's
training files come in two parts) is a one-line DataError, unless ``allow_partial`` accepts a subset (a
lab's slice, a test's tiny files), which the protocol then records.

Splits: test is the official validation files; val a seeded hold-out of ``n_val`` training images
(:func:`~sdeflow_builtin.datasets.hold_out_indices`, as for CIFAR-10); train the rest, in file order.
The training and the validation files are converted once into uint8 ``.npy`` caches
(:mod:`~sdeflow_builtin.imagecache`: where they live, when they are rebuilt, how they are read).
Converting loads one pickled file at a time (ImageNet64's hold 1.6 GB each: the process peaks near
2.1 GB) and streams .npz files in blocks of 4,096 images (about 0.65 GB); after that a training
process holds about 0.6 GB and each DataLoader worker about 0.45 GB (benchmarks/data_loading.py).
``augment`` (:mod:`~sdeflow_builtin.augment`) acts on the train split only; none by default, as in
VDM's and i-DODE's ImageNet runs. The model space is CIFAR-10's (``logit_alpha``, ``affine``).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import attrs
import numpy as np
from PIL import Image

from sdeflow.plugin import DataBundle, DataError, require

from .augment import Augment, check_augment
from .datasets import check_n_val, hold_out_split, image_transform
from .imagecache import CACHE_FOLDER, CacheWriter, cache_folders, decode_blocks, fingerprint, one_line, open_cache

VERSIONS = {
    "new": "Chrabaszcz et al. 2017 (image-net.org's downsampled ImageNet: train_data_batch_1..10, val_data)",
    "old": "van den Oord et al. 2016 (PixelRNN: train_RxR/ and valid_RxR/ PNG folders)",
}
"""What each ``version`` is."""

OFFICIAL_SIZES = {"new": (1_281_167, 50_000), "old": (1_281_149, 49_999)}
"""(training, validation) images of each version, the same at 32×32 and 64×64."""

BATCHES = range(1, 11)
"""The new version's training files are train_data_batch_1 … _10."""

PARTS_64 = {"Imagenet64_train_part1": range(1, 6), "Imagenet64_train_part2": range(6, 11)}
"""ImageNet64's new training files come as two downloads."""

ROWS_PER_BLOCK = 4096
"""Rows read from an .npz at a time while converting."""

_BATCH = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_VAL = re.compile(r"^val_data(\.npz)?$")
_PNG_FOLDER = re.compile(r"^(train|valid)_(\d+)x\2$")
_ARCHIVE = re.compile(r"^(Imagenet(32|64)_\w+\.zip|(train|valid)_(32|64)x(32|64)\.tar)$")


@attrs.define
class Found:
    """Every file and folder under a root whose name one of the versions uses."""

    batches: dict[int, list[str]] = attrs.Factory(dict)
    val: list[str] = attrs.Factory(list)
    folders: dict[str, list[str]] = attrs.Factory(dict)
    archives: list[str] = attrs.Factory(list)


def find(root: str) -> Found:
    """Walk ``root`` (not into PNG folders, the cache or hidden folders) for the versions' names."""
    found = Found()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        for name in list(subfolders):
            if _PNG_FOLDER.match(name):
                found.folders.setdefault(name, []).append(os.path.join(folder, name))
            if _PNG_FOLDER.match(name) or name == CACHE_FOLDER or name.startswith("."):
                subfolders.remove(name)
        for name in files:
            path = os.path.join(folder, name)
            if match := _BATCH.match(name):
                found.batches.setdefault(int(match.group(1)), []).append(path)
            elif _VAL.match(name):
                found.val.append(path)
            elif _ARCHIVE.match(name):
                found.archives.append(path)
    return found


# ---------------------------------------------------------------------------------------------------
# Which files: the new version


def _resolution_hint(path: str, root: str) -> int | None:
    """32 or 64 when the path below ``root`` names one of them (Imagenet32_train/...), else None."""
    hints = {int(h) for h in re.findall(r"(?<!\d)(32|64)(?!\d)", os.path.relpath(path, root))}
    return hints.pop() if len(hints) == 1 else None


def _pick(paths: list[str], res: int, root: str, label: str) -> str | None:
    """The one file of ``paths`` for resolution ``res`` (its folder's hint, then .npz over pickle)."""
    fitting = [p for p in paths if _resolution_hint(p, root) in (res, None)]
    if not fitting:
        return None
    rank = {p: (_resolution_hint(p, root) == res, p.endswith(".npz")) for p in fitting}
    best = max(rank.values())
    chosen = [p for p in fitting if rank[p] == best]
    if len(chosen) > 1:
        raise DataError(f"{label}: {os.path.basename(chosen[0])} is under {root} more than once "
                        f"({', '.join(os.path.relpath(p, root) for p in chosen)}); point data.root at one copy")
    return chosen[0]


def _numbers(values: Sequence[int]) -> str:
    """[1, 2, 3, 7] → '1..3, 7'."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _downloads(res: int) -> str:
    files = [f"{p}.zip" for p in PARTS_64] if res == 64 else [f"Imagenet{res}_train.zip"]
    files.append(f"Imagenet{res}_val.zip")
    return f"{', '.join(files[:-1])} and {files[-1]} (or their _npz variants) from image-net.org/download-images"


def _missing_batches(missing: list[int], present: list[int], res: int, root: str, label: str) -> str:
    if res == 64:
        for part, numbers in PARTS_64.items():
            if set(numbers) == set(missing):
                return (f"{label}: found train_data_batch_{_numbers(present)} but not train_data_batch_"
                        f"{_numbers(missing)}, the part {part}(_npz).zip: unpack it under {root} too, "
                        "or set data.allow_partial: true to train on a subset")
    return (f"{label}: train_data_batch_{_numbers(missing)} missing under {root} (found "
            f"{_numbers(present)} of 1..10): unpack {_downloads(res)}, or set data.allow_partial: true")


def new_files(found: Found, res: int, root: str, allow_partial: bool, label: str) -> tuple[list[str], str]:
    """(training files in batch order, the validation file) of the new version."""
    batches = {i: _pick(found.batches[i], res, root, label) for i in BATCHES if i in found.batches}
    batches = {i: p for i, p in batches.items() if p is not None}
    val = _pick(found.val, res, root, label)
    if not batches and val is None:
        raise DataError(_not_found("new", res, root, found, label))
    missing = [i for i in BATCHES if i not in batches]
    if not batches or (missing and not allow_partial):
        raise DataError(_missing_batches(missing, sorted(batches), res, root, label))
    if val is None:
        raise DataError(f"{label}: val_data (from Imagenet{res}_val.zip), the test split, is not under {root}")
    return [batches[i] for i in sorted(batches)], val


# ---------------------------------------------------------------------------------------------------
# Which files: the old version


def _png_files(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.name.endswith(".png") and e.is_file())


def old_files(found: Found, res: int, root: str, label: str) -> tuple[list[str], list[str]]:
    """(training PNG files, validation PNG files) of the old version, each sorted by name."""
    folders = {}
    for split in ("train", "valid"):
        name = f"{split}_{res}x{res}"
        paths = found.folders.get(name, [])
        if len(paths) > 1:
            raise DataError(f"{label}: {name}/ is under {root} more than once "
                            f"({', '.join(os.path.relpath(p, root) for p in paths)}); point data.root at one copy")
        folders[split] = paths[0] if paths else None
    if folders["train"] is None or folders["valid"] is None:
        raise DataError(_not_found("old", res, root, found, label))
    return _png_files(folders["train"]), _png_files(folders["valid"])


def _not_found(version: str, res: int, root: str, found: Found, label: str) -> str:
    """Nothing of ``version`` under root: say what is expected, and what is there instead."""
    if version == "new":
        text = f"{label} not found under {root}: expected train_data_batch_1..10 and val_data, from {_downloads(res)}"
        if f"train_{res}x{res}" in found.folders or f"valid_{res}x{res}" in found.folders:
            return (f"{label} not found under {root}, but train_{res}x{res}/ and valid_{res}x{res}/ are there: "
                    "PNG folders are the old version (van den Oord et al. 2016); set data.version: old")
        others = {_resolution_hint(p, root) for p in [*found.val, *sum(found.batches.values(), [])]} - {res, None}
        if others:
            text += f"; the files there are ImageNet{others.pop()}'s"
    else:
        text = (f"{label} not found under {root}: expected folders train_{res}x{res}/ and valid_{res}x{res}/ "
                f"of PNG files (van den Oord et al. 2016's train_{res}x{res}.tar and valid_{res}x{res}.tar, unpacked)")
        if found.batches or found.val:
            return (f"{label} not found under {root}, but train_data_batch_* / val_data files are there: they are "
                    "the new version (Chrabaszcz et al. 2017); set data.version: new")
    if found.archives:
        text += f"; {', '.join(os.path.basename(p) for p in found.archives[:3])} must be unpacked first"
    return text


# ---------------------------------------------------------------------------------------------------
# Converting


def _rows(data: Any, res: int, path: str, label: str) -> np.ndarray:
    """The N × 3r² uint8 rows of a batch as (N, 3, r, r); another width names the other resolution."""
    data = np.asarray(data)
    width = int(np.prod(data.shape[1:])) if data.ndim >= 2 else -1
    if width != 3 * res * res:
        side = {3 * s * s: s for s in (8, 16, 32, 64)}.get(width)
        holds = f"{side}×{side} images" if side else f"rows of shape {data.shape[1:]}"
        raise DataError(f"{label}: {path} holds {holds}, not {res}×{res}: point data.root at ImageNet{res}'s files")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, res, res)


def _npz_blocks(path: str, res: int, label: str) -> Iterator[np.ndarray]:
    """The ``data`` member of an .npz, streamed ROWS_PER_BLOCK rows at a time (never whole in memory)."""
    with zipfile.ZipFile(path) as archive, archive.open("data.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or dtype != np.uint8 or len(shape) < 2:
            raise DataError(f"{label}: {path} holds {dtype} data of shape {shape}, not uint8 rows")
        _rows(np.empty((0, *shape[1:]), np.uint8), res, path, label)  # the width check alone
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], ROWS_PER_BLOCK):
            count = min(ROWS_PER_BLOCK, shape[0] - start)
            chunk = f.read(count * row)
            if len(chunk) != count * row:
                raise DataError(f"{label}: {path} is truncated; download and unpack it again")
            yield np.frombuffer(chunk, np.uint8).reshape(count, 3, res, res)


def _pickle_block(path: str, res: int, label: str) -> np.ndarray:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # latin1: also reads files pickled by Python 2
    return _rows(entry["data"], res, path, label)


def batch_blocks(path: str, res: int, label: str) -> Iterator[np.ndarray]:
    """The images of one new-version file as uint8 (k, 3, r, r) blocks; unreadable: a DataError."""
    try:
        if path.endswith(".npz"):
            yield from _npz_blocks(path, res, label)
        else:
            yield _pickle_block(path, res, label)
    except DataError:
        raise
    except Exception as e:  # pickle, zip, key and value errors alike: the file is bad
        raise DataError(f"{label}: {path} is unreadable ({one_line(e)}); download and unpack it again") from None


def decode_png(path: str, res: int, label: str) -> np.ndarray:
    """One old-version PNG as uint8 (3, r, r)."""
    try:
        with Image.open(path) as image:
            size = image.size
            pixels = np.asarray(image.convert("RGB"))
    except Exception as e:
        raise DataError(f"{label}: {path} is not a readable PNG ({one_line(e)})") from None
    if size != (res, res):
        raise DataError(f"{label}: {path} is {size[0]}×{size[1]}, not {res}×{res}")
    return pixels.transpose(2, 0, 1)


def _writer_of_batches(paths: Sequence[str], res: int, label: str):
    def write(writer: CacheWriter) -> None:
        for path in paths:
            for block in batch_blocks(path, res, label):
                writer.append(block)
                del block  # a whole pickled file: gone before the next one loads
    return write


def _writer_of_pngs(paths: Sequence[str], res: int, label: str):
    def write(writer: CacheWriter) -> None:
        for block in decode_blocks(paths, lambda p: decode_png(p, res, label)):
            writer.append(block)
    return write


# ---------------------------------------------------------------------------------------------------
# Sizes and the factories


def check_sizes(version: str, n_train: int, n_test: int, allow_partial: bool, label: str, root: str) -> bool:
    """Whether the set is partial; a DataError when it is the other version's or a partial one unasked."""
    expected = OFFICIAL_SIZES[version]
    if (n_train, n_test) == expected:
        return False
    other = "old" if version == "new" else "new"
    if n_test == OFFICIAL_SIZES[other][1] or n_train == OFFICIAL_SIZES[other][0]:
        n, what = (n_test, "validation") if n_test == OFFICIAL_SIZES[other][1] else (n_train, "training")
        raise DataError(f"{label} under {root}: {n:,} {what} images: that is the {other} version "
                        f"({VERSIONS[other].split(' (')[0]}); set data.version: {other}")
    if allow_partial and n_train <= expected[0] and n_test <= expected[1]:
        return True
    raise DataError(f"{label} under {root}: found {n_train:,} training and {n_test:,} validation images, "
                    f"expected {expected[0]:,} and {expected[1]:,}; a partial set? set data.allow_partial: true "
                    "to use it as it is")


def _version_required(version: str | None) -> None:
    require(version is not None, "version",
            "required: new (Chrabaszcz et al. 2017, image-net.org's pickles or .npz) or old (van den Oord et "
            "al. 2016, PNG folders); their bits per dimension are not comparable")
    require(version in VERSIONS, "version", f"expected new or old, got {version!r}")


def _sources(version: str, res: int, root: str, allow_partial: bool, label: str
             ) -> tuple[list[str], list[str], str]:
    """(training files, test files, their format) of ``version`` under ``root``."""
    found = find(root)
    if version == "new":
        train, val = new_files(found, res, root, allow_partial, label)
        return train, [val], "npz" if all(p.endswith(".npz") for p in [*train, val]) else "pickle"
    train, test = old_files(found, res, root, label)
    check_sizes(version, len(train), len(test), allow_partial, label, root)  # before decoding 1.3M files
    return train, test, "png"


def downsampled_imagenet(res: int, version: str | None, root: str, logit_alpha: float | None, affine: bool,
                         n_val: int, split_seed: int, augment: Sequence[str], allow_partial: bool,
                         cache_dir: str | None) -> DataBundle:
    """ImageNet at ``res``×``res`` (see the module docstring)."""
    _version_required(version)
    transform = image_transform(logit_alpha, affine)
    augment = check_augment(augment)
    check_n_val(n_val)
    root = os.path.abspath(os.path.expanduser(root))
    label = f"ImageNet{res} ({version})"
    if not os.path.isdir(root):
        raise DataError(f"{label}: data.root {root} is not a folder")
    train_files, test_files, file_format = _sources(version, res, root, allow_partial, label)
    folders = cache_folders(root, cache_dir)
    item = (3, res, res)
    write = _writer_of_batches if version == "new" else _writer_of_pngs
    caches = {split: open_cache(f"imagenet{res}-{version}-{split}.npy", folders, fingerprint(files, root), item,
                                write(files, res, label), f"{label} {split}")
              for split, files in (("train", train_files), ("test", test_files))}
    partial = check_sizes(version, len(caches["train"]), len(caches["test"]), allow_partial, label, root)
    reference = caches["train"]
    train, val = hold_out_split(f"imagenet{res}", reference, n_val, split_seed,
                                reference.with_transform(Augment(augment)) if augment else reference)
    protocol = {"name": f"imagenet{res}", "version": version, "source": VERSIONS[version], "files": file_format,
                "partial": partial, "official_sizes": dict(zip(("train", "test"), OFFICIAL_SIZES[version])),
                "splits": {"train": len(train), "val": len(val) if val is not None else 0,
                           "test": len(caches["test"])},
                "val": f"seeded hold-out of the training files (split_seed {split_seed})",
                "test": "the official validation files", "augment": list(augment)}
    return DataBundle(train, caches["test"], shape=item, transform=transform, kind="image", train_shuffle=True,
                      val=val, reference=reference, levels=256, protocol=protocol)


def imagenet32(
    version: Literal["new", "old"] | None = None,
    root: str = "data",
    logit_alpha: float | None = 0.05,
    affine: bool = False,
    n_val: int = 10000,
    split_seed: int = 0,
    augment: tuple[str, ...] = (),
    allow_partial: bool = False,
    cache_dir: str | None = None,
) -> DataBundle:
    """Downsampled ImageNet 32×32 (module docstring); ``version`` (new | old) is required."""
    return downsampled_imagenet(32, version, root, logit_alpha, affine, n_val, split_seed, augment,
                                allow_partial, cache_dir)


def imagenet64(
    version: Literal["new", "old"] | None = None,
    root: str = "data",
    logit_alpha: float | None = 0.05,
    affine: bool = False,
    n_val: int = 10000,
    split_seed: int = 0,
    augment: tuple[str, ...] = (),
    allow_partial: bool = False,
    cache_dir: str | None = None,
) -> DataBundle:
    """Downsampled ImageNet 64×64 (module docstring); ``version`` (new | old) is required."""
    return downsampled_imagenet(64, version, root, logit_alpha, affine, n_val, split_seed, augment,
                                allow_partial, cache_dir)


def _shape(resolution: int):
    def shape(version: str | None = None, **_: object) -> tuple[int, int, int]:
        """The images' shape, known without reading them (``sdeflow check`` builds the network with it)."""
        _version_required(version)
        return (3, resolution, resolution)

    return shape


imagenet32.shape = _shape(32)
imagenet64.shape = _shape(64)
