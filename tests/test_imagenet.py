"""Downsampled ImageNet in both versions, read from tiny files written in each official layout (the new
version's pickles and .npz files, ImageNet64's two parts, the old version's PNG folders) with
``allow_partial``: exact values, splits, the size checks and their one-line messages."""

from __future__ import annotations

import json
import os
from typing import Literal

import numpy as np
import pytest
import torch

from fakedata import imagenet_train_folder, write_imagenet_new, write_imagenet_old
from helpers_exp import write_experiment
from sdeflow.assembly.build import build_data
from sdeflow.components.registry import DISABLE_ENV, build_registry
from sdeflow.core.errors import ConfigError, DataError, InvalidArgument
from sdeflow.core.transforms import Affine, Logit
from sdeflow.experiment.config import load_experiment
from sdeflow_builtin.datasets import hold_out_indices
from sdeflow_builtin.imagenet import OFFICIAL_SIZES, check_sizes, imagenet32, imagenet64

FACTORIES = {32: imagenet32, 64: imagenet64}


def stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(len(dataset))])


def as_bytes(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


def load(res: int, root, version: Literal["new", "old"] = "new", **kwargs):
    return FACTORIES[res](version=version, root=str(root), **{"allow_partial": True, "n_val": 4, **kwargs})


def assert_splits_round_trip(bundle, written, res: int) -> None:
    """Test is the validation files, reference every training file, train and val a partition of them."""
    assert bundle.shape == (3, res, res) and bundle.kind == "image" and bundle.levels == 256
    assert np.array_equal(as_bytes(stack(bundle.test)), written.test)
    assert np.array_equal(as_bytes(stack(bundle.reference)), written.train)
    train, val = bundle.train.indices, bundle.val.indices
    assert sorted([*train, *val]) == list(range(len(written.train))) and not set(train) & set(val)
    assert np.array_equal(as_bytes(stack(bundle.train)), written.train[train])
    assert np.array_equal(as_bytes(stack(bundle.val)), written.train[val])


# --- registration and arguments ---------------------------------------------------------------------


def test_registered_with_a_required_version(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    registry = build_registry(strict=False)
    for name in ("imagenet32", "imagenet64"):
        arguments = registry.get("data", name).arguments
        assert registry.get("data", name).plugin.name == "builtin-datasets"
        assert {"version", "root", "logit_alpha", "affine", "n_val", "split_seed", "augment", "allow_partial",
                "cache_dir"} <= set(arguments)
        assert arguments["version"].default is None


@pytest.mark.parametrize("res", [32, 64])
def test_a_missing_version_names_the_key_and_both_choices(tmp_path, res):
    with pytest.raises(InvalidArgument) as info:
        FACTORIES[res](root=str(tmp_path))
    assert info.value.argument == "version"
    assert "new (" in info.value.message and "old (" in info.value.message
    with pytest.raises(InvalidArgument, match="expected new or old"):
        FACTORIES[res](version="newer", root=str(tmp_path))


def test_a_missing_version_is_one_line_naming_data_version_in_an_experiment(tmp_path):
    path = write_experiment(tmp_path, data={"name": "imagenet32", "root": str(tmp_path)})
    with pytest.raises(ConfigError) as info:
        build_data(load_experiment(path))
    message = str(info.value)
    assert message.startswith(f"{path}: data.version: required: new") and "old" in message and "\n" not in message


# --- the new version ----------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [32, 64])
@pytest.mark.parametrize("npz", [False, True])
def test_new_files_round_trip_exactly(tmp_path, res, npz):
    written = write_imagenet_new(tmp_path, resolution=res, n_train=30, n_test=5, npz=npz)
    bundle = load(res, tmp_path)
    assert_splits_round_trip(bundle, written, res)
    assert isinstance(bundle.transform, Logit)
    protocol = bundle.protocol
    assert protocol["name"] == f"imagenet{res}" and protocol["version"] == "new" and protocol["partial"]
    assert protocol["files"] == ("npz" if npz else "pickle")
    assert protocol["splits"] == {"train": 26, "val": 4, "test": 5} and protocol["augment"] == []


def test_imagenet64_reads_both_parts_of_its_training_files(tmp_path):
    write_imagenet_new(tmp_path, resolution=64, n_train=20, n_test=3)
    assert {d for d in os.listdir(tmp_path)} == {"Imagenet64_train_part1", "Imagenet64_train_part2", "Imagenet64_val"}
    assert imagenet_train_folder(64, 6) == "Imagenet64_train_part2"
    assert len(load(64, tmp_path).reference) == 20


def test_files_are_found_anywhere_under_root_and_each_resolution_takes_its_own(tmp_path):
    small = write_imagenet_new(tmp_path / "downloads" / "a", resolution=32, n_train=20, n_test=3)
    large = write_imagenet_new(tmp_path / "downloads" / "b", resolution=64, n_train=20, n_test=4, seed=1)
    assert np.array_equal(as_bytes(stack(load(32, tmp_path).test)), small.test)
    assert np.array_equal(as_bytes(stack(load(64, tmp_path).test)), large.test)


def test_npz_files_are_preferred_to_pickles_of_the_same_batches(tmp_path):
    written = write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3, npz=True)
    write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3, seed=1)  # other pixels, pickled
    bundle = load(32, tmp_path)
    assert bundle.protocol["files"] == "npz" and np.array_equal(as_bytes(stack(bundle.test)), written.test)


def test_the_same_file_twice_is_ambiguous(tmp_path):
    write_imagenet_new(tmp_path / "one", resolution=32, n_train=20, n_test=3)
    write_imagenet_new(tmp_path / "two", resolution=32, n_train=20, n_test=3)
    with pytest.raises(DataError, match="more than once .*point data.root at one copy"):
        load(32, tmp_path)


def test_files_of_the_other_resolution_are_named(tmp_path):
    write_imagenet_new(tmp_path / "mine", resolution=32, n_train=20, n_test=3)
    for folder in os.listdir(tmp_path / "mine"):  # no resolution in the folder names any more
        os.rename(tmp_path / "mine" / folder, tmp_path / "mine" / folder.replace("32", ""))
    with pytest.raises(DataError) as info:
        load(64, tmp_path)
    assert "holds 32×32 images, not 64×64" in str(info.value)
    write_imagenet_new(tmp_path / "other", resolution=32, n_train=20, n_test=3)
    with pytest.raises(DataError, match="the files there are ImageNet32's"):
        load(64, tmp_path / "other")


def test_a_missing_part_of_imagenet64_is_one_line(tmp_path):
    written = write_imagenet_new(tmp_path, resolution=64, n_train=20, n_test=3, batches=range(1, 6))
    with pytest.raises(DataError) as info:
        load(64, tmp_path, allow_partial=False)
    message = str(info.value)
    assert "\n" not in message and "train_data_batch_6..10" in message and "Imagenet64_train_part2" in message
    assert "found train_data_batch_1..5" in message and "allow_partial" in message
    bundle = load(64, tmp_path)  # a subset, accepted and recorded
    assert np.array_equal(as_bytes(stack(bundle.reference)), written.train) and bundle.protocol["partial"]


def test_missing_batches_and_a_missing_val_file_are_named(tmp_path):
    write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3, batches=[1, 2, 4])
    with pytest.raises(DataError, match=r"train_data_batch_3, 5\.\.10 missing .*found 1, 2, 4 of 1\.\.10"):
        load(32, tmp_path, allow_partial=False)
    write_imagenet_new(tmp_path / "noval", resolution=32, n_train=20, n_test=3, val=False)
    with pytest.raises(DataError, match="val_data .* the test split, is not under"):
        load(32, tmp_path / "noval")


def test_a_partial_set_needs_allow_partial(tmp_path):
    write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3)
    with pytest.raises(DataError) as info:
        load(32, tmp_path, allow_partial=False)
    message = str(info.value)
    assert "found 20 training and 3 validation images, expected 1,281,167 and 50,000" in message
    assert "set data.allow_partial: true" in message and "\n" not in message


def test_nothing_there_says_what_is_expected(tmp_path):
    with pytest.raises(DataError) as info:
        load(64, tmp_path)
    message = str(info.value)
    assert "expected train_data_batch_1..10 and val_data" in message and "Imagenet64_train_part2.zip" in message
    (tmp_path / "Imagenet64_val.zip").write_bytes(b"")
    with pytest.raises(DataError, match="Imagenet64_val.zip must be unpacked first"):
        load(64, tmp_path)


def test_an_unreadable_file_is_a_data_error(tmp_path):
    write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3)
    path = tmp_path / "Imagenet32_train" / "train_data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="train_data_batch_3 is unreadable"):
        load(32, tmp_path)
    assert not [f for f in os.listdir(tmp_path / "sdeflow-cache") if ".tmp-" in f]


# --- the old version ----------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [32, 64])
def test_old_png_folders_round_trip_exactly(tmp_path, res):
    written = write_imagenet_old(tmp_path, resolution=res, n_train=12, n_test=5)
    bundle = load(res, tmp_path, version="old")
    assert_splits_round_trip(bundle, written, res)
    assert bundle.protocol["version"] == "old" and bundle.protocol["files"] == "png"


def test_the_other_version_is_named(tmp_path):
    write_imagenet_old(tmp_path / "old", resolution=32, n_train=6, n_test=2)
    with pytest.raises(DataError) as info:
        load(32, tmp_path / "old", version="new")
    assert "PNG folders are the old version" in str(info.value) and "set data.version: old" in str(info.value)
    write_imagenet_new(tmp_path / "new", resolution=32, n_train=20, n_test=2)
    with pytest.raises(DataError, match="they are the new version .*; set data.version: new"):
        load(32, tmp_path / "new", version="old")


@pytest.mark.parametrize("version", ["new", "old"])
def test_sizes_of_the_other_version_are_named(version):
    other = "old" if version == "new" else "new"
    n_train, n_test = OFFICIAL_SIZES[other]
    with pytest.raises(DataError) as info:
        check_sizes(version, OFFICIAL_SIZES[version][0], n_test, False, "ImageNet32", "/data")
    assert f"{n_test:,} validation images: that is the {other} version" in str(info.value)
    assert str(info.value).endswith(f"set data.version: {other}")
    with pytest.raises(DataError, match=f"{n_train:,} training images: that is the {other} version"):
        check_sizes(version, n_train, 7, True, "ImageNet32", "/data")
    assert check_sizes(version, *OFFICIAL_SIZES[version], False, "ImageNet32", "/data") is False
    assert check_sizes(version, 100, 10, True, "ImageNet32", "/data") is True


# --- splits, model space, caches --------------------------------------------------------------------


def test_val_is_the_seeded_hold_out_cifar10_uses(tmp_path):
    write_imagenet_new(tmp_path, resolution=32, n_train=30, n_test=3)
    val = load(32, tmp_path, n_val=6).val.indices.tolist()
    assert val == hold_out_indices("imagenet32", 30, 6, 0)[1]
    assert load(32, tmp_path, n_val=6).val.indices.tolist() == val
    assert load(32, tmp_path, n_val=6, split_seed=1).val.indices.tolist() != val
    bundle = load(32, tmp_path, n_val=0)
    assert bundle.val is None and len(bundle.train) == 30


def test_the_model_space_options_are_cifar10s(tmp_path):
    write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3)
    assert isinstance(load(32, tmp_path, logit_alpha=None, affine=True).transform, Affine)
    with pytest.raises(InvalidArgument) as info:
        load(32, tmp_path, affine=True)
    assert info.value.argument == "affine"


def test_the_train_split_is_never_materialised(tmp_path):
    write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3)
    bundle = load(32, tmp_path)
    for split in (bundle.train.dataset, bundle.val.dataset, bundle.test, bundle.reference):
        assert isinstance(split.images, np.memmap)
    assert isinstance(bundle.train.indices, np.ndarray)  # 8 bytes an index, not a Python list


def test_a_changed_source_file_rebuilds_its_cache_with_one_line(tmp_path, capsys):
    write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3)
    load(32, tmp_path)
    assert len(capsys.readouterr().err.splitlines()) == 2  # the train and test caches, built once
    load(32, tmp_path)
    assert capsys.readouterr().err == ""
    changed = write_imagenet_new(tmp_path, resolution=32, n_train=20, n_test=3, seed=5, batches=[])  # val only
    bundle = load(32, tmp_path)
    (line,) = capsys.readouterr().err.splitlines()
    assert "ImageNet32 (new) test" in line and "stale (its source files changed" in line
    assert np.array_equal(as_bytes(stack(bundle.test)), changed.test)
    record = json.loads((tmp_path / "sdeflow-cache" / "imagenet32-new-test.json").read_text())
    assert record["source"]["names"] == ["Imagenet32_val/val_data"]
