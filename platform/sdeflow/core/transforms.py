"""Data → model space (dequantization into bins, logit) and the bits-per-dimension conversion, in one place
for every data set (MATH.md §5, §14)."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor

from .errors import SdeflowError, require
from .interfaces import DataTransform, Dequantizer, flat_sum


class Identity(DataTransform):
    """Continuous data the model sees as it is: z = x, log-det 0, no bits offset."""

    def forward(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z

    def protocol(self) -> dict[str, Any]:
        return {"transform": "identity", "dequantization": "none (continuous data)", "log_det": 0.0,
                "bits_offset": 0.0}


class Logit(DataTransform):
    """x̃ ∈ [0, 1]^D → z = logit(α + (1 − 2α) x̃), the optional step after dequantization (MATH.md §5)."""

    def __init__(self, alpha: float = 0.05):
        require(0 <= alpha < 0.5, "logit_alpha", "must be in [0, 0.5)")
        self.alpha = alpha

    def forward(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor]:
        return logit_transform(x, self.alpha)

    def inverse(self, z: Tensor) -> Tensor:
        return ((torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)).clamp(0, 1)

    def protocol(self) -> dict[str, Any]:
        return {"transform": "logit", "logit_alpha": self.alpha, "log_det": "included: bpd is of x~ in [0,1]^D"}


class UnitInterval(Identity):
    """Dequantized data the model sees as they are, x̃ ∈ [0, 1]^D (no logit): z = x̃, log-det 0; samples
    are clamped back into the unit cube."""

    def inverse(self, z: Tensor) -> Tensor:
        return z.clamp(0, 1)

    def protocol(self) -> dict[str, Any]:
        return {"transform": "none (z = x~)", "log_det": 0.0}


class Affine(DataTransform):
    """x̃ ∈ [0, 1]^D → z = 2x̃ − 1 ∈ [−1, 1]^D (VDM's data space): log|det| = D log 2; samples are clamped
    back into the cube."""

    def forward(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor]:
        return 2 * x - 1, x.new_full((x.shape[0],), x[0].numel() * math.log(2))

    def inverse(self, z: Tensor) -> Tensor:
        return ((z + 1) / 2).clamp(0, 1)

    def protocol(self) -> dict[str, Any]:
        return {"transform": "affine (z = 2 x~ - 1)", "log_det": "included: D log 2"}


def transform_slope(transform: DataTransform, x: Tensor) -> Tensor:
    """dz/dx̃ of an elementwise transform at x̃ = ``x``, per element (by autograd, so any transform works)."""
    with torch.enable_grad():
        leaf = x.detach().double().requires_grad_(True)
        z, _ = transform.forward(leaf)
        (slope,) = torch.autograd.grad(z.sum(), leaf)
    return slope.to(x.dtype)


def truncated_normal_draw(shape, tau: Tensor | float, *, generator=None, device=None) -> Tensor:
    """w ~ N(0, 1) truncated to [−τ, τ] (τ a scalar or per element), by inverting the CDF in float64."""
    tau = torch.as_tensor(tau, dtype=torch.float64, device=device)
    r = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    low = torch.special.ndtr(-tau)
    return torch.maximum(torch.minimum(torch.special.ndtri(low + r * (1 - 2 * low)), tau), -tau)


def truncated_normal_log_q(w: Tensor, tau: Tensor | float) -> Tensor:
    """log q(u) of u = ½ + w/(2τ), w ~ N(0, 1) on [−τ, τ], summed per example (MATH.md §14):
    Σ_d [−w_d²/2 − ½ log 2π + log 2τ_d − log Z_d], Z = Φ(τ) − Φ(−τ)."""
    tau = torch.as_tensor(tau, dtype=w.dtype, device=w.device)
    per_dim = -0.5 * w**2 - 0.5 * math.log(2 * math.pi) + torch.log(2 * tau) - torch.log(torch.erf(tau / math.sqrt(2)))
    return flat_sum(per_dim.expand_as(w))


def into_bins(x: Tensor, u: Tensor, levels: int) -> Tensor:
    """x̃ = (x (L−1) + u)/L: u ∈ [0, 1]^D places x ∈ {0..L−1}/(L−1) inside its bin of width 1/L (MATH.md §14)."""
    return (x * (levels - 1) + u) / levels


@attrs.define(eq=False)
class ModelSpace:
    """Data x → x̃ (dequantized by ``dequantizer`` when the data are discrete: ``levels`` L) → z (``transform``),
    with the two log-densities every bpd needs: log|det ∂z/∂x̃| and log q(u | x) (MATH.md §5, §14)."""

    transform: DataTransform
    levels: int | None = None
    dequantizer: Dequantizer | None = None

    def __attrs_post_init__(self) -> None:
        if self.levels is not None and self.dequantizer is None:
            raise SdeflowError(f"discrete data ({self.levels} levels) need a dequantizer to be evaluated as a density")

    def __call__(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor, Tensor]:
        """(z, log|det ∂z/∂x̃|, log q(u | x)), the last two per example; log q is 0 for continuous data."""
        if self.levels is None:
            z, log_det = self.transform.forward(x, generator=generator)
            return z, log_det, torch.zeros_like(log_det)
        u, log_q = self.dequantizer.sample(x, self.levels, generator=generator)
        z, log_det = self.transform.forward(into_bins(x, u, self.levels))
        return z, log_det, log_q

    @property
    def bits_offset(self) -> float:
        """log₂ L for discrete data (the bin width 1/L per dimension), plus the transform's own."""
        return self.transform.bits_offset + (math.log2(self.levels) if self.levels is not None else 0.0)

    def inverse(self, z: Tensor) -> Tensor:
        return self.transform.inverse(z)

    def to(self, device: torch.device) -> ModelSpace:
        """Moves a dequantizer with parameters to ``device``."""
        if isinstance(self.dequantizer, torch.nn.Module):
            self.dequantizer.to(device)
        return self

    def protocol(self, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a reported bpd assumes: the transform, the dequantizer (``spec``: its config) and the offset."""
        out = self.transform.protocol()
        if self.levels is None:
            out["dequantization"] = "none (continuous data)"
        else:
            out["dequantization"] = self.dequantizer.protocol()
            out["dequantizer"] = dict(spec or {"name": type(self.dequantizer).__name__})
            out["levels"] = self.levels
        out["bits_offset"] = self.bits_offset
        return out


def logit_transform(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """z = logit(s), s = α + (1 − 2α) x; log|det| = Σ_d [log(1 − 2α) − log(s_d (1 − s_d))] (MATH.md §5)."""
    s = alpha + (1 - 2 * alpha) * x
    z = torch.log(s) - torch.log1p(-s)
    log_det = flat_sum(math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s))
    return z, log_det


def bits_per_dim(log_likelihood_z: Tensor, log_det: Tensor, dim: int, bits_offset: float,
                 log_q: Tensor | float = 0.0) -> Tensor:
    """bpd = −(log p(z) + log|det ∂z/∂x̃| − log q(u | x)) / (D ln 2) + log₂ L (MATH.md §5, §14), per example."""
    return -(log_likelihood_z + log_det - log_q) / (dim * math.log(2)) + bits_offset
