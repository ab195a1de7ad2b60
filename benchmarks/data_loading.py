"""Downsampled ImageNet from its official layouts: converting to the memory-mapped cache once, then
images per second through the training DataLoader and the peak memory of the processes doing it.

    python benchmarks/data_loading.py                              # 5,000 images of 64×64 in each layout
    python benchmarks/data_loading.py --images 200000 --layouts pickle npz
    python benchmarks/data_loading.py --imagenet64                 # 1,281,167 images: ≈16 GB a layout + its cache
    python benchmarks/data_loading.py --sparse-full                # also: a full-size index over a sparse cache

For each layout (``pickle`` and ``npz``: the new version's train_data_batch files, as many images in
each as the real ones hold, 128,117; ``png``: the old version's folder of PNG files) the script writes a
synthetic set of random pixels, then, each in a fresh process so that its peak memory is its own:

- convert: ``imagenet64(version=..., allow_partial=True)`` builds the caches (one line printed);
  images/s and the process's peak RSS;
- load: opens the data set again (the caches are fresh: the time is the check against the source
  files) and draws ``--batches`` training batches of ``--batch-size`` through ``sdeflow.core.batches.train_batches``
  with ``--workers`` DataLoader workers, as the trainer does. Reported: images/s from the first batch
  on; the peak RSS of the main process (VmHWM) and of the largest worker (``getrusage``: each counts
  the shared libraries and the pages it shares with the main process after the fork) and the peak of
  the summed PSS of all of them (sampled from /proc every 0.2 s: shared pages divided among their users,
  so the sum is what the group really holds).

The cache file was just written, so it is read from the page cache: a cold disk serves random 12 KB
reads at its own speed. ``--sparse-full`` adds a row whose train split indexes an ImageNet64-sized
cache (1,281,167 images) held in a sparse file: no data on disk, the reads are of zeros, but every
array whose size grows with the data set (the split's indices, the hold-out permutation) is full size.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGENET64_TRAIN = 1_281_167
IMAGES_PER_BATCH_FILE = -(-IMAGENET64_TRAIN // 10)
"""The real train_data_batch files hold 1/10 of the training set each."""


# --------------------------------------------------------------------------------------------------
# Synthetic sets in the official layouts


def random_block(rng: np.random.Generator, n: int, res: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * res * res), dtype=np.uint8)


def write_new(root: Path, n: int, n_test: int, res: int, npz: bool) -> None:
    """train_data_batch_1.. (128,117 images each, as the real ones; fewer files for a smaller n), val_data."""
    rng = np.random.default_rng(0)
    suffix = "_npz" if npz else ""
    start, batch = 0, 1
    while start < n:
        count = min(IMAGES_PER_BATCH_FILE, n - start)
        part = "part1" if batch <= 5 else "part2"
        folder = root / f"Imagenet{res}_train_{part}{suffix}" if res == 64 else root / f"Imagenet{res}_train{suffix}"
        write_batch(folder, f"train_data_batch_{batch}", random_block(rng, count, res), npz)
        start, batch = start + count, batch + 1
    write_batch(root / f"Imagenet{res}_val{suffix}", "val_data", random_block(rng, n_test, res), npz)


def write_batch(folder: Path, name: str, rows: np.ndarray, npz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.random.default_rng(1).integers(1, 1001, size=len(rows))
    if npz:
        np.savez(folder / f"{name}.npz", data=rows, labels=labels)
        return
    with open(folder / name, "wb") as f:
        pickle.dump({"data": rows, "labels": labels.tolist(), "mean": rows[:1000].mean(0)}, f, protocol=4)


def write_old(root: Path, n: int, n_test: int, res: int) -> None:
    """train_{r}x{r}/ and valid_{r}x{r}/ of numbered PNG files."""
    from PIL import Image

    def save(args: tuple[Path, int, int]) -> None:
        folder, first, count = args
        rng = np.random.default_rng(first)
        for i, image in enumerate(rng.integers(0, 256, size=(count, res, res, 3), dtype=np.uint8)):
            Image.fromarray(image).save(folder / f"{first + i + 1:07d}.png")

    for split, count in (("train", n), ("valid", n_test)):
        folder = root / f"{split}_{res}x{res}"
        folder.mkdir(parents=True, exist_ok=True)
        chunks = [(folder, s, min(1000, count - s)) for s in range(0, count, 1000)]
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(save, chunks))


# --------------------------------------------------------------------------------------------------
# Measuring (each phase in its own process)


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class PssPeak:
    """The largest summed PSS of this process and its children, sampled every 0.2 s."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, pss_mb(me) + sum(pss_mb(c) for c in children(me)))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def peak_rss_mb(who: int) -> float:
    """This process's peak RSS (VmHWM: getrusage's also holds the peak of the process it was exec'd
    from), or the largest of its waited-for children's (getrusage: forked workers start afresh)."""
    if who == resource.RUSAGE_SELF:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def open_set(root: str, version: str, res: int):
    from sdeflow_builtin.imagenet import imagenet32, imagenet64

    factory = imagenet64 if res == 64 else imagenet32
    return factory(version=version, root=root, allow_partial=True, n_val=1000)


def phase_convert(root: str, version: str, res: int) -> dict:
    import sdeflow_builtin.imagenet  # noqa: F401  (imports are not the conversion's time)

    start = time.perf_counter()
    bundle = open_set(root, version, res)
    seconds = time.perf_counter() - start
    images = len(bundle.reference) + len(bundle.test)
    return {"convert_s": seconds, "convert_per_s": images / seconds,
            "convert_rss_mb": peak_rss_mb(resource.RUSAGE_SELF)}


def draw(train, batches: int, batch_size: int, workers: int) -> dict:
    """Time ``batches`` training batches through the trainer's DataLoader path; memory peaks."""
    from sdeflow.core.batches import train_batches

    pss = PssPeak()
    loader = train_batches(train, batch_size, seed=0, start=0, stop=batches, num_workers=workers)
    first = next(loader)
    start = time.perf_counter()
    count = sum(len(b) for b in loader)
    seconds = time.perf_counter() - start
    assert first.dtype.is_floating_point and first.shape[0] == batch_size
    return {"load_per_s": count / seconds, "main_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
            "worker_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN), "pss_mb": pss.stop(), "batches": batches}


def phase_load(root: str, version: str, res: int, batches: int, batch_size: int, workers: int) -> dict:
    import sdeflow_builtin.imagenet  # noqa: F401  (imports are not the check's time)

    start = time.perf_counter()
    bundle = open_set(root, version, res)
    opened = time.perf_counter() - start
    return {"open_s": opened, "train": len(bundle.train), **draw(bundle.train, batches, batch_size, workers)}


def phase_sparse(folder: str, res: int, batches: int, batch_size: int, workers: int) -> dict:
    """A full-size train split over a sparse .npy: ImageNet64's index arrays, no data on disk."""
    from sdeflow_builtin.datasets import hold_out_split
    from sdeflow_builtin.imagecache import CacheWriter, MemmapImages

    path = os.path.join(folder, "sparse.npy")
    writer = CacheWriter(path, (3, res, res))
    writer.count = IMAGENET64_TRAIN
    writer.file.truncate(writer.file.tell() + IMAGENET64_TRAIN * 3 * res * res)  # a hole, no blocks
    writer.close()
    start = time.perf_counter()
    images = MemmapImages(path)
    train, _ = hold_out_split("imagenet64", images, 10000, 0)
    opened = time.perf_counter() - start
    return {"open_s": opened, "train": len(train), **draw(train, batches, batch_size, workers)}


def child(args: argparse.Namespace) -> None:
    if args.phase == "convert":
        result = phase_convert(args.root, args.version, args.resolution)
    elif args.phase == "load":
        result = phase_load(args.root, args.version, args.resolution, args.batches, args.batch_size, args.workers)
    else:
        result = phase_sparse(args.root, args.resolution, args.batches, args.batch_size, args.workers)
    print("RESULT " + json.dumps(result), flush=True)


def run_phase(phase: str, root: Path, version: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--root", str(root), "--version", version,
               "--resolution", str(args.resolution), "--batches", str(args.batches),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


# --------------------------------------------------------------------------------------------------


LAYOUTS = {"pickle": ("new", lambda r, n, t, res: write_new(r, n, t, res, npz=False)),
           "npz": ("new", lambda r, n, t, res: write_new(r, n, t, res, npz=True)),
           "png": ("old", write_old)}


def measure_layout(layout: str, folder: Path, args: argparse.Namespace) -> dict:
    version, write = LAYOUTS[layout]
    root = folder / layout
    start = time.perf_counter()
    write(root, args.images, args.test_images, args.resolution)
    written = time.perf_counter() - start
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    row = {"layout": layout, "images": args.images, "source_gb": size / 1e9, "write_s": written}
    row.update(run_phase("convert", root, version, args))
    row.update(run_phase("load", root, version, args))
    if not args.keep:
        shutil.rmtree(root)
    return row


def table(rows: list[dict]) -> str:
    head = ("| layout | images | source GB | convert s | convert img/s | convert peak RSS MB | open s | "
            "load img/s | main peak RSS MB | worker peak RSS MB | peak PSS sum MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['images']:,} | {r.get('source_gb', 0):.2f} | "
                     f"{r.get('convert_s', float('nan')):.1f} | {r.get('convert_per_s', float('nan')):,.0f} | "
                     f"{r.get('convert_rss_mb', float('nan')):,.0f} | {r['open_s']:.2f} | {r['load_per_s']:,.0f} | "
                     f"{r['main_rss_mb']:,.0f} | {r['worker_rss_mb']:,.0f} | {r['pss_mb']:,.0f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000, help="training images in each layout")
    p.add_argument("--imagenet64", action="store_true", help=f"ImageNet64's size: {IMAGENET64_TRAIN:,} images")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=64, choices=(32, 64))
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--batches", type=int, default=400, help="training batches timed after the first")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", help="where to write the sets (default: a temporary folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the written sets and caches")
    p.add_argument("--sparse-full", action="store_true", help="add an ImageNet64-sized index over a sparse file")
    p.add_argument("--phase", choices=("convert", "load", "sparse"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--version", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.imagenet64:
        args.images = IMAGENET64_TRAIN
    return args


def main() -> None:
    args = parse()
    if args.phase:
        child(args)
        return
    folder = Path(tempfile.mkdtemp(prefix="sdeflow-data-loading-", dir=args.dir))
    rows = []
    try:
        for layout in args.layouts:
            rows.append(measure_layout(layout, folder, args))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.sparse_full:
            rows.append({"layout": "sparse (index only)", "images": IMAGENET64_TRAIN,
                         **run_phase("sparse", folder, "new", args)})
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.resolution}×{args.resolution}, batch size {args.batch_size}, {args.workers} workers, "
          f"{args.batches} batches timed, {os.cpu_count()} CPUs\n")
    print(table(rows))


if __name__ == "__main__":
    main()
