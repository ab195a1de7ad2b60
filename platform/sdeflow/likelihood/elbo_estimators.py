"""The three SDE ELBO estimators of ``sdeflow eval`` (``elbo``, ``dsm_elbo``, ``combined_elbo``): K draws
of t per example from the time proposal (optionally stratified or fitted on a pilot pass), the
divergence form (MATH.md §5), the denoising form (§9), and their per-bin combination. The contract
they meet is :mod:`sdeflow.likelihood.estimators`'."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.errors import InvalidArgument
from ..core.interfaces import SDE, TimeSampler, randn_like
from ..experiment.config import EvalConfig
from .elbo import bound_time, check_probe, dsm_elbo, elbo, elbo_forms, elbo_integrand, entered, in_bound
from .time_proposals import (
    PROPOSAL_MIX,
    FittedProposal,
    LikelihoodDensity,
    Stratified,
    bin_index,
    bin_masses,
    log_time_edges,
    require_inverse_cdf,
)

PILOT_SAMPLES = 4
"""Draws per pilot example: fixed, so a fit does not depend on eval.samples_per_example."""
WEIGHT_RANGE = (-0.5, 1.5)
"""Fitted combination coefficients are clipped here (any value is unbiased; outside, a noisy fit)."""
RIDGE = 1e-3
"""Pulls the coefficient of a bin with few pilot draws towards ½, relative to the average bin."""


class PilotDraws:
    """Per-draw scalars of a pilot pass: t, q₀(t) of the pilot sampler, integrands; PILOT_SAMPLES
    consecutive draws per example."""

    def __init__(self, t: Tensor, q0: Tensor, parts: dict[str, Tensor]):
        self.t, self.q0, self.parts = t, q0, parts
        self.example = torch.arange(t.numel()) // PILOT_SAMPLES


class SDEELBO:
    """Shared by the three ELBO estimators: K, probe, the time proposal and the pilot pass."""

    name = "elbo"
    fits_weights = False
    requires_linear_drift = False

    def __init__(self, config: EvalConfig, time_sampler: TimeSampler, samples: int, time_sampler_name: str):
        """Built by the registry with the experiment's eval settings, its time sampler and K."""
        cfg, sampler_name = config, time_sampler_name
        check_probe(cfg.probe)
        if samples < 1:
            raise InvalidArgument("samples_per_example", f"must be at least 1, got {samples}")
        if cfg.time_proposal not in ("sampler", "fitted"):
            raise InvalidArgument("time_proposal", f"expected 'sampler' or 'fitted', got {cfg.time_proposal!r}")
        if cfg.stratify_time and cfg.time_proposal == "sampler":
            require_inverse_cdf(time_sampler, "stratify_time", "eval.stratify_time")
        self.cfg, self.samples, self.probe = cfg, samples, cfg.probe
        self.base = self.proposal = time_sampler
        self.fitted: dict[str, Any] | None = None
        self.settings: dict[str, Any] = {
            "estimator": self.name, "samples_per_example": samples, "probe": cfg.probe,
            "time_sampler": sampler_name if cfg.time_proposal == "sampler" else None,
            "time_proposal": cfg.time_proposal, "stratify_time": cfg.stratify_time,
        }
        if cfg.time_proposal == "fitted":
            self.settings.update(proposal_bins=cfg.proposal_bins, proposal_mix=PROPOSAL_MIX)
        if self.needs_pilot:
            self.settings.update(pilot_examples=cfg.pilot_examples, pilot_samples=PILOT_SAMPLES)

    @property
    def needs_pilot(self) -> bool:
        return self.cfg.time_proposal == "fitted" or self.fits_weights

    def time_sampler(self) -> TimeSampler:
        """The proposal the evaluation draws from (stratified across the K samples when asked)."""
        return Stratified(self.proposal, self.samples) if self.cfg.stratify_time else self.proposal

    # --- the pilot pass

    @torch.no_grad()
    def prepare(self, model, z_pilot: Tensor, generator: torch.Generator) -> None:
        """Fit what the settings ask for on a pilot pass (see the module docstring for the contract)."""
        if not self.needs_pilot:
            return
        view, start, head = entered(model, z_pilot, generator)
        if head is not None:  # fit on the model the estimate takes (a bound from a point at t_ε, MATH.md §15)
            model, z_pilot = view, start
        sde = model.sde
        fitting = self.cfg.time_proposal == "fitted"
        # Pilot times from the likelihood density, spread evenly over log t, so every bin gets draws;
        # the fits reweight them to the proposal they are for.
        draws = self.pilot(model, z_pilot[: self.cfg.pilot_examples], LikelihoodDensity(), generator)
        edges = log_time_edges(sde, self.cfg.proposal_bins)
        self.fit_weights(sde, draws, edges, lambda t: self.base.density(sde, t).double())
        if fitting:
            for _ in range(2):  # the weights change the integrand, the proposal changes the best weights
                square = self.pilot_integrand(draws) ** 2
                self.proposal = FittedProposal(sde, edges, bin_masses(edges, draws.t, draws.q0, square))
                if not self.fits_weights:
                    break
                self.fit_weights(sde, draws, edges, lambda t: self.proposal.density(sde, t).double())
        self.fitted = self.fitted_json()

    def pilot(self, model, z: Tensor, sampler: TimeSampler, generator) -> PilotDraws:
        chunks: list[tuple] = []
        for start in range(0, z.shape[0], self.cfg.batch_size):
            chunk = z[start: start + self.cfg.batch_size]
            t, q, parts = self.pilot_chunk(model, chunk, sampler, generator)
            parts = {key: value.double().cpu() for key, value in parts.items()}
            chunks.append((t.double().cpu(), q.double().cpu(), parts))
        return PilotDraws(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]),
                          {k: torch.cat([c[2][k] for c in chunks]) for k in chunks[0][2]})

    def pilot_chunk(self, model, z: Tensor, sampler: TimeSampler, generator) -> tuple[Tensor, Tensor, dict]:
        """(t, q, {"f": the integrand the estimate divides by q}) for PILOT_SAMPLES draws per example."""
        xs = z.repeat_interleave(PILOT_SAMPLES, dim=0)
        t, q = sampler.sample(model.sde, xs.shape[0], device=z.device, generator=generator)
        t = t.to(z.dtype)
        y = model.sde.marginal_sample(xs, t, randn_like(xs, generator))
        f = elbo_integrand(model, y, bound_time(model, t), self.probe, generator=generator)
        return t, q, {"f": in_bound(model, t, f)}

    def pilot_integrand(self, draws: PilotDraws) -> Tensor:
        return draws.parts["f"]

    def fit_weights(self, sde: SDE, draws: PilotDraws, edges: Tensor, density) -> None:
        """Only the combined estimator has weights."""

    def fitted_json(self) -> dict[str, Any]:
        return {"proposal": self.proposal.to_json()} if isinstance(self.proposal, FittedProposal) else {}

    def load_fitted(self, sde: SDE, fitted: dict[str, Any]) -> None:
        """Use a fit made elsewhere (e.g. broadcast from rank 0) instead of calling ``prepare``."""
        if "proposal" in fitted:
            p = fitted["proposal"]
            edges, mass = (torch.tensor(p[key], dtype=torch.float64) for key in ("edges", "mass"))
            self.proposal = FittedProposal(sde, edges, mass, p["mix"])
        self.fitted = fitted


class HutchinsonELBO(SDEELBO):
    """``elbo``: MATH.md §5, exactly :func:`sdeflow.likelihood.elbo.elbo` with the configured proposal."""

    name = "elbo"

    def __call__(self, model, z: Tensor, generator: torch.Generator) -> Tensor:
        return elbo(model, z, self.time_sampler(), probe=self.probe, samples=self.samples, generator=generator)


class DenoisingELBO(SDEELBO):
    """``dsm_elbo``: MATH.md §9 through :func:`sdeflow.likelihood.elbo.dsm_elbo`; exact prior term and constant."""

    name = "dsm_elbo"
    requires_linear_drift = True

    def __call__(self, model, z: Tensor, generator: torch.Generator) -> Tensor:
        return dsm_elbo(model, z, self.time_sampler(), probe=self.probe, samples=self.samples, generator=generator)

    def pilot_chunk(self, model, z, sampler, generator):
        forms = elbo_forms(model, z, sampler, probe=self.probe, samples=PILOT_SAMPLES, generator=generator)
        return forms.t, forms.q, {"f": forms.denoising}


class CombinedELBO(SDEELBO):
    """``combined_elbo``: A − β(t) Δ/q − γ (D c/q − C) on the same draws (MATH.md §9), where

        A = prior − h_div/q                    the divergence form (exact prior term)
        Δ = h_dsm − h_div − D c(t)             E[Δ | t] = 0 for every t and every network
        C = ½ D log(σ²(T)/σ²(t_ε)) = ∫ D c     so E[D c/q − C] = 0

    β = γ = 1 − w gives w·(divergence form) + (1 − w)·(denoising form); a β per log-t bin lets each time
    take the better form (on the Swiss roll the divergence form at small t, the denoising one at large t).
    β and γ are fitted on the pilot by least squares (fixed effects per example, clipped to
    WEIGHT_RANGE, ridge towards ½), or fixed by ``eval.combined_weight``; unprepared, β = γ = ½.
    """

    name = "combined_elbo"
    requires_linear_drift = True

    def __init__(self, config: EvalConfig, time_sampler: TimeSampler, samples: int, time_sampler_name: str):
        cfg = config
        self.fits_weights = cfg.combined_weight is None
        super().__init__(cfg, time_sampler, samples, time_sampler_name)
        fixed = 0.5 if cfg.combined_weight is None else 1.0 - cfg.combined_weight
        self.edges: Tensor | None = None
        self.beta = torch.full((1,), fixed, dtype=torch.float64)
        self.gamma = fixed
        self.settings["combined_weight"] = cfg.combined_weight if cfg.combined_weight is not None else "fitted"

    def coefficients(self, t: Tensor) -> Tensor:
        if self.edges is None:
            return self.beta.to(t.device).expand(t.shape[0])
        return self.beta.to(t.device)[bin_index(self.edges, t)]

    def __call__(self, model, z: Tensor, generator: torch.Generator) -> Tensor:
        f = elbo_forms(model, z, self.time_sampler(), probe=self.probe, samples=self.samples, generator=generator)
        beta = self.coefficients(f.t).to(z.dtype)
        delta = f.denoising - f.divergence - f.drift_term
        value = f.divergence_form() - beta * delta / f.q - self.gamma * (f.drift_term / f.q - f.constant)
        return value.reshape(z.shape[0], self.samples).mean(dim=1)

    def pilot_chunk(self, model, z, sampler, generator):
        f = elbo_forms(model, z, sampler, probe=self.probe, samples=PILOT_SAMPLES, generator=generator)
        self.constant = f.constant
        return f.t, f.q, {"div": f.divergence, "dsm": f.denoising, "drift": f.drift_term}

    def pilot_integrand(self, draws: PilotDraws) -> Tensor:
        """The f of value = prior + γ C − f/q: h_div + β Δ + γ D c."""
        p = draws.parts
        beta = self.coefficients(draws.t)
        return p["div"] + beta * (p["dsm"] - p["div"] - p["drift"]) + self.gamma * p["drift"]

    def fit_weights(self, sde: SDE, draws: PilotDraws, edges: Tensor, density) -> None:
        """Weighted least squares for the variance under the proposal ``density`` (draws came from q₀):
        minimise Σ (q/q₀)(A − β_b Δ/q − γ(D c/q − C))², each quantity centred per example. The objective
        is the variance for iid t; it is used for stratified t too (measured better than fitting the
        variance given t, which only K → ∞ strata would leave)."""
        if not self.fits_weights:
            return
        p, q = draws.parts, density(draws.t)
        weight = q / draws.q0
        bins = len(edges) - 1
        onehot = torch.nn.functional.one_hot(bin_index(edges, draws.t), bins).double()
        delta = (p["dsm"] - p["div"] - p["drift"]) / q
        X = torch.cat([onehot * delta[:, None], (p["drift"] / q - self.constant)[:, None]], dim=1)
        y = -p["div"] / q
        X, y = _centre(X, draws.example, weight), _centre(y[:, None], draws.example, weight)[:, 0]
        gram = X.T @ (weight[:, None] * X)
        scale = float(gram.diagonal().mean()) or 1.0
        ridge = RIDGE * scale * torch.eye(bins + 1, dtype=torch.float64)
        theta = torch.linalg.solve(gram + ridge, X.T @ (weight * y) + ridge @ torch.full((bins + 1,), 0.5,
                                                                                        dtype=torch.float64))
        theta = theta.clamp(*WEIGHT_RANGE)
        self.edges, self.beta, self.gamma = edges, theta[:-1], float(theta[-1])

    def fitted_json(self) -> dict[str, Any]:
        out = super().fitted_json()
        if self.edges is not None:
            out.update(weight_edges=self.edges.tolist(), beta=self.beta.tolist(), gamma=self.gamma)
        return out

    def load_fitted(self, sde: SDE, fitted: dict[str, Any]) -> None:
        super().load_fitted(sde, fitted)
        if "beta" in fitted:
            self.edges = torch.tensor(fitted["weight_edges"], dtype=torch.float64)
            self.beta = torch.tensor(fitted["beta"], dtype=torch.float64)
            self.gamma = float(fitted["gamma"])


def _centre(values: Tensor, example: Tensor, weight: Tensor) -> Tensor:
    """Each column minus its weighted mean over the draws of the same example (fixed effects)."""
    n = int(example.max()) + 1
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, example, weight)
    sums = torch.zeros(n, values.shape[1], dtype=torch.float64).index_add_(0, example, weight[:, None] * values)
    return values - (sums / total.clamp(min=1e-300)[:, None])[example]



