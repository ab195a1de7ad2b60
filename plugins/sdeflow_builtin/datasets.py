"""Built-in data sets: a 2-D Swiss roll, an N-D Gaussian with a known density, MNIST and CIFAR-10 (and,
registered here from their own modules, downsampled ImageNet and folders of images).

Each factory returns a :class:`sdeflow.interfaces.DataBundle` with train, val and test splits. Toy
data are generated in memory from ``seed`` (train, val and test from independent streams, so neither
held-out split changes with ``n``); images come from torchvision's own classes as x ∈ {0..255}/255 with
``levels`` 256: the experiment's dequantizer places them in their bins and the logit transform
(:class:`~sdeflow.transforms.Logit`, unless ``logit_alpha`` is null) follows, so bits per dimension
are computed the same way everywhere (MATH.md §5, §14). Their val split is a seeded hold-out of
``n_val`` training images (:func:`hold_out`), read without augmentation; the test split is the official
test files.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from sdeflow.plugin import Affine, DataBundle, DataError, Identity, Logit, UnitInterval, derive_seed, hookimpl, require

from .augment import Augment, check_augment

MNIST_FILES = tuple(
    f"MNIST/raw/{split}-{part}-ubyte"
    for split in ("train", "t10k")
    for part in ("images-idx3", "labels-idx1")
)
"""What torchvision's MNIST reads, relative to ``root``."""

CIFAR10_FILES = tuple(
    f"cifar-10-batches-py/{name}"
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
)
"""What torchvision's CIFAR10 reads, relative to ``root``."""

DOWNLOAD_SOCKET_TIMEOUT_S = 30.0
"""torchvision opens URLs without a timeout; without one a download behind a silent firewall hangs."""


# ---------------------------------------------------------------------------------------------------
# Toy data


def _streams(seed: int) -> tuple[torch.Generator, torch.Generator, torch.Generator, torch.Generator]:
    """Independent generators for (parameters, train split, test split, val split), all from ``seed``.

    The first three are drawn from one root generator, as before val splits existed; the val stream is
    hashed from (seed, "val") instead of being a fourth draw, so it cannot shift them: train and test
    points for a seed are the same as in runs made before.
    """
    root = torch.Generator().manual_seed(seed)
    seeds = torch.randint(2**62, (3,), generator=root).tolist()
    params, train, test = (torch.Generator().manual_seed(s) for s in seeds)
    val = torch.Generator().manual_seed(derive_seed(seed, "val"))
    return params, train, test, val


def _check_sizes(n: int, n_test: int, n_val: int) -> None:
    require(n > 0, "n", f"must be positive, got {n}")
    require(n_test > 0, "n_test", f"must be positive, got {n_test}")
    require(n_val > 0, "n_val", f"must be positive, got {n_val}")


def swissroll_points(n: int, noise: float, scale: float, generator: torch.Generator) -> Tensor:
    """(n, 2) points: t = 1.5π(1 + 2u), (t cos t, t sin t) + noise·ε, times ``scale``."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    roll = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return scale * (roll + noise * torch.randn(n, 2, generator=generator))


def swissroll(
    n: int = 20000,
    n_test: int = 2000,
    noise: float = 0.5,
    scale: float = 0.2,
    seed: int = 0,
    n_val: int = 2000,
) -> DataBundle:
    """2-D Swiss roll (scikit-learn's make_swiss_roll in the x–z plane); scale 0.2 is the reference's /5."""
    _check_sizes(n, n_test, n_val)
    require(noise >= 0, "noise", f"must be non-negative, got {noise}")
    require(scale > 0, "scale", f"must be positive, got {scale}")
    _, train_gen, test_gen, val_gen = _streams(seed)
    return DataBundle(
        train=swissroll_points(n, noise, scale, train_gen),
        val=swissroll_points(n_val, noise, scale, val_gen),
        test=swissroll_points(n_test, noise, scale, test_gen),
        shape=(2,),
        transform=Identity(),
        kind="vector",
    )


class GaussianDensity:
    """N(μ₀, Σ₀) in closed form: the exact data log-density, and the score of the diffused marginal.

    For data x ~ N(μ₀, Σ₀) and Y_t | x ~ N(m x, σ² I), Y_t ~ N(m μ₀, m² Σ₀ + σ² I) (MATH.md §5): the
    oracle that tests of losses, samplers and the ELBO compare against. ``mean`` and ``cov`` are
    float64; results come back in the input's dtype.
    """

    def __init__(self, mean: Tensor, cov: Tensor):
        self.mean = mean.to(torch.float64)
        self.cov = cov.to(torch.float64)
        # Σ₀ = Q diag(λ) Qᵀ makes m² Σ₀ + σ² I diagonal in the same basis for every (m, σ).
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def __call__(self, x: Tensor) -> Tensor:
        """log N(x; μ₀, Σ₀) per example, shape (B,)."""
        normal = torch.distributions.MultivariateNormal(
            self.mean.to(x.device), covariance_matrix=self.cov.to(x.device)
        )
        return normal.log_prob(x.to(torch.float64)).to(x.dtype)

    def _whiten(self, y: Tensor, m: float | Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates of y − m μ₀ in the eigenbasis, and the per-axis variances m² λ + σ²."""
        y64 = y.to(torch.float64)
        m = torch.as_tensor(m, dtype=torch.float64, device=y.device).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1, 1)
        Q = self.eigenvectors.to(y.device)
        coords = (y64 - m * self.mean.to(y.device)) @ Q
        return coords, m**2 * self.eigenvalues.to(y.device) + sigma**2

    def marginal_log_prob(self, y: Tensor, m: float | Tensor = 1.0, sigma: float | Tensor = 0.0) -> Tensor:
        """log N(y; m μ₀, m² Σ₀ + σ² I) per example; m and σ are numbers or per-example (B,) tensors."""
        coords, variances = self._whiten(y, m, sigma)
        quadratic = (coords**2 / variances).sum(dim=1)
        log_det = torch.log(variances).sum(dim=1)
        return (-0.5 * (quadratic + log_det + self.dim * math.log(2 * math.pi))).to(y.dtype)

    def score(self, y: Tensor, m: float | Tensor = 1.0, sigma: float | Tensor = 0.0) -> Tensor:
        """∇_y log N(y; m μ₀, m² Σ₀ + σ² I) = −(m² Σ₀ + σ² I)⁻¹ (y − m μ₀)."""
        coords, variances = self._whiten(y, m, sigma)
        return (-(coords / variances) @ self.eigenvectors.to(y.device).T).to(y.dtype)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n float32 draws from N(μ₀, Σ₀)."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        root = self.eigenvectors * self.eigenvalues.clamp(min=0).sqrt()
        return (self.mean + eps @ root.T).float()


def random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, with R's diagonal made positive)."""
    Q, R = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def _axis_values(value: float | Sequence[float] | None, dim: int, name: str, drawn: Tensor) -> Tensor:
    """A per-axis vector from a number (every axis), a sequence of ``dim`` numbers, or None (``drawn``)."""
    if value is None:
        return drawn
    if isinstance(value, (int, float)):
        return torch.full((dim,), float(value), dtype=torch.float64)
    require(len(value) == dim, name, f"needs {dim} values (dim), got {len(value)}")
    return torch.tensor([float(v) for v in value], dtype=torch.float64)


def gaussian(
    dim: int = 2,
    n: int = 20000,
    n_test: int = 2000,
    mean: float | tuple[float, ...] | None = None,
    std: float = 1.0,
    scales: tuple[float, ...] | None = None,
    rotate: bool = True,
    seed: int = 0,
    n_val: int = 2000,
) -> DataBundle:
    """N-D Gaussian N(μ₀, R diag(scales²) Rᵀ) with its exact log-density; drawn from ``seed`` when unset.

    ``mean`` None draws each coordinate from U[−std, std]; ``scales`` None draws them from
    U[0.5 std, 1.5 std]; ``rotate`` applies a random rotation R, so the covariance is not diagonal.
    """
    require(dim > 0, "dim", f"must be positive, got {dim}")
    _check_sizes(n, n_test, n_val)
    require(std > 0, "std", f"must be positive, got {std}")
    params, train_gen, test_gen, val_gen = _streams(seed)
    # Always drawn, so that setting the mean or the scales leaves the rotation unchanged.
    u_mean, u_scale = torch.rand(2, dim, generator=params, dtype=torch.float64)
    mu = _axis_values(mean, dim, "mean", std * (2 * u_mean - 1))
    axis_std = _axis_values(scales, dim, "scales", std * (0.5 + u_scale))
    require(bool((axis_std > 0).all()), "scales", f"must all be positive, got {axis_std.tolist()}")
    R = random_rotation(dim, params) if rotate else torch.eye(dim, dtype=torch.float64)
    density = GaussianDensity(mu, (R * axis_std**2) @ R.T)
    return DataBundle(
        train=density.sample(n, generator=train_gen),
        val=density.sample(n_val, generator=val_gen),
        test=density.sample(n_test, generator=test_gen),
        shape=(dim,),
        transform=Identity(),
        kind="vector",
        log_prob=density,
    )


# ---------------------------------------------------------------------------------------------------
# Images


def missing_files(root: str, files: Sequence[str]) -> list[str]:
    """The entries of ``files`` (relative to ``root``) that are not there."""
    return [f for f in files if not os.path.isfile(os.path.join(root, f))]


def _describe(files: Sequence[str]) -> str:
    folder = os.path.dirname(files[0])
    return f"{folder}/ holding {', '.join(os.path.basename(f) for f in files)}"


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _ensure_present(
    name: str, root: str, files: Sequence[str], download: bool, fetch: Callable[[], object]
) -> None:
    """Return once every file is in ``root``: download if allowed, else raise a one-line DataError."""
    missing = missing_files(root, files)
    if not missing:
        return
    where = os.path.abspath(root)
    expected = f"expected {_describe(files)}"
    if len(missing) < len(files):
        expected += f" (missing {', '.join(os.path.basename(f) for f in missing)})"
    if not download:
        raise DataError(f"{name} not found in {where}: {expected}; set data.root or download: true")
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            fetch()
    except Exception as e:  # no network, a moved mirror, a full disk: all the user's to fix
        raise DataError(
            f"{name} not found in {where} and the download failed ({_one_line(e)}): {expected}; "
            "set data.root to a folder holding them"
        ) from None
    still = missing_files(root, files)
    if still:
        raise DataError(f"{name} download into {where} did not produce {', '.join(still)}")


def _open(name: str, root: str, make: Callable[[], object]):
    """Build a torchvision data set whose files are known to exist; a failure means they are bad."""
    try:
        return make()
    except Exception as e:  # torchvision raises RuntimeError, pickle, assertion or value errors alike
        raise DataError(
            f"{name} in {os.path.abspath(root)} is unreadable or corrupted ({_one_line(e)}); "
            "delete it and download again"
        ) from None


def check_n_val(n_val: int) -> None:
    require(n_val >= 0, "n_val", f"must be non-negative (0: no val split), got {n_val}")


def hold_out_indices(name: str, n_train: int, n_val: int, split_seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): a split of range(n_train) that depends only on (split_seed, name).

    A permutation seeded from derive_seed(split_seed, "val-split", name) puts its first ``n_val``
    entries in val, in the permutation's order (so any prefix of val is a uniform sample, and a
    smaller n_val keeps a prefix of a larger one's val); the rest are train, in file order.
    """
    require(
        n_val < n_train,
        "n_val",
        f"must be less than the {n_train} training examples of {name} (the rest are trained on), got {n_val}; "
        f"set data.n_val (e.g. {n_train // 10}, a tenth) for a set this small",
    )
    generator = torch.Generator().manual_seed(derive_seed(split_seed, "val-split", name))
    order = torch.randperm(n_train, generator=generator)
    return order[n_val:].sort().values.tolist(), order[:n_val].tolist()


def _hold_out(name: str, train, n_val: int, split_seed: int, unaugmented: Callable[[], object] | None = None):
    """(train, val) Subsets of the training files, or (train, None) when n_val is 0.

    ``unaugmented`` opens the training files again without augmentation, for val; None when ``train``
    has none, and then val shares its object.
    """
    if n_val == 0:
        return train, None
    train_indices, val_indices = hold_out_indices(name, len(train), n_val, split_seed)
    val_source = train if unaugmented is None else unaugmented()
    return Subset(train, train_indices), Subset(val_source, val_indices)


def hold_out_split(name: str, files: Dataset, n_val: int, split_seed: int, train_view: Dataset | None = None
                   ) -> tuple[Dataset, Dataset | None]:
    """(train, val) as :func:`_hold_out` splits them, with index arrays instead of lists (a million
    indices pickle to DataLoader workers and sit in their memory at 8 bytes each, not ~36): val reads
    ``files`` as stored, train reads ``train_view`` (the same files augmented; None: ``files``)."""
    train_view = files if train_view is None else train_view
    if n_val == 0:
        return train_view, None
    train_indices, val_indices = hold_out_indices(name, len(files), n_val, split_seed)
    as_array = partial(np.asarray, dtype=np.int64)
    return Subset(train_view, as_array(train_indices)), Subset(files, as_array(val_indices))


def image_transform(logit_alpha: float | None, affine: bool = False) -> Logit | UnitInterval | Affine:
    """What follows dequantization: the logit with ``logit_alpha``, or nothing when it is null; with
    ``affine``, VDM's z = 2x̃ − 1 instead (``logit_alpha`` must then be null)."""
    if affine:
        require(logit_alpha is None, "affine", "replaces the logit: set logit_alpha: null with affine: true")
        return Affine()
    return UnitInterval() if logit_alpha is None else Logit(logit_alpha)


def mnist(
    root: str = "data",
    download: bool = True,
    logit_alpha: float | None = 0.05,
    n_val: int = 5000,
    split_seed: int = 0,
    affine: bool = False,
) -> DataBundle:
    """MNIST (torchvision): 1×28×28 images of 256 levels; the model sees logit(α + (1 − 2α)x̃) of the
    dequantized x̃, x̃ itself when α is null, or 2x̃ − 1 with ``affine`` (VDM's space; α null).

    ``n_val`` of the 60,000 training images, chosen by ``split_seed``, are held out as val (0: none).
    """
    from torchvision import datasets, transforms

    transform = image_transform(logit_alpha, affine)  # validates α before any disk or network access
    check_n_val(n_val)
    root = os.path.expanduser(root)
    _ensure_present("MNIST", root, MNIST_FILES, download, partial(datasets.MNIST, root, download=True))
    to_tensor = transforms.ToTensor()
    train = _open("MNIST", root, lambda: datasets.MNIST(root, train=True, transform=to_tensor))
    test = _open("MNIST", root, lambda: datasets.MNIST(root, train=False, transform=to_tensor))
    reference = train
    train, val = _hold_out("mnist", train, n_val, split_seed)
    return DataBundle(
        train, test, shape=(1, 28, 28), transform=transform, kind="image", train_shuffle=True, val=val,
        reference=reference, levels=256,
    )


def cifar10(
    root: str = "data",
    download: bool = True,
    logit_alpha: float | None = 0.05,
    hflip: bool = True,
    n_val: int = 5000,
    split_seed: int = 0,
    affine: bool = False,
    augment: tuple[str, ...] = (),
) -> DataBundle:
    """CIFAR-10 (torchvision): 3×32×32 images; random horizontal flips on the train split only. The model
    space is MNIST's (``logit_alpha``, ``affine``).

    ``n_val`` of the 50,000 training images, chosen by ``split_seed``, are held out as val (0: none).
    ``augment`` adds random transforms of the train split (:mod:`~sdeflow_builtin.augment`: ``hflip``,
    ``vflip``, ``rot90``, ``channel_permute``; VDM's "with augmentation" runs used hflip and rot90);
    ``hflip: true`` is the ``hflip`` entry, drawn by torchvision's RandomHorizontalFlip as before.
    """
    from torchvision import datasets, transforms

    transform = image_transform(logit_alpha, affine)
    check_n_val(n_val)
    augment = check_augment(augment)
    root = os.path.expanduser(root)
    _ensure_present("CIFAR-10", root, CIFAR10_FILES, download, partial(datasets.CIFAR10, root, download=True))
    to_tensor = transforms.ToTensor()
    # The reference flipped (and shuffled) the test set too; evaluation must see the data as it is.
    applied, train_tf = _cifar10_train_transform(hflip, augment, to_tensor)
    train = _open("CIFAR-10", root, lambda: datasets.CIFAR10(root, train=True, transform=train_tf))
    test = _open("CIFAR-10", root, lambda: datasets.CIFAR10(root, train=False, transform=to_tensor))
    # Val is evaluated like test, so it reads the same training files through a second, unflipped object.
    unflipped = partial(_open, "CIFAR-10", root, lambda: datasets.CIFAR10(root, train=True, transform=to_tensor))
    reference = unflipped() if applied else train  # FID's reference: every training image, unflipped
    train, val = _hold_out("cifar10", train, n_val, split_seed, (lambda: reference) if applied else None)
    protocol = {"name": "cifar10", "splits": {"train": len(train), "val": len(val) if val is not None else 0,
                                              "test": len(test)},
                "val": f"seeded hold-out of the training files (split_seed {split_seed})",
                "test": "the official test batch", "augment": applied}
    return DataBundle(
        train, test, shape=(3, 32, 32), transform=transform, kind="image", train_shuffle=True, val=val,
        reference=reference, levels=256, protocol=protocol,
    )


def _cifar10_train_transform(hflip: bool, augment: tuple[str, ...], to_tensor) -> tuple[list[str], Callable]:
    """(the augmentations applied, the train split's transform): torchvision's RandomHorizontalFlip
    before ToTensor when ``hflip`` (bit-identical to before ``augment`` existed), then ``augment``'s others."""
    from torchvision import transforms

    rest = [name for name in augment if not (hflip and name == "hflip")]
    steps = [transforms.RandomHorizontalFlip()] if hflip else []
    steps += [to_tensor, Augment(rest)] if rest else [to_tensor]
    applied = (["hflip"] if hflip else []) + rest
    return applied, (transforms.Compose(steps) if len(steps) > 1 else to_tensor)


# What each factory's data look like, known without loading them: ``sdeflow check`` builds the network on
# the meta device with it, so the network's own checks run before any data is read.
swissroll.shape = lambda **_: (2,)
gaussian.shape = lambda dim=2, **_: (dim,)
mnist.shape = lambda **_: (1, 28, 28)
cifar10.shape = lambda **_: (3, 32, 32)


@hookimpl
def sdeflow_register_datasets(register) -> None:
    register("swissroll", swissroll)
    register("gaussian", gaussian)
    register("mnist", mnist)
    register("cifar10", cifar10)
    from .image_folder import image_folder  # these import this module's helpers
    from .imagenet import imagenet32, imagenet64

    register("imagenet32", imagenet32)
    register("imagenet64", imagenet64)
    register("image_folder", image_folder)
