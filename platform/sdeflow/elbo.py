"""The ELBO of the plug-in reverse SDE and its divergence estimators (MATH.md §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InvalidArgument
from .interfaces import TimeSampler, bcast, flat_sum, randn_like

PROBES = ("rademacher", "gaussian", "exact")


def check_probe(probe: str) -> str:
    if probe not in PROBES:
        raise InvalidArgument("probe", f"unknown probe {probe!r}; expected one of {', '.join(PROBES)}")
    return probe


def probe_vector(like: Tensor, probe: str, generator=None) -> Tensor:
    """A Hutchinson probe v with E[v vᵀ] = I: Rademacher (±1) or standard Gaussian."""
    v = randn_like(like, generator)
    if probe == "rademacher":
        return v.sign() + (v == 0)
    return v


def divergence(
    out: Tensor, y: Tensor, probe: str = "rademacher", *, v: Tensor | None = None, generator=None,
    create_graph: bool = False,
) -> Tensor:
    """∇_y · out(y) per example: Hutchinson vᵀ(∂out/∂y)v, or exact (D backward passes).

    ``out`` must have been computed from ``y`` with autograd recording.
    """
    check_probe(probe)
    if probe == "exact":
        return exact_divergence(out, y, create_graph=create_graph)
    v = probe_vector(y, probe, generator) if v is None else v
    (vjp,) = torch.autograd.grad(out, y, v, create_graph=create_graph)
    return flat_sum(vjp * v)


def exact_divergence(out: Tensor, y: Tensor, *, create_graph: bool = False) -> Tensor:
    """Σ_d ∂out_d/∂y_d, one backward pass per dimension (the oracle; small D only)."""
    flat = out.reshape(out.shape[0], -1)
    terms = []
    for d in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, d].sum(), y, create_graph=create_graph, retain_graph=True)
        terms.append(grad.reshape(grad.shape[0], -1)[:, d])
    return torch.stack(terms, dim=1).sum(dim=1)


def elbo_integrand(
    model, y: Tensor, t: Tensor, probe: str = "rademacher", *, generator=None, create_graph: bool = False
) -> Tensor:
    """½‖a(y, t)‖² + ∇·μ(y, t) with μ = g a − f, per example (MATH.md §5)."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        a = model.a(y, t)
        mu = bcast(model.sde.g(t), y) * a - model.sde.f(y, t)
        div = divergence(mu, y, probe, generator=generator, create_graph=create_graph)
        value = 0.5 * flat_sum(a**2) + div
    return value if create_graph else value.detach()


def elbo(
    model,
    x: Tensor,
    time_sampler: TimeSampler,
    *,
    probe: str = "rademacher",
    samples: int = 1,
    generator=None,
    create_graph: bool = False,
) -> Tensor:
    """ELBO(x) = E log p_T(Y_T) − ∫₀ᵀ E[½‖a‖² + ∇·μ] dt, per example (MATH.md §5).

    Each of ``samples`` draws takes one t ~ q (the integrand divided by q(t)), one Y_t, one Y_T and
    one probe; the draws are averaged. All of them go through the network in a single batch.
    """
    check_probe(probe)
    sde = model.sde
    B = x.shape[0]
    xs = x.repeat_interleave(samples, dim=0)
    t, q = time_sampler.sample(sde, xs.shape[0], device=x.device, generator=generator)
    t, q = t.to(x.dtype), q.to(x.dtype)
    y_t = sde.marginal_sample(xs, t, randn_like(xs, generator))
    y_T = sde.marginal_sample(xs, torch.full_like(t, sde.T), randn_like(xs, generator))
    integrand = elbo_integrand(model, y_t, t, probe, generator=generator, create_graph=create_graph)
    value = sde.prior_log_prob(y_T) - integrand / q
    return value.reshape(B, samples).mean(dim=1)
