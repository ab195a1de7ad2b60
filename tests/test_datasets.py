"""The built-in data sets: toy data from seeds, the Gaussian oracle, and MNIST / CIFAR-10 read from tiny
fake folders in torchvision's own formats through the real torchvision classes."""

from __future__ import annotations

import math
import socket
from typing import Any
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from scipy.stats import multivariate_normal
from torch.utils.data import Subset

from fakedata import use_fake_cifar10_checksums, write_cifar10, write_mnist
from sdeflow.components.registry import DISABLE_ENV, build_registry
from sdeflow.components.schema import check_arguments
from sdeflow.core.errors import DataError, InvalidArgument
from sdeflow.core.seeding import derive_seed
from sdeflow.core.transforms import Identity, Logit, ModelSpace, UnitInterval, bits_per_dim
from sdeflow_builtin import datasets
from sdeflow_builtin.datasets import cifar10, gaussian, mnist, swissroll, swissroll_points
from sdeflow_builtin.dequantizers import Uniform


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) item of a Dataset as two tensors."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """ToTensor's x = k/255 back to the byte k (exact: the nearest integer is k)."""
    return (x * 255).round().to(torch.uint8)


@pytest.fixture
def no_network(monkeypatch):
    """torchvision's download fails at once, as it does on a machine without network access."""

    def refuse(url, *args, **kwargs):
        raise URLError(f"no network for {url}")

    for module in (torchvision.datasets.mnist, torchvision.datasets.cifar):
        monkeypatch.setattr(module, "download_and_extract_archive", refuse)


# --- registration and arguments ---------------------------------------------------------------------


def test_registered_through_the_entry_point_with_typed_defaults(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    registry = build_registry(strict=False)  # another plugin's failure must not fail this test
    for name in ("swissroll", "gaussian", "mnist", "cifar10"):
        component = registry.get("data", name)
        assert component.plugin.name == "builtin-datasets"
        for argument in component.arguments.values():
            assert not argument.required, f"{name}.{argument.name} needs a default"
            assert argument.annotation is not Any, f"{name}.{argument.name} needs a type hint"
    assert {"root", "download", "logit_alpha"} <= set(registry.get("data", "mnist").arguments)
    assert {"root", "download", "logit_alpha", "hflip"} <= set(registry.get("data", "cifar10").arguments)
    assert {"n", "n_test", "seed"} <= set(registry.get("data", "swissroll").arguments)
    val_defaults = {"swissroll": 2000, "gaussian": 2000, "mnist": 5000, "cifar10": 5000}
    for name, n_val in val_defaults.items():  # every built-in set offers a val split by default
        assert registry.get("data", name).arguments["n_val"].default == n_val
    for name in ("mnist", "cifar10"):
        assert registry.get("data", name).arguments["split_seed"].default == 0


def test_yaml_values_fit_the_gaussian_schema():
    schema = build_registry(strict=False).get("data", "gaussian").arguments
    given = {"dim": 2, "mean": [1, 2], "scales": [0.5, 1], "std": "1e0"}
    checked = check_arguments(given, schema, "exp.yaml: data", "gaussian")
    assert checked == {"dim": 2, "mean": (1.0, 2.0), "scales": (0.5, 1.0), "std": 1.0}
    assert gaussian(n=10, n_test=10, **checked).log_prob.mean.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "factory, kwargs, argument",
    [
        (swissroll, {"n": 0}, "n"),
        (swissroll, {"n_test": -1}, "n_test"),
        (swissroll, {"noise": -0.1}, "noise"),
        (swissroll, {"n_val": 0}, "n_val"),
        (gaussian, {"n_val": -1}, "n_val"),
        (gaussian, {"dim": 0}, "dim"),
        (gaussian, {"n": 0}, "n"),
        (gaussian, {"std": 0.0}, "std"),
        (gaussian, {"dim": 3, "scales": (1.0, 2.0)}, "scales"),
        (gaussian, {"dim": 2, "scales": (1.0, 0.0)}, "scales"),
        (gaussian, {"dim": 2, "mean": (1.0, 2.0, 3.0)}, "mean"),
        (mnist, {"logit_alpha": 0.5, "root": "/nonexistent"}, "logit_alpha"),
        (cifar10, {"logit_alpha": -0.1, "root": "/nonexistent"}, "logit_alpha"),
        (mnist, {"n_val": -1, "root": "/nonexistent"}, "n_val"),  # checked before the files are looked for
        (cifar10, {"n_val": -1, "root": "/nonexistent"}, "n_val"),
    ],
)
def test_bad_arguments_name_the_argument(factory, kwargs, argument):
    with pytest.raises(InvalidArgument) as info:
        factory(**kwargs)
    assert info.value.argument == argument


# --- Swiss roll -----------------------------------------------------------------------------------


def test_swissroll_shapes_and_kind():
    bundle = swissroll(n=500, n_test=100)
    assert bundle.train.shape == (500, 2) and bundle.test.shape == (100, 2) and bundle.val.shape == (2000, 2)
    assert bundle.train.dtype == torch.float32
    assert bundle.shape == (2,) and bundle.kind == "vector" and bundle.log_prob is None
    assert isinstance(bundle.transform, Identity)


def test_swissroll_is_determined_by_its_seed():
    a, b, c = swissroll(n=300, seed=1), swissroll(n=300, seed=1), swissroll(n=300, seed=2)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.allclose(a.train, c.train)
    assert not torch.allclose(a.train[:100], a.test[:100])  # independent splits
    assert torch.equal(swissroll(n=50, seed=1).test, a.test)  # the test set does not depend on n


def test_swissroll_is_roughly_unit_scale_and_a_roll():
    bundle = swissroll(n=20000, noise=0.0)
    std = bundle.train.std(dim=0)
    assert ((std > 0.7) & (std < 2.0)).all(), std
    # Without noise, the radius equals the scaled angle t ∈ [1.5π, 4.5π].
    radius = bundle.train.norm(dim=1) / 0.2
    assert radius.min() >= 1.5 * math.pi - 1e-3 and radius.max() <= 4.5 * math.pi + 1e-3


# --- Gaussian -------------------------------------------------------------------------------------


def test_gaussian_log_prob_matches_scipy():
    bundle = gaussian(dim=3, n=10, n_test=10, seed=4)
    density = bundle.log_prob
    points = torch.cat([bundle.test, torch.randn(5, 3, dtype=torch.float32)])
    expected = multivariate_normal(density.mean.numpy(), density.cov.numpy()).logpdf(points.double().numpy())
    assert torch.allclose(density(points).double(), torch.from_numpy(expected), atol=1e-5)
    assert density(points).dtype == torch.float32


def test_gaussian_samples_have_the_stated_moments():
    bundle = gaussian(dim=3, n=40000, n_test=10, std=2.0, seed=5)
    density = bundle.log_prob
    x = bundle.train.double()
    assert torch.allclose(x.mean(0), density.mean, atol=0.06)
    assert torch.allclose(torch.cov(x.T), density.cov, atol=0.12)
    # Non-trivial: a non-zero mean and a covariance that is not a multiple of the identity.
    off_diagonal = density.cov - torch.diag(torch.diagonal(density.cov))
    assert density.mean.abs().max() > 0.1 and off_diagonal.abs().max() > 0.05


def test_gaussian_explicit_mean_and_scales_without_rotation():
    bundle = gaussian(dim=2, n=10, n_test=10, mean=(1.0, -2.0), scales=(0.5, 3.0), rotate=False)
    assert torch.equal(bundle.log_prob.mean, torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert torch.allclose(bundle.log_prob.cov, torch.diag(torch.tensor([0.25, 9.0], dtype=torch.float64)))
    assert torch.equal(
        gaussian(dim=3, n=10, n_test=10, mean=0.5).log_prob.mean, torch.full((3,), 0.5).double()
    )


def test_gaussian_is_determined_by_its_seed():
    a, b, c = (gaussian(dim=2, n=100, n_test=10, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train, b.train) and torch.equal(a.log_prob.cov, b.log_prob.cov)
    assert not torch.allclose(a.log_prob.cov, c.log_prob.cov)


def test_gaussian_score_of_the_diffused_marginal_matches_autograd():
    density = gaussian(dim=3, n=10, n_test=10, seed=6).log_prob
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([1.0, 0.8, 0.3, 0.05], dtype=torch.float64)
    sigma = torch.sqrt(1 - m**2)
    covs = m[:, None, None] ** 2 * density.cov + sigma[:, None, None] ** 2 * torch.eye(3, dtype=torch.float64)
    marginal = torch.distributions.MultivariateNormal(m[:, None] * density.mean, covariance_matrix=covs)
    log_p = marginal.log_prob(y)
    (score,) = torch.autograd.grad(log_p.sum(), y)
    assert torch.allclose(density.marginal_log_prob(y.detach(), m, sigma), log_p.detach(), atol=1e-10)
    assert torch.allclose(density.score(y.detach(), m, sigma), score, atol=1e-10)
    assert torch.allclose(density.marginal_log_prob(y.detach()), density(y.detach()), atol=1e-10)


def _streams_before_val_splits(seed: int) -> list[torch.Generator]:
    """The toy data sets' (parameters, train, test) generators as derived before val splits existed."""
    seeds = torch.randint(2**62, (3,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_toy_train_and_test_are_those_from_before_val_splits():
    """Adding the val stream leaves every seed's train and test points bit-identical, so results in
    existing run folders stay comparable."""
    _, train_gen, test_gen = _streams_before_val_splits(3)
    roll = swissroll(n=300, n_test=50, seed=3)
    assert torch.equal(roll.train, swissroll_points(300, 0.5, 0.2, train_gen))
    assert torch.equal(roll.test, swissroll_points(50, 0.5, 0.2, test_gen))
    params, train_gen, test_gen = _streams_before_val_splits(3)
    bundle = gaussian(dim=3, n=300, n_test=50, seed=3)
    u_mean, _ = torch.rand(2, 3, generator=params, dtype=torch.float64)
    assert torch.equal(bundle.log_prob.mean, 2 * u_mean - 1)  # the parameters' stream is the old one too
    assert torch.equal(bundle.train, bundle.log_prob.sample(300, generator=train_gen))
    assert torch.equal(bundle.test, bundle.log_prob.sample(50, generator=test_gen))


def test_toy_val_is_drawn_from_its_own_hashed_stream():
    def val_gen():
        return torch.Generator().manual_seed(derive_seed(3, "val"))

    roll = swissroll(n=10, n_test=10, n_val=40, seed=3)
    assert torch.equal(roll.val, swissroll_points(40, 0.5, 0.2, val_gen()))
    bundle = gaussian(dim=2, n=10, n_test=10, n_val=40, seed=3)
    assert torch.equal(bundle.val, bundle.log_prob.sample(40, generator=val_gen()))


@pytest.mark.parametrize("factory", [swissroll, gaussian])
def test_toy_val_is_held_out_and_does_not_depend_on_n(factory):
    bundle = factory(n=300, n_test=50, n_val=40, seed=3)
    assert bundle.val.shape == (40, 2) and bundle.val.dtype == torch.float32
    for split in (bundle.train, bundle.test):  # no val point is a train or test point
        assert torch.cdist(bundle.val, split).min() > 0
    assert torch.equal(factory(n=100, n_test=20, n_val=40, seed=3).val, bundle.val)
    assert torch.equal(factory(n=300, n_test=50, n_val=40, seed=3).val, bundle.val)
    assert not torch.allclose(factory(n=300, n_test=50, n_val=40, seed=4).val, bundle.val)


# --- MNIST ----------------------------------------------------------------------------------------


def test_mnist_round_trips_through_torchvision(tmp_path):
    written = write_mnist(tmp_path, n_train=20, n_test=10)
    bundle = mnist(root=str(tmp_path), download=False, n_val=0)  # no hold-out: train is every training file
    assert bundle.shape == (1, 28, 28) and bundle.kind == "image" and bundle.train_shuffle
    assert bundle.val is None
    assert isinstance(bundle.transform, Logit) and bundle.levels == 256 and bundle.transform.bits_offset == 0
    assert isinstance(mnist(root=str(tmp_path), download=False, n_val=0, logit_alpha=None).transform, UnitInterval)
    assert len(bundle.train) == 20 and len(bundle.test) == 10
    splits = [
        (bundle.train, written.train, written.train_labels),
        (bundle.test, written.test, written.test_labels),
    ]
    for split, images, labels in splits:
        x, y = stack(split)
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.float32
        assert torch.allclose(x * 255, torch.from_numpy(images).float(), atol=1e-4)
        assert torch.equal(as_bytes(x), torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels).long())


def test_mnist_missing_names_folder_and_files(tmp_path):
    with pytest.raises(DataError) as info:
        mnist(root=str(tmp_path / "nowhere"), download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert all(
        name in message for name in ("MNIST/raw/", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    )
    assert "download: true" in message


def test_mnist_partial_folder_says_what_is_missing(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\)"):
        mnist(root=str(tmp_path), download=False)


def test_mnist_failed_download_is_a_data_error(tmp_path, no_network):
    with pytest.raises(DataError) as info:
        mnist(root=str(tmp_path), download=True)
    message = str(info.value)
    assert "\n" not in message and "download failed" in message
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert socket.getdefaulttimeout() is None  # the download's timeout is not left behind


def test_mnist_corrupt_file_is_a_data_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d")
    with pytest.raises(DataError, match="unreadable or corrupted"):
        mnist(root=str(tmp_path), download=False)


def test_dequantized_mnist_has_the_closed_form_log_det(tmp_path):
    """MATH.md §5: z = logit(s), s = α + (1 − 2α) x̃, log|det| = Σ_d [log(1 − 2α) − log(s_d (1 − s_d))]."""
    write_mnist(tmp_path, n_train=8, n_test=4)
    bundle = mnist(root=str(tmp_path), download=False, logit_alpha=0.05, n_val=2)
    x, _ = stack(bundle.test)
    space = ModelSpace(bundle.transform, bundle.levels, Uniform())
    z, log_det, log_q = space(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == x.shape and torch.isfinite(z).all() and log_det.shape == (4,)
    alpha, D = 0.05, 28 * 28
    # Recomputed from z alone: s = σ(z), and −log(s(1 − s)) = softplus(z) + softplus(−z).
    softplus = torch.nn.functional.softplus
    expected = D * math.log(1 - 2 * alpha) + (softplus(z) + softplus(-z)).flatten(1).sum(1)
    assert torch.allclose(log_det, expected, rtol=1e-5)
    # x̃ lies in its pixel's bin [k/256, (k + 1)/256).
    x_tilde = (torch.sigmoid(z.double()) - alpha) / (1 - 2 * alpha)
    assert torch.equal(torch.floor(x_tilde * 256).to(torch.uint8), as_bytes(x))
    # The uniform density on [0, 1)^D, pushed to z, has exactly 8 bits per dimension.
    bpd = bits_per_dim(-log_det, log_det, D, space.bits_offset, log_q)
    assert torch.allclose(bpd, torch.full_like(bpd, 8.0))


def test_hold_out_indices_come_from_a_permutation_seeded_by_split_seed_and_name():
    generator = torch.Generator().manual_seed(derive_seed(7, "val-split", "cifar10"))
    order = torch.randperm(50, generator=generator).tolist()
    train, val = datasets.hold_out_indices("cifar10", 50, 8, 7)
    assert val == order[:8] and train == sorted(order[8:])
    assert datasets.hold_out_indices("mnist", 50, 8, 7)[1] != val  # the data set's name enters the seed
    train, val = datasets.hold_out_indices("mnist", 60000, 5000, 0)  # the real sizes
    assert len(val) == 5000 and sorted(train + val) == list(range(60000))


def test_mnist_val_is_a_seeded_hold_out_of_the_training_files(tmp_path):
    written = write_mnist(tmp_path, n_train=20, n_test=10)
    bundle = mnist(root=str(tmp_path), download=False, n_val=5)
    train, val = bundle.train, bundle.val
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert val.dataset is train.dataset and val.dataset.train and not bundle.test.train
    assert len(train) == 15 and len(val) == 5 and len(bundle.test) == 10
    assert sorted(train.indices + val.indices) == list(range(20))  # disjoint, and every training file
    assert train.indices == sorted(train.indices)
    x, y = stack(val)
    assert torch.equal(as_bytes(x), torch.from_numpy(written.train[val.indices]))
    assert torch.equal(y, torch.from_numpy(written.train_labels[val.indices]).long())
    x, _ = stack(bundle.test)
    assert torch.equal(as_bytes(x), torch.from_numpy(written.test))  # the test split is unchanged

    def val_indices(**kwargs):
        return mnist(root=str(tmp_path), download=False, **kwargs).val.indices

    assert val_indices(n_val=5) == val.indices
    assert val_indices(n_val=5, split_seed=1) != val.indices
    assert val_indices(n_val=3) == val.indices[:3]  # a smaller hold-out keeps a prefix of a larger one


def test_n_val_must_leave_training_examples(tmp_path, monkeypatch):
    write_mnist(tmp_path, n_train=20, n_test=4)
    write_cifar10(tmp_path, n_train=12, n_test=4)
    use_fake_cifar10_checksums(monkeypatch, tmp_path)
    for factory, n_train in ((mnist, 20), (cifar10, 12)):
        for n_val in (n_train, 5000):
            with pytest.raises(InvalidArgument) as info:
                factory(root=str(tmp_path), download=False, n_val=n_val)
            assert info.value.argument == "n_val"
            assert f"less than the {n_train} training examples" in info.value.message
            assert f"got {n_val}" in info.value.message
        assert len(factory(root=str(tmp_path), download=False, n_val=n_train - 1).train) == 1


# --- CIFAR-10 -------------------------------------------------------------------------------------


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, n_train=12, n_test=6)
    use_fake_cifar10_checksums(monkeypatch, tmp_path)
    return tmp_path, written


def test_cifar10_test_split_round_trips_unflipped(fake_cifar10):
    root, written = fake_cifar10
    bundle = cifar10(root=str(root), download=False, n_val=4)
    assert bundle.shape == (3, 32, 32) and bundle.kind == "image" and bundle.log_prob is None
    assert isinstance(bundle.transform, Logit) and bundle.levels == 256
    for _ in range(2):  # every load and every pass is the same: no augmentation on the test split
        x, y = stack(cifar10(root=str(root), download=False, n_val=4).test)
        assert torch.equal(as_bytes(x), torch.from_numpy(written.test))
        assert torch.equal(y, torch.from_numpy(written.test_labels).long())


def test_cifar10_train_split_flips_sometimes(fake_cifar10):
    root, written = fake_cifar10
    images = torch.from_numpy(written.train)
    torch.manual_seed(0)  # RandomHorizontalFlip draws from the global generator
    x, y = stack(cifar10(root=str(root), download=False, n_val=0).train)
    same = (as_bytes(x) == images).flatten(1).all(1)
    mirrored = (as_bytes(x) == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    assert torch.equal(y, torch.from_numpy(written.train_labels).long())
    x, _ = stack(cifar10(root=str(root), download=False, hflip=False, n_val=0).train)
    assert torch.equal(as_bytes(x), images)


def test_cifar10_val_is_held_out_of_the_training_files_and_never_flipped(fake_cifar10):
    root, written = fake_cifar10
    bundle = cifar10(root=str(root), download=False, n_val=4)
    train, val = bundle.train, bundle.val
    assert sorted(train.indices + val.indices) == list(range(12)) and len(val) == 4
    # A second object over the training files: the train split's flips cannot reach val.
    assert val.dataset is not train.dataset and val.dataset.train
    expected = torch.from_numpy(written.train[val.indices])
    torch.manual_seed(0)  # RandomHorizontalFlip draws from the global generator
    for _ in range(2):
        x, y = stack(val)
        assert torch.equal(as_bytes(x), expected)
        assert torch.equal(y, torch.from_numpy(written.train_labels[val.indices]).long())
    x, _ = stack(train)  # ... while the train split still flips
    assert (as_bytes(x) == torch.from_numpy(written.train[train.indices]).flip(-1)).flatten(1).all(1).any()
    unflipped = cifar10(root=str(root), download=False, n_val=4, hflip=False)
    assert unflipped.val.dataset is unflipped.train.dataset  # nothing to undo: one object serves both
    assert unflipped.val.indices == val.indices
    assert cifar10(root=str(root), download=False, n_val=4, split_seed=1).val.indices != val.indices


def test_cifar10_missing_names_folder_and_files(tmp_path, no_network):
    for download in (False, True):
        with pytest.raises(DataError) as info:
            cifar10(root=str(tmp_path), download=download)
        message = str(info.value)
        assert "\n" not in message and str(tmp_path) in message
        assert all(name in message for name in ("cifar-10-batches-py/", "data_batch_5", "test_batch"))
        assert ("download failed" in message) == download


def test_cifar10_checksum_mismatch_is_a_data_error(tmp_path):
    write_cifar10(tmp_path)  # fake files, real checksum table: torchvision refuses them
    with pytest.raises(DataError, match="unreadable or corrupted"):
        cifar10(root=str(tmp_path), download=False)


def test_fake_writers_use_the_documented_layouts(tmp_path):
    write_mnist(tmp_path, n_train=3, n_test=2)
    header = (tmp_path / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[:16]
    assert header == bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert datasets.missing_files(str(tmp_path), datasets.MNIST_FILES) == []
    write_cifar10(tmp_path, n_train=7)
    assert datasets.missing_files(str(tmp_path), datasets.CIFAR10_FILES) == []
