"""The converted image cache: built once, checked against its source on every open, rebuilt (with one
printed line) when stale, truncated or corrupt, written atomically, and read through a memory map that
pickles to DataLoader workers as a path."""

from __future__ import annotations

import json
import os
import pickle
import threading

import numpy as np
import pytest
import torch
from torchvision.transforms import ToTensor

from fakedata import write_imagenet_new
from sdeflow.core.batches import train_batches
from sdeflow.core.errors import DataError
from sdeflow_builtin import imagecache
from sdeflow_builtin.imagecache import MemmapImages, cache_folders, fingerprint, open_cache, stale_reason
from sdeflow_builtin.imagenet import imagenet32

ITEM = (3, 4, 4)


def blocks_writer(*blocks: np.ndarray):
    def write(writer):
        for block in blocks:
            writer.append(block)
    return write


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *ITEM), dtype=np.uint8)


@pytest.fixture
def source(tmp_path):
    """A one-file 'source' and its fingerprint; the cache goes to tmp_path/cache."""
    (tmp_path / "src.bin").write_bytes(b"abc")
    return {"folders": [str(tmp_path / "cache")], "source": fingerprint([str(tmp_path / "src.bin")], str(tmp_path))}


def build(source, images: np.ndarray, capsys=None) -> MemmapImages:
    cached = open_cache("x.npy", source["folders"], source["source"], ITEM, blocks_writer(images[:3], images[3:]),
                        "test set")
    return cached


def messages(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_items_are_what_to_tensor_gives_for_the_same_bytes(source, capsys):
    images = random_images(7)
    cached = build(source, images)
    assert len(cached) == 7 and cached.shape == (7, *ITEM)
    to_tensor = ToTensor()
    for i in range(7):
        expected = to_tensor(images[i].transpose(1, 2, 0))  # ToTensor takes H×W×C
        assert torch.equal(cached[i], expected) and cached[i].dtype == torch.float32
    batch = cached.__getitems__([5, 0, 5, 2])  # a gather in file order, returned in the order asked
    assert all(torch.equal(x, cached[i]) for x, i in zip(batch, [5, 0, 5, 2]))
    assert len(messages(capsys)) == 1


def test_a_fresh_cache_is_reused_silently(source, capsys):
    images = random_images(5)
    build(source, images)
    capsys.readouterr()
    calls = []
    again = open_cache("x.npy", source["folders"], source["source"], ITEM, calls.append, "test set")
    assert calls == [] and messages(capsys) == []
    assert torch.equal(again[4], build(source, images)[4])


def test_the_array_is_a_memory_map_opened_lazily_and_pickled_as_a_path(source):
    cached = build(source, random_images(5))
    assert isinstance(cached.images, np.memmap) and cached.images.mode == "r"
    copy = pickle.loads(pickle.dumps(cached))
    assert copy._images is None and len(pickle.dumps(cached)) < 1000
    assert torch.equal(copy[3], cached[3]) and isinstance(copy.images, np.memmap)


@pytest.mark.parametrize("damage", ["truncate", "append", "zero", "record", "no_record", "garbage"])
def test_a_damaged_cache_is_rebuilt_with_one_line(source, capsys, damage):
    images = random_images(9)
    cached = build(source, images)
    path, record = cached.path, os.path.splitext(cached.path)[0] + ".json"
    del cached
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 5)
    elif damage == "append":
        with open(path, "ab") as f:
            f.write(b"\0" * 48)
    elif damage == "zero":  # the header is intact, the pixels are not
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(128)
            f.write(b"\0" * (size - 128))
    elif damage == "record":
        with open(record, "w") as f:
            f.write("{not json")
    elif damage == "no_record":
        os.remove(record)
    else:
        with open(path, "wb") as f:
            f.write(b"garbage")
    assert stale_reason(path, source["source"], ITEM) is not None
    capsys.readouterr()
    rebuilt = build(source, images)
    (line,) = messages(capsys)
    assert "stale" in line and "rebuilding" in line and path in line
    assert torch.equal(torch.stack([rebuilt[i] for i in range(9)]), torch.from_numpy(images).float() / 255)
    assert stale_reason(path, source["source"], ITEM) is None


def test_a_changed_source_file_makes_the_cache_stale(tmp_path, source, capsys):
    build(source, random_images(4))
    (tmp_path / "src.bin").write_bytes(b"abcd")
    changed = fingerprint([str(tmp_path / "src.bin")], str(tmp_path))
    path = os.path.join(source["folders"][0], "x.npy")
    assert "3 → 4 bytes" in stale_reason(path, changed, ITEM)
    capsys.readouterr()
    fresh = open_cache("x.npy", source["folders"], changed, ITEM, blocks_writer(random_images(2, seed=1)), "test set")
    (line,) = messages(capsys)
    assert "source files changed" in line and len(fresh) == 2


def test_a_failed_conversion_leaves_no_files_and_the_old_cache_in_place(source):
    images = random_images(4)
    build(source, images)
    folder = source["folders"][0]
    before = sorted(os.listdir(folder))

    def broken(writer):
        writer.append(images[:2])
        raise DataError("source unreadable")

    other = {**source["source"], "sha1": "0" * 40}
    with pytest.raises(DataError, match="source unreadable"):
        open_cache("x.npy", source["folders"], other, ITEM, broken, "test set")
    assert sorted(os.listdir(folder)) == before  # no temporary file left behind
    assert stale_reason(os.path.join(folder, "x.npy"), source["source"], ITEM) is None


def test_the_record_names_its_shape_and_source(source):
    cached = build(source, random_images(6))
    with open(os.path.splitext(cached.path)[0] + ".json") as f:
        record = json.load(f)
    assert record["shape"] == [6, *ITEM] and record["source"] == source["source"]
    assert record["source"]["names"] == ["src.bin"]


def test_a_read_only_data_folder_caches_under_the_user_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    beside, fallback = cache_folders(str(data), None)
    assert beside == str(data / imagecache.CACHE_FOLDER)
    assert fallback.startswith(str(tmp_path / "xdg" / "sdeflow" / "images" / "data-"))
    assert cache_folders(str(data), str(tmp_path / "mine")) == [str(tmp_path / "mine")]
    writable = imagecache._writable
    monkeypatch.setattr(imagecache, "_writable", lambda folder: folder != beside and writable(folder))
    cached = open_cache("x.npy", [beside, fallback], {"files": 0}, ITEM, blocks_writer(random_images(2)), "t")
    assert cached.path == os.path.join(fallback, "x.npy")


def test_reads_copy_out_of_the_file_and_never_through_the_map(source, monkeypatch):
    images = random_images(6)
    cached = build(source, images)
    cached._images = None  # were the map used, it would be opened again
    batch = cached.__getitems__([4, -1, 0])
    assert cached._images is None and cached._fd is not None
    assert torch.equal(torch.stack(batch), torch.from_numpy(images[[4, 5, 0]]).float() / 255)
    with pytest.raises(IndexError):
        cached[6]
    monkeypatch.delattr(os, "preadv")  # where the OS has no preadv: through the map
    assert torch.equal(cached.__getitems__([1, 0])[0], cached[1]) and cached._images is not None


def test_dataloader_workers_read_the_cache(tmp_path):
    written = write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=4)
    bundle = imagenet32(version="new", root=str(tmp_path), allow_partial=True, n_val=4)
    expected = [torch.stack([bundle.train[i] for i in b]) for b in ([0, 1, 2, 3], [4, 5, 6, 7])]
    batches = list(train_batches(bundle.train, 4, seed=0, start=0, stop=4, shuffle=False, num_workers=2))
    assert len(batches) == 4 and batches[0].shape == (4, 3, 32, 32)
    assert torch.equal(batches[0], expected[0]) and torch.equal(batches[1], expected[1])
    assert torch.equal((batches[0] * 255).round().to(torch.uint8),
                       torch.from_numpy(written.train[bundle.train.indices[:4]]))


def test_a_second_builder_waits_for_the_first_and_uses_its_cache(source):
    images = random_images(5)
    started, release = threading.Event(), threading.Event()

    def slow(writer):
        started.set()
        release.wait(5)
        writer.append(images)

    first = threading.Thread(target=open_cache, args=("x.npy", source["folders"], source["source"], ITEM, slow, "t"))
    first.start()
    started.wait(5)
    calls, results = [], []
    second = threading.Thread(target=lambda: results.append(
        open_cache("x.npy", source["folders"], source["source"], ITEM, calls.append, "t")))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waiting on the lock, not converting a second time
    release.set()
    first.join(5)
    second.join(5)
    assert calls == [] and torch.equal(results[0][4], torch.from_numpy(images[4]).float() / 255)
