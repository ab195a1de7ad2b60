"""Training losses: denoising score matching and the negative ELBO (MATH.md §4–5, §9)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sdeflow.plugin import (
    Loss,
    TimeSampler,
    bcast,
    check_probe,
    dsm_elbo,
    elbo,
    flat_sum,
    hookimpl,
    randn_like,
    require,
    require_linear_drift,
)


def dsm_per_time(model, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """ℓ(x, t) = ½ ‖a(y, t) σ(t)/g(t) + ε‖², y = m(t) x + σ(t) ε (MATH.md §4)."""
    sde = model.sde
    y = sde.marginal_sample(x, t, eps)
    a = model.a(y, t)
    return 0.5 * flat_sum((a * bcast(sde.sigma(t) / sde.g(t), x) + eps) ** 2)


class DSM(Loss):
    """Denoising score matching, (w(t)/q(t)) ℓ(x, t) with w = 1 (``sigma2``) or g²/σ² truncated below t_ε
    (``likelihood``), so every time sampler estimates the same objective without bias (MATH.md §4)."""

    def __init__(self, weighting: Literal["sigma2", "likelihood"] = "sigma2"):
        require(weighting in ("sigma2", "likelihood"), "weighting", "must be 'sigma2' or 'likelihood'")
        self.weighting = weighting

    def weight(self, sde, t: Tensor) -> Tensor:
        return torch.ones_like(t) if self.weighting == "sigma2" else sde.truncated_likelihood_weight(t)

    @property
    def matched_time_sampler_fix(self) -> str | None:
        """What makes an importance sampler of the likelihood weight (``debiased``) match this loss."""
        return "set loss.weighting=likelihood (the paper's --debias=True)" if self.weighting == "sigma2" else None

    def __call__(self, model, x: Tensor, time_sampler: TimeSampler, *, generator=None) -> Tensor:
        t, q = time_sampler.sample(model.sde, x.shape[0], device=x.device, generator=generator)
        t, q = t.to(x.dtype), q.to(x.dtype)
        eps = randn_like(x, generator)
        return self.weight(model.sde, t) / q * dsm_per_time(model, x, t, eps)


class NegativeELBO(Loss):
    """−ELBO(x) of the plug-in reverse SDE as a training loss: ``form: divergence`` (MATH.md §5, a
    Hutchinson divergence differentiated twice) or ``form: denoising`` (MATH.md §9, the same bound with
    one network evaluation and a first-order gradient per draw above t_ε; needs an SDE with linear drift).

    A bound on −log p(x) whatever the forward process, so it trains a trainable SDE and dequantizer too."""

    trains = frozenset({"parameterization", "sde", "time_sampler", "loss", "dequantizer"})

    def __init__(self, probe: Literal["rademacher", "gaussian"] = "rademacher",
                 form: Literal["divergence", "denoising"] = "divergence"):
        check_probe(probe)
        require(probe != "exact", "probe", "exact divergence is for evaluation, not training")
        require(form in ("divergence", "denoising"), "form", f"must be 'divergence' or 'denoising', got {form!r}")
        self.probe, self.form = probe, form

    def check_sde(self, sde) -> None:
        """The denoising form needs f = κ(t) y (MATH.md §9)."""
        if self.form == "denoising":
            require_linear_drift(sde, "form")

    def __call__(self, model, x: Tensor, time_sampler: TimeSampler, *, generator=None) -> Tensor:
        bound = dsm_elbo if self.form == "denoising" else elbo
        return -bound(model, x, time_sampler, probe=self.probe, generator=generator, create_graph=True)


@hookimpl
def sdeflow_register_losses(register):
    register("dsm", DSM)
    register("elbo", NegativeELBO)
