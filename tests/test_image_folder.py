"""``image_folder``: a tree or .zip of PNG / JPEG files, centre-cropped and resized, split by folders
(train/, val/, test/) or by seeded hold-outs; and the data set's protocol in eval.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fakedata import write_image_folder, write_png
from helpers_exp import write_experiment
from sdeflow.core.errors import DataError, InvalidArgument
from sdeflow.experiment.config import load_experiment
from sdeflow.training.trainer import train
from sdeflow_builtin.datasets import hold_out_indices
from sdeflow_builtin.image_folder import image_folder, split_indices


def stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(len(dataset))])


def as_bytes(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


def images_of(written: dict[str, np.ndarray], names) -> np.ndarray:
    return np.stack([written[n] for n in names])


NAMES = [f"{kind}/{i:02d}.png" for kind in ("cats", "dogs") for i in range(10)]


def test_a_tree_round_trips_with_seeded_hold_outs(tmp_path):
    written = write_image_folder(tmp_path, NAMES, resolution=8)
    bundle = image_folder(str(tmp_path), resolution=8, n_val=3, n_test=4)
    assert bundle.shape == (3, 8, 8) and bundle.kind == "image" and bundle.levels == 256
    ordered = sorted(NAMES)
    parts = {s: getattr(bundle, s).indices for s in ("train", "val", "test")}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(20))
    assert {s: len(p) for s, p in parts.items()} == {"train": 13, "val": 3, "test": 4}
    for split, indices in parts.items():
        expected = images_of(written, [ordered[i] for i in indices])
        assert np.array_equal(as_bytes(stack(getattr(bundle, split))), expected)
    rest, test = hold_out_indices("image_folder-test", 20, 4, 0)
    assert parts["test"].tolist() == test
    assert parts["val"].tolist() == [rest[i] for i in hold_out_indices("image_folder", 16, 3, 0)[1]]
    assert len(bundle.reference) == 16  # train and val, never test
    assert bundle.protocol["split_rule"].startswith("seeded hold-outs") and bundle.protocol["files"] == 20
    again = image_folder(str(tmp_path), resolution=8, n_val=3, n_test=4, split_seed=1)
    assert again.test.indices.tolist() != parts["test"].tolist()


def test_train_val_test_folders_are_the_splits(tmp_path):
    names = [f"train/{i}.png" for i in range(6)] + ["val/a.png", "val/b.png"] + ["test/x.png"] + ["notes/y.png"]
    written = write_image_folder(tmp_path, names, resolution=4)
    bundle = image_folder(str(tmp_path), resolution=4)
    assert np.array_equal(as_bytes(stack(bundle.val)), images_of(written, ["val/a.png", "val/b.png"]))
    assert np.array_equal(as_bytes(stack(bundle.test)), images_of(written, ["test/x.png"]))
    assert np.array_equal(as_bytes(stack(bundle.train)), images_of(written, [f"train/{i}.png" for i in range(6)]))
    assert bundle.protocol["files"] == 9  # notes/ is not a split folder: ignored
    (tmp_path / "val" / "a.png").unlink()
    (tmp_path / "val" / "b.png").unlink()
    held = image_folder(str(tmp_path), resolution=4, n_val=2)  # no val/: held out of train/
    assert len(held.val) == 2 and len(held.train) == 4 and "no val/" in held.protocol["split_rule"]


def test_split_rule_without_a_test_folder_holds_test_out_of_train():
    names = [f"train/{i}.png" for i in range(10)]
    splits, rule = split_indices(names, n_val=2, n_test=3, split_seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5, 2, 3] and "no test/" in rule
    with pytest.raises(InvalidArgument) as info:
        split_indices(names, n_val=2, n_test=10, split_seed=0)
    assert info.value.argument == "n_test"


def test_a_zip_reads_like_the_folder(tmp_path):
    names = [f"photos/{n}" for n in NAMES]
    written = write_image_folder(tmp_path, names, resolution=8, zip_path=tmp_path / "set.zip")
    bundle = image_folder(str(tmp_path / "set.zip"), resolution=8, n_val=3, n_test=4)
    folder = write_image_folder(tmp_path / "tree", NAMES, resolution=8)  # the same pixels (same seed)
    assert all(np.array_equal(written[f"photos/{n}"], folder[n]) for n in NAMES)
    from_folder = image_folder(str(tmp_path / "tree"), resolution=8, n_val=3, n_test=4)
    for split in ("train", "val", "test"):
        assert torch.equal(stack(getattr(bundle, split)), stack(getattr(from_folder, split)))
    assert (tmp_path / "sdeflow-cache" / "set-8px-box.npy").exists()  # beside the .zip


def test_images_are_centre_cropped_and_box_resized(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(3, 4, 12), dtype=np.uint8)  # 12 wide, 4 high: the middle 4 columns
    write_png(tmp_path / "wide.png", wide)
    blocks = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)  # 8×8 of constant 2×2 blocks
    write_png(tmp_path / "zoomed.png", blocks.repeat(2, axis=1).repeat(2, axis=2))
    bundle = image_folder(str(tmp_path), resolution=4, n_val=0, n_test=1)
    every = dict(zip(bundle.test.indices.tolist(), as_bytes(stack(bundle.test))))
    every.update(zip(bundle.train.indices.tolist(), as_bytes(stack(bundle.train))))
    assert np.array_equal(every[0], wide[:, :, 4:8]) and np.array_equal(every[1], blocks)  # sorted: wide, zoomed


def test_jpeg_and_odd_modes_become_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (6, 6), color=200).save(tmp_path / "grey.jpg", quality=95)
    Image.new("RGBA", (6, 6), color=(10, 20, 30, 255)).save(tmp_path / "alpha.png")
    Image.new("P", (6, 6)).save(tmp_path / "palette.png")
    bundle = image_folder(str(tmp_path), resolution=6, n_val=0, n_test=1)
    every = torch.cat([stack(bundle.train), stack(bundle.test)])
    assert every.shape == (3, 3, 6, 6)
    assert any(torch.allclose(x, torch.tensor([10, 20, 30]).view(3, 1, 1) / 255) for x in every)
    assert any((x * 255 - 200).abs().max() <= 2 for x in every)  # JPEG is lossy


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(DataError, match="no PNG or JPEG files under"):
        image_folder(str(tmp_path))
    with pytest.raises(DataError, match="neither a folder nor a .zip"):
        image_folder(str(tmp_path / "missing"))
    write_image_folder(tmp_path, ["a.png", "b.png", "c.png"], resolution=4)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b\.png is not a readable image"):
        image_folder(str(tmp_path), resolution=4, n_val=0, n_test=1)
    with pytest.raises(InvalidArgument) as info:
        image_folder(str(tmp_path), resolution=4, n_val=3, n_test=1)
    assert info.value.argument == "n_val"
    with pytest.raises(InvalidArgument, match="unknown augmentation 'mirror'"):
        image_folder(str(tmp_path), augment=("mirror",))


def test_a_new_file_rebuilds_the_cache_with_one_line(tmp_path, capsys):
    write_image_folder(tmp_path, NAMES, resolution=4)
    image_folder(str(tmp_path), resolution=4, n_val=2, n_test=2)
    capsys.readouterr()
    write_image_folder(tmp_path, ["zebra.png"], resolution=4)
    bundle = image_folder(str(tmp_path), resolution=4, n_val=2, n_test=2)
    (line,) = capsys.readouterr().err.splitlines()
    assert "stale (its source files changed (20 → 21 files))" in line
    assert len(bundle.reference) == 19


def test_eval_json_names_the_data_set(tmp_path):
    write_image_folder(tmp_path / "images", [f"{i:02d}.png" for i in range(12)], resolution=8)
    data = {"name": "image_folder", "root": str(tmp_path / "images"), "resolution": 8, "n_val": 2, "n_test": 4,
            "augment": ["hflip", "rot90"]}
    network = {"name": "unet", "ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "num_groups": 4}
    exp = load_experiment(write_experiment(tmp_path, data=data, network=network, train={"steps": 2, "batch_size": 4},
                                           eval={"batch_size": 4, "max_examples": 4}, sample={"num": 2},
                                           sampler={"name": "euler_maruyama", "steps": 2}))
    train(exp, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())["test"]["elbo"]["protocol"]["data"]
    assert saved["name"] == "image_folder" and saved["splits"] == {"train": 6, "val": 2, "test": 4}
    assert saved["augment"] == ["hflip", "rot90"] and saved["resolution"] == 8
