"""The ELBO of the plug-in reverse SDE and its divergence estimators (MATH.md §5), and the same ELBO in
denoising form (MATH.md §9)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.bounds import PAPER
from ..core.compiling import differentiated_twice
from ..core.errors import InvalidArgument
from ..core.interfaces import SDE, SHARED, TimeSampler, bcast, draws_of, flat_sum, randn_like

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
    """½‖a(y, t)‖² + ∇·μ(y, t) with μ = g a − f, per example (MATH.md §5).

    With ``create_graph`` (training) the value is differentiated again: through the network, and through
    y itself when y carries a graph (Y_t = m x + σ ε depends on a trainable SDE's and dequantizer's
    parameters), so their gradients are those of the bound. The network runs eagerly there
    (:func:`sdeflow.core.compiling.differentiated_twice`)."""
    keep = create_graph and y.requires_grad
    with torch.enable_grad(), differentiated_twice(create_graph):
        y = y if keep else y.detach().requires_grad_(True)
        a = model.a(y, t)
        mu = bcast(model.sde.g(t), y) * a - model.sde.f(y, t)
        div = divergence(mu, y, probe, generator=generator, create_graph=create_graph)
        value = 0.5 * flat_sum(a**2) + div
    return value if create_graph else value.detach()


def bound_of(model):
    """The model's bound (MATH.md §15); a model without one has the paper's."""
    return getattr(model, "bound", PAPER)


def outside_bound(model, t: Tensor) -> Tensor | None:
    """Draws of t below the bound's start (t_ε for ``discrete``), which count zero; None for the paper's
    bound, which integrates to t = 0."""
    start = bound_of(model).start_time(model.sde)
    return None if start is None else t < start


def in_bound(model, t: Tensor, values: Tensor) -> Tensor:
    """``values`` per draw, zero where the draw lies below the bound's start."""
    outside = outside_bound(model, t)
    return values if outside is None else torch.where(outside, torch.zeros_like(values), values)


def bound_time(model, t: Tensor) -> Tensor:
    """t, or t raised to the bound's start: the network is never evaluated where a draw counts zero."""
    start = bound_of(model).start_time(model.sde)
    return t if start is None else t.clamp(min=start)


def entered(model, x: Tensor, generator) -> tuple[Any, Tensor, Tensor | None]:
    """(the model whose ELBO is taken, the point it is taken at, the head to add or None). A bound that
    starts at a point at t_ε (``truncated``, MATH.md §15) has the ELBO of its :class:`~sdeflow.core.bounds.StartedModel`
    at y_ε = m(t_ε) x plus its head; every other bound, the model's own at x (its head is added by the caller)."""
    bound = bound_of(model)
    if not bound.point_start:
        return model, x, None
    return bound.view(model), bound.start(model, x, generator), bound.head(model, x, generator)


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
    """ELBO(x) = E log p_T(Y_T) − ∫₀ᵀ E[½‖a‖² + ∇·μ] dt, per example (MATH.md §5); under a bound from t_ε
    the integral starts there and the bound's head is added (MATH.md §15).

    Each of ``samples`` draws takes one t ~ q (the integrand divided by q(t)), one Y_t, one Y_T and
    one probe; the draws are averaged. All of them go through the network in a single batch.
    """
    check_probe(probe)
    view, start, head = entered(model, x, generator)
    if head is not None:
        kwargs = {"probe": probe, "samples": samples, "generator": generator, "create_graph": create_graph}
        return elbo(view, start, time_sampler, **kwargs) + head
    sde = model.sde
    B = x.shape[0]
    xs = x.repeat_interleave(samples, dim=0)
    with draws_of(example_of_draw(B, samples, x.device)):
        t, q = time_sampler.sample(sde, xs.shape[0], device=x.device, generator=generator)
        t, q = t.to(x.dtype), q.to(x.dtype)
        y_t = sde.marginal_sample(xs, t, randn_like(xs, generator))
        y_T = sde.marginal_sample(xs, torch.full_like(t, sde.T), randn_like(xs, generator))
        integrand = elbo_integrand(model, y_t, bound_time(model, t), probe, generator=generator,
                                   create_graph=create_graph)
        value = sde.prior_log_prob(y_T) - in_bound(model, t, integrand) / q
    return value.reshape(B, samples).mean(dim=1) + bound_of(model).head(model, x, generator)


# ------------------------------------------------------------------ the denoising form (MATH.md §9)


def example_of_draw(B: int, samples: int, device) -> Tensor:
    """The example each of B·samples draws belongs to (example-major), for :func:`draws_of`."""
    return torch.arange(B * samples, device=device) // samples


def require_linear_drift(sde: SDE, argument: str = "estimator") -> None:
    """The denoising form holds only for f = κ(t) y: κ is the SDE's ``linear_drift`` (declared, or derived
    from m by default), checked against f at a few times and points; an SDE whose drift is not affine (or
    that says so with None) is refused."""
    if sde.__dict__.get("_drift_checked_affine"):
        return
    t = torch.tensor([sde.t_eps, 0.1 * sde.T, 0.5 * sde.T, sde.T], dtype=torch.float64)
    with torch.no_grad():
        kappa = sde.linear_drift(t)
    if kappa is None:
        raise InvalidArgument(argument, f"the denoising form of the ELBO (MATH.md §9) needs an SDE with "
                              f"linear drift f = κ(t) y; {type(sde).__name__} declares none (SDE.linear_drift)")
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        f = sde.f(y, t).double()
        expected = bcast(kappa.double(), y) * y
    error = float((f - expected).abs().max() / (expected.abs().max() + f.abs().max() + 1e-12))
    if not error < 1e-4:
        raise InvalidArgument(argument, f"the denoising form of the ELBO (MATH.md §9) needs an SDE with linear "
                              f"drift f = κ(t) y; {type(sde).__name__}'s f(y, t) differs from κ(t) y = (d log m/dt) y "
                              f"by {error:.1e} (relative): its drift is not affine in y")
    sde.__dict__["_drift_checked_affine"] = True  # a property of the class of drift, not of parameter values


def prior_term(sde: SDE, x: Tensor, generator=None) -> Tensor:
    """E log p_T(Y_T) per example: exact for a prior N(0, s² I) (MATH.md §9), else log p_T of one Y_T."""
    s = sde.prior_std()
    T = torch.full((x.shape[0],), sde.T, dtype=x.dtype, device=x.device)
    if s is None:
        return sde.prior_log_prob(sde.marginal_sample(x, T, randn_like(x, generator)))
    D = x[0].numel()
    mean2 = sde.m(T) ** 2 * flat_sum(x**2)
    return -0.5 * D * math.log(2 * math.pi * s**2) - (mean2 + D * sde.sigma(T) ** 2) / (2 * s**2)


def denoising_constant(sde: SDE, dim: int) -> Tensor:
    """½ D log(σ²(T)/σ²(t_ε)) = ∫_{t_ε}^T D c(t) dt, c = ½ d/dt log σ² (MATH.md §9); a 0-dim float64
    tensor, differentiable in a trainable SDE's parameters."""
    sigma_T, sigma_eps = sde.sigma(torch.tensor([sde.T, sde.t_eps], dtype=torch.float64))
    return dim * torch.log(sigma_T / sigma_eps)


def dsm_integrand(model, y: Tensor, t: Tensor, eps: Tensor, a: Tensor | None = None) -> Tensor:
    """r(t) ℓ(x, t, ε) with ℓ = ½‖a σ/g + ε‖² and y = m x + σ ε: one network evaluation (MATH.md §9)."""
    sde = model.sde
    a = model.a(y, t) if a is None else a
    ell = 0.5 * flat_sum((a * bcast(sde.sigma(t) / sde.g(t), y) + eps) ** 2)
    return sde.likelihood_weight(t) * ell


def _draws(sde: SDE, x: Tensor, time_sampler: TimeSampler, samples: int, generator):
    """x repeated ``samples`` times (example-major), t ~ q with q(t), ε and Y_t = m x + σ ε."""
    xs = x.repeat_interleave(samples, dim=0)
    t, q = time_sampler.sample(sde, xs.shape[0], device=x.device, generator=generator)
    t, q = t.to(x.dtype), q.to(x.dtype)
    eps = randn_like(xs, generator)
    return xs, t, q, eps, sde.marginal_sample(xs, t, eps)


def dsm_elbo(
    model, x: Tensor, time_sampler: TimeSampler, *, probe: str = "rademacher", samples: int = 1, generator=None,
    create_graph: bool = False,
) -> Tensor:
    """ELBO(x) = E log p_T + ½ D log(σ²(T)/σ²(t_ε)) − ∫_{t_ε}^T E[r ℓ] − ∫_0^{t_ε} E[½‖a‖² + ∇·μ] (MATH.md §9).

    Same bound as :func:`elbo` (and the same bound's head, MATH.md §15). Above t_ε a draw costs one network
    evaluation and a first-order gradient (no divergence, no probe); only the few draws below t_ε take the
    §5 integrand with a Hutchinson probe. Every draw goes through the network at once, the ones below t_ε
    at t_ε (a finite value that is then replaced), so a training step has one static shape.
    ``create_graph``: differentiable, for training (the ``elbo`` loss with ``form: denoising``).
    """
    check_probe(probe)
    view, start, head = entered(model, x, generator)
    if head is not None:
        kwargs = {"probe": probe, "samples": samples, "generator": generator, "create_graph": create_graph}
        return dsm_elbo(view, start, time_sampler, **kwargs) + head
    sde = model.sde
    require_linear_drift(sde)
    draws = example_of_draw(x.shape[0], samples, x.device)
    with draws_of(draws):
        xs, t, q, eps, y = _draws(sde, x, time_sampler, samples, generator)
        prior = prior_term(sde, xs, generator)
        low = t <= sde.t_eps
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            integrand = dsm_integrand(model, y, t.clamp(min=sde.t_eps), eps)
    outside = outside_bound(model, t)
    divergence_form = low if outside is None else low & ~outside
    if bool(divergence_form.any()):
        with draws_of(draws[divergence_form]):
            below = elbo_integrand(model, y[divergence_form], t[divergence_form], probe, generator=generator,
                                   create_graph=create_graph)
        integrand = integrand.masked_scatter(divergence_form, below.to(integrand.dtype))
    integrand = in_bound(model, t, integrand)
    with draws_of(SHARED):
        constant = denoising_constant(sde, x[0].numel()).to(x.dtype)
    value = prior + constant - integrand / q
    return value.reshape(x.shape[0], samples).mean(dim=1) + bound_of(model).head(model, x, generator)


class ELBOForms(NamedTuple):
    """Both forms of the ELBO on the same draws (t, ε, a(Y_t, t), probe), one row per draw (MATH.md §9).

    divergence form  prior − divergence / q                      (MATH.md §5)
    denoising form   prior + constant − denoising / q            (MATH.md §9)
    Above t_ε, E[denoising − divergence − drift_term | t] = 0 for every t and every network, with
    drift_term = D c(t); below t_ε the two integrands are the same number and drift_term is 0.
    """

    t: Tensor
    q: Tensor
    prior: Tensor
    divergence: Tensor
    denoising: Tensor
    drift_term: Tensor
    constant: float

    def divergence_form(self) -> Tensor:
        return self.prior - self.divergence / self.q

    def denoising_form(self) -> Tensor:
        return self.prior + self.constant - self.denoising / self.q


def elbo_forms(
    model, x: Tensor, time_sampler: TimeSampler, *, probe: str = "rademacher", samples: int = 1, generator=None,
) -> ELBOForms:
    """Every draw's divergence and denoising integrands from one network evaluation and one VJP."""
    check_probe(probe)
    view, start, head = entered(model, x, generator)
    if head is not None:
        forms = elbo_forms(view, start, time_sampler, probe=probe, samples=samples, generator=generator)
        return forms._replace(prior=forms.prior + head.repeat_interleave(samples))
    sde = model.sde
    require_linear_drift(sde)
    xs, t, q, eps, y = _draws(sde, x, time_sampler, samples, generator)
    prior = prior_term(sde, xs, generator)
    prior = prior + bound_of(model).head(model, xs, generator)
    s = bound_time(model, t)
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        a = model.a(y, s)
        mu = bcast(sde.g(s), y) * a - sde.f(y, s)
        div = divergence(mu, y, probe, generator=generator)
    a = a.detach()
    divergence_integrand = in_bound(model, t, 0.5 * flat_sum(a**2) + div)
    low = t <= sde.t_eps
    D = x[0].numel()
    c = 0.5 * sde.likelihood_weight(t) + sde.linear_drift(t)
    return ELBOForms(
        t=t, q=q, prior=prior, divergence=divergence_integrand,
        denoising=torch.where(low, divergence_integrand, dsm_integrand(model, y.detach(), t, eps, a)),
        drift_term=torch.where(low, torch.zeros_like(c), D * c), constant=float(denoising_constant(sde, D)),
    )
