"""Any folder tree (or .zip) of PNG and JPEG images as a data set of r×r RGB images with 256 levels.

Each image is turned upright (its EXIF orientation), converted to RGB, cropped to its centred square
and resized to ``resolution`` × ``resolution`` with ``resample`` (``box`` by default: the area average
Chrabaszcz et al. 2017 chose for downsampled ImageNet; a crop already of that size is kept as it is).

Split rule. The images are the files ending in .png, .jpg or .jpeg (any case) anywhere under ``root``,
sorted by their path below it (in a .zip whose members all sit in one top folder, below that folder).

- When ``root`` has a top-level folder named ``train``, the folders ``train/``, ``val/`` and ``test/``
  are the splits, and images anywhere else are ignored. Without ``val/``, val is a seeded hold-out of
  ``n_val`` images of ``train/``; without ``test/``, test is a seeded hold-out of ``n_test`` of them.
- Otherwise test is a seeded hold-out of ``n_test`` of all the images, and val a seeded hold-out of
  ``n_val`` of the rest (:func:`~sdeflow_builtin.datasets.hold_out_indices`, as for CIFAR-10); train is
  what remains, in path order.

Seeded hold-outs depend on ``split_seed`` and the number of images only, so adding images changes them.
Every image is converted once into a uint8 cache read through a memory map (:mod:`~sdeflow_builtin.imagecache`);
``augment`` (:mod:`~sdeflow_builtin.augment`) acts on the train split only, and FID's reference is every
train and val image, unaugmented.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from typing import Literal

import attrs
import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Subset

from sdeflow.plugin import DataBundle, DataError, require

from .augment import Augment, check_augment
from .datasets import check_n_val, hold_out_indices, image_transform
from .imagecache import CACHE_FOLDER, CacheWriter, cache_folders, decode_blocks, fingerprint, one_line, open_cache

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = ("train", "val", "test")
RESAMPLING = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


@attrs.frozen
class ImageFiles:
    """The images of a folder or a .zip: ``names`` relative to its root (sorted), ``members`` as stored."""

    root: str
    names: list[str]
    members: list[str]
    is_zip: bool

    def sources(self) -> list[str]:
        """The files a cache depends on."""
        return [self.root] if self.is_zip else [os.path.join(self.root, m) for m in self.members]

    def contents(self) -> Iterator[tuple[str, str | bytes]]:
        """(name, the image's path or, in a .zip, its bytes) for each image; the zip is read here, so that
        decoding threads never share it."""
        if not self.is_zip:
            yield from zip(self.names, self.sources())
            return
        with zipfile.ZipFile(self.root) as archive:
            for name, member in zip(self.names, self.members):
                yield name, archive.read(member)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _zip_members(path: str) -> tuple[list[str], list[str]]:
    with zipfile.ZipFile(path) as archive:
        members = sorted(m for m in archive.namelist()
                         if _is_image(m) and not m.endswith("/") and not m.startswith("__MACOSX/"))
    tops = {m.split("/", 1)[0] for m in members}
    strip = len(tops) == 1 and all("/" in m for m in members)
    return [m.split("/", 1)[1] if strip else m for m in members], members


def _folder_members(root: str) -> list[str]:
    names = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [s for s in subfolders if s != CACHE_FOLDER and not s.startswith(".")]
        names += [os.path.relpath(os.path.join(folder, f), root) for f in files if _is_image(f)]
    return sorted(n.replace(os.sep, "/") for n in names)


def list_images(root: str, label: str) -> ImageFiles:
    """The images under ``root`` (a folder or a .zip), sorted by path."""
    if os.path.isfile(root) and zipfile.is_zipfile(root):
        names, members = _zip_members(root)
        files = ImageFiles(root, names, members, is_zip=True)
    elif os.path.isdir(root):
        members = _folder_members(root)
        files = ImageFiles(root, members, members, is_zip=False)
    else:
        raise DataError(f"{label}: data.root {root} is neither a folder nor a .zip file")
    if not files.names:
        raise DataError(f"{label}: no PNG or JPEG files under {root}")
    return files


def only_split_folders(files: ImageFiles) -> ImageFiles:
    """Under the folder rule: the images inside train/, val/ and test/ only."""
    keep = [i for i, n in enumerate(files.names) if n.split("/", 1)[0] in SPLIT_FOLDERS and "/" in n]
    return attrs.evolve(files, names=[files.names[i] for i in keep], members=[files.members[i] for i in keep])


# ---------------------------------------------------------------------------------------------------
# Splits


def _held_out(name: str, pool: np.ndarray, n: int, key: str, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) entries of ``pool``: a seeded hold-out of ``n`` of them, named ``key`` in errors."""
    require(n < len(pool), key, f"must be less than the {len(pool)} images it is held out of, got {n}")
    if n == 0:
        return pool, pool[:0]
    kept, held = hold_out_indices(name, len(pool), n, split_seed)
    return pool[np.asarray(kept, dtype=np.int64)], pool[np.asarray(held, dtype=np.int64)]


def split_indices(names: Sequence[str], n_val: int, n_test: int, split_seed: int
                  ) -> tuple[dict[str, np.ndarray], str]:
    """({train, val, test}: indices into ``names``, the rule used), as the module docstring says."""
    top = np.array([n.split("/", 1)[0] for n in names])
    everything = np.arange(len(names), dtype=np.int64)
    if "train" in set(top.tolist()):
        splits = {s: everything[top == s] for s in SPLIT_FOLDERS}
        rule = "the folders train/, val/ and test/"
        if not len(splits["test"]):
            require(n_test > 0, "n_test", f"must be positive (there is no test/ folder), got {n_test}")
            splits["train"], splits["test"] = _held_out("image_folder-test", splits["train"], n_test, "n_test",
                                                        split_seed)
            rule += f" (no test/: a seeded hold-out of {n_test} train/ images)"
        if not len(splits["val"]):
            splits["train"], splits["val"] = _held_out("image_folder", splits["train"], n_val, "n_val", split_seed)
            rule += f" (no val/: a seeded hold-out of {n_val} train/ images)"
        return splits, rule
    require(n_test > 0, "n_test", f"must be positive (the test split is held out of the files), got {n_test}")
    rest, test = _held_out("image_folder-test", everything, n_test, "n_test", split_seed)
    train, val = _held_out("image_folder", rest, n_val, "n_val", split_seed)
    return {"train": train, "val": val, "test": test}, "seeded hold-outs of the files sorted by path"


# ---------------------------------------------------------------------------------------------------
# Converting


def square_image(content: str | bytes, resolution: int, resample: str) -> np.ndarray:
    """An image file (path or bytes) as uint8 (3, r, r): upright, RGB, centre square, resized."""
    with Image.open(content if isinstance(content, str) else io.BytesIO(content)) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), RESAMPLING[resample])
    return np.asarray(image).transpose(2, 0, 1)


def _writer(files: ImageFiles, resolution: int, resample: str, label: str):
    def decode(item: tuple[str, str | bytes]) -> np.ndarray:
        name, content = item
        try:
            return square_image(content, resolution, resample)
        except Exception as e:  # PIL raises many kinds for a bad file
            raise DataError(f"{label}: {name} is not a readable image ({one_line(e)})") from None

    def write(writer: CacheWriter) -> None:
        for block in decode_blocks(files.contents(), decode):
            writer.append(block)
    return write


def image_folder(
    root: str,
    resolution: int = 64,
    n_val: int = 1000,
    n_test: int = 1000,
    split_seed: int = 0,
    logit_alpha: float | None = 0.05,
    affine: bool = False,
    augment: tuple[str, ...] = (),
    resample: Literal["box", "bicubic", "lanczos"] = "box",
    cache_dir: str | None = None,
) -> DataBundle:
    """PNG and JPEG files under ``root`` (a folder or a .zip), centre-cropped and resized to
    ``resolution``; splits by the rule of the module docstring."""
    require(resolution > 0, "resolution", f"must be positive, got {resolution}")
    require(resample in RESAMPLING, "resample", f"expected one of {', '.join(RESAMPLING)}, got {resample!r}")
    check_n_val(n_val)
    require(n_test >= 0, "n_test", f"must be non-negative, got {n_test}")
    transform = image_transform(logit_alpha, affine)
    augment = check_augment(augment)
    root = os.path.abspath(os.path.expanduser(root))
    label = f"image_folder {root}"
    files = list_images(root, label)
    if "train" in {n.split("/", 1)[0] for n in files.names if "/" in n}:
        files = only_split_folders(files)
    splits, rule = split_indices(files.names, n_val, n_test, split_seed)
    stem = os.path.splitext(os.path.basename(root))[0] if files.is_zip else "image_folder"
    base = os.path.dirname(root) if files.is_zip else root
    images = open_cache(f"{stem}-{resolution}px-{resample}.npy", cache_folders(root, cache_dir),
                        {**fingerprint(files.sources(), base), "images": len(files.names)}, (3, resolution, resolution),
                        _writer(files, resolution, resample, label), label)
    train_view = images.with_transform(Augment(augment)) if augment else images
    val = Subset(images, splits["val"]) if len(splits["val"]) else None
    protocol = {"name": "image_folder", "root": root, "resolution": resolution,
                "resize": f"centre square crop, {resample} resize", "split_rule": rule, "files": len(files.names),
                "splits": {s: len(splits[s]) for s in SPLIT_FOLDERS}, "split_seed": split_seed,
                "augment": list(augment)}
    return DataBundle(Subset(train_view, splits["train"]), Subset(images, splits["test"]),
                      shape=(3, resolution, resolution), transform=transform, kind="image", train_shuffle=True,
                      val=val, reference=Subset(images, np.sort(np.concatenate([splits["train"], splits["val"]]))),
                      levels=256, protocol=protocol)


image_folder.shape = lambda resolution=64, **_: (3, resolution, resolution)  # known before reading (sdeflow check)
