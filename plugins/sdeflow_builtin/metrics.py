"""The built-in sample-quality metrics (``eval.metrics``, MATH.md §11), registered like any plugin's: ``swd``
and ``mmd`` compare samples with held-out data as they are; ``fid`` and ``kid`` compare Inception-v3
feature statistics (images). The maths is the kernel's (:mod:`sdeflow.quality`)."""

from __future__ import annotations

from typing import Any

import torch

from sdeflow.plugin import (
    Metric,
    Statistics,
    frechet_distance,
    hookimpl,
    kernel_inception_distance,
    mmd,
    sliced_wasserstein,
)


class SlicedWasserstein(Metric):
    """SW₂ over 512 random directions (Bonneel et al. 2015)."""

    space = "data"

    def compare(self, a, b, *, generator: torch.Generator) -> float:
        return sliced_wasserstein(a, b, generator=generator)


class MMD(Metric):
    """Unbiased MMD² with a sum of Gaussian kernels at the median distance (Gretton et al. 2012)."""

    space = "data"

    def compare(self, a, b, *, generator: torch.Generator) -> float:
        return mmd(a, b, generator=generator)


class FID(Metric):
    """Fréchet distance of Inception pool features (Heusel et al. 2017)."""

    space = "inception"

    def compare(self, a: Statistics, b: Statistics, *, generator: torch.Generator) -> float:
        return frechet_distance(a, b)


class KID(Metric):
    """Kernel Inception distance, averaged over 100 subsets (Bińkowski et al. 2018), with its spread."""

    space = "inception"

    def compare(self, a: Statistics, b: Statistics, *, generator: torch.Generator) -> tuple[float, dict[str, Any]]:
        value, std = kernel_inception_distance(a.pool, b.pool, generator=generator)
        return value, {"std": std}


@hookimpl
def sdeflow_register_metrics(register) -> None:
    register("swd", SlicedWasserstein)
    register("mmd", MMD)
    register("fid", FID)
    register("kid", KID)
