"""Augmentation of the train split (``augment:``): VDM's random symmetries, drawn from torch's seeded
global generator, on the train split only (val, test and FID's reference never), recorded in the
protocol; CIFAR-10's ``hflip`` unchanged; an unknown entry is a one-line error listing the choices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision import transforms

from fakedata import use_fake_cifar10_checksums, write_cifar10, write_imagenet_new
from sdeflow.core.errors import InvalidArgument
from sdeflow_builtin.augment import AUGMENTATIONS, Augment, check_augment
from sdeflow_builtin.datasets import cifar10
from sdeflow_builtin.imagenet import imagenet32


def stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(len(dataset))])


def orbit(x: torch.Tensor) -> list[torch.Tensor]:
    """Every image the four augmentations together can make of x (flips, quarter turns, channel orders)."""
    out = []
    for k, flip, order in itertools.product(range(4), (False, True), itertools.permutations(range(3))):
        y = x.flip(-1) if flip else x
        out.append(torch.rot90(y, k, dims=(-2, -1)).index_select(0, torch.tensor(order)))
    return out


def test_unknown_and_repeated_entries_are_one_line_errors():
    with pytest.raises(InvalidArgument) as info:
        check_augment(["hflip", "rotate"])
    assert info.value.argument == "augment" and "\n" not in info.value.message
    assert "unknown augmentation 'rotate'" in info.value.message
    assert info.value.message.endswith("choices: hflip, vflip, rot90, channel_permute")
    with pytest.raises(InvalidArgument, match="lists rot90 more than once"):
        check_augment(["rot90", "hflip", "rot90"])
    with pytest.raises(InvalidArgument, match="expected a list"):
        check_augment("hflip")
    with pytest.raises(InvalidArgument, match="unknown augmentation 'flip'"):
        cifar10(root="/nonexistent", augment=("flip",))  # checked before the files are looked for


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_augmentation_leaves_half_the_images_alone_and_permutes_the_rest(name):
    x = torch.arange(3 * 4 * 4, dtype=torch.float32).view(3, 4, 4)
    torch.manual_seed(0)
    draws = [AUGMENTATIONS[name](x) for _ in range(2000)]
    unchanged = sum(torch.equal(y, x) for y in draws) / len(draws)
    expected = {"channel_permute": 0.5 + 0.5 / 6}.get(name, 0.5)  # VDM's shuffle may be the identity
    assert abs(unchanged - expected) < 0.05
    images = orbit(x)
    assert all(any(torch.equal(y, z) for z in images) for y in draws[:200])
    assert all(torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values) for y in draws[:50])
    if name == "rot90":
        turns = [next(k for k in range(4) if torch.equal(y, torch.rot90(x, k, (-2, -1)))) for y in draws]
        assert all(abs(turns.count(k) / len(turns) - 1 / 6) < 0.04 for k in (1, 2, 3))


def test_draws_are_reproducible_under_torch_manual_seed():
    x = torch.rand(3, 5, 5)
    augment = Augment(["hflip", "vflip", "rot90", "channel_permute"])
    torch.manual_seed(3)
    first = [augment(x) for _ in range(20)]
    torch.manual_seed(3)
    assert all(torch.equal(a, augment(x)) for a in first)


def test_imagenet_train_is_augmented_and_val_test_reference_are_not(tmp_path):
    write_imagenet_new(tmp_path, resolution=32, n_train=30, n_test=5)
    plain = imagenet32(version="new", root=str(tmp_path), allow_partial=True, n_val=6)
    bundle = imagenet32(version="new", root=str(tmp_path), allow_partial=True, n_val=6,
                        augment=("hflip", "rot90", "channel_permute"))
    assert bundle.protocol["augment"] == ["hflip", "rot90", "channel_permute"] and plain.protocol["augment"] == []
    for split in ("val", "test", "reference"):
        assert torch.equal(stack(getattr(bundle, split)), stack(getattr(plain, split)))
    torch.manual_seed(0)
    augmented = stack(bundle.train)
    originals = stack(plain.train)
    assert not torch.equal(augmented, originals)
    assert all(any(torch.equal(a, z) for z in orbit(x)) for a, x in zip(augmented, originals))
    batch = bundle.train.dataset.__getitems__(bundle.train.indices[:8].tolist())  # the DataLoader's batched path
    assert all(any(torch.equal(a, z) for z in orbit(x)) for a, x in zip(batch, originals[:8]))
    torch.manual_seed(0)
    assert torch.equal(stack(bundle.train), augmented)


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, n_train=12, n_test=6)
    use_fake_cifar10_checksums(monkeypatch, tmp_path)
    return str(tmp_path), written


def test_cifar10_default_is_the_horizontal_flip_it_always_had(fake_cifar10):
    root, _ = fake_cifar10
    bundle = cifar10(root=root, download=False, n_val=4)
    steps = bundle.train.dataset.transform.transforms
    assert [type(s) for s in steps] == [transforms.RandomHorizontalFlip, transforms.ToTensor]
    assert bundle.protocol["augment"] == ["hflip"] and bundle.protocol["splits"] == {"train": 8, "val": 4, "test": 6}
    listed = cifar10(root=root, download=False, n_val=4, augment=("hflip",))  # the same flip, not a second one
    assert [type(s) for s in listed.train.dataset.transform.transforms] == [type(s) for s in steps]
    assert cifar10(root=root, download=False, n_val=4, hflip=False).protocol["augment"] == []


def test_cifar10_augment_adds_to_the_train_split_only(fake_cifar10):
    root, written = fake_cifar10
    bundle = cifar10(root=root, download=False, n_val=4, augment=("rot90", "channel_permute"))
    assert bundle.protocol["augment"] == ["hflip", "rot90", "channel_permute"]
    images = torch.from_numpy(written.train).float() / 255
    assert torch.equal(torch.stack([x for x, _ in (bundle.val[i] for i in range(4))]), images[bundle.val.indices])
    assert torch.equal(torch.stack([bundle.reference[i][0] for i in range(12)]), images)
    assert torch.equal(torch.stack([bundle.test[i][0] for i in range(6)]), torch.from_numpy(written.test).float() / 255)
    torch.manual_seed(0)
    train = torch.stack([bundle.train[i][0] for i in range(8)])
    originals = images[np.asarray(bundle.train.indices)]
    assert not torch.equal(train, originals)
    assert all(any(torch.equal(a, z) for z in orbit(x)) for a, x in zip(train, originals))
