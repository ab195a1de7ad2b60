"""Denoising score matching and the negative ELBO (MATH.md §4–6) against closed forms.

For Gaussian data N(μ₀, Σ₀) and the exact marginal score s* = −C⁻¹(y − m μ₀), C = m²Σ₀ + σ²I,
the per-time DSM loss ℓ = ½‖σ s* + ε‖² has mean ½[D − σ² tr C⁻¹] (derived in
``oracles.GaussianOracle.dsm_minimum``); it is the minimum over score models, and a score off by a
constant δ pays exactly ½σ²‖δ‖² more (E[σ s* + ε] = 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate

from oracles import FixedTime, GaussianOracle, RandomTimeMLP, gaussian_3d, one_thread, random_cov
from sdeflow.core.errors import InvalidArgument
from sdeflow.core.model import DiffusionModel, ExactScoreModel
from sdeflow.core.statistics import mean_and_se
from sdeflow.likelihood.elbo import elbo
from sdeflow_builtin.losses import DSM, NegativeELBO, dsm_per_time
from sdeflow_builtin.parameterizations import Drift, Noise, Score
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE
from sdeflow_builtin.time_samplers import Debiased, Uniform

SDES = {
    "vp": lambda: VPSDE(),
    "subvp": lambda: SubVPSDE(beta_min=0.2, beta_max=10.0, T=1.5),
    "ve": lambda: VESDE(sigma_min=0.05, sigma_max=20.0, T=2.0),
}
SAMPLERS = {"uniform": Uniform(), "debiased": Debiased()}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def exact_model(oracle, sde, shift=None):
    score = oracle.score(sde)
    if shift is None:
        return ExactScoreModel(sde, score)
    return ExactScoreModel(sde, lambda y, t: score(y, t) + shift)


def loss_values(loss, model, oracle, sampler, n, seed=0):
    """Per-example losses on n fresh data points (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = oracle.sample(n, gen)
    with torch.no_grad():
        values = loss(model, x, sampler, generator=gen)
    return values


def expected_objective(oracle, sde, weight):
    """∫₀ᵀ weight(t) · ½[D − σ² tr C⁻¹] dt by quadrature, split at t_ε."""
    def integrand(s: float) -> float:
        t = torch.tensor([s], dtype=torch.float64)
        return float(weight(sde, t) * oracle.dsm_minimum(sde, t))

    return (integrate.quad(integrand, 0, sde.t_eps)[0]
            + integrate.quad(integrand, sde.t_eps, sde.T, limit=200)[0])


@pytest.mark.parametrize("t0", [0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("name", SDES)
def test_dsm_at_fixed_time_with_exact_score_is_the_closed_form(name, t0):
    oracle, sde = gaussian_3d(), SDES[name]()
    values = loss_values(DSM("sigma2"), exact_model(oracle, sde), oracle, FixedTime(t0), 40000)
    mean, se = mean_and_se(values)
    expected = float(oracle.dsm_minimum(sde, torch.tensor([t0])))
    assert abs(mean - expected) < 4 * se


@pytest.mark.parametrize("t0", [0.05, 0.5])
def test_a_score_off_by_a_constant_pays_half_sigma2_delta2(t0):
    oracle, sde = gaussian_3d(), VPSDE()
    delta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    exact = loss_values(DSM(), exact_model(oracle, sde), oracle, FixedTime(t0), 40000)
    shifted = loss_values(DSM(), exact_model(oracle, sde, delta), oracle, FixedTime(t0), 40000)
    mean, se = mean_and_se(shifted - exact)  # same seed: paired differences
    sigma = float(sde.sigma(torch.tensor([t0], dtype=torch.float64)))
    assert abs(mean - 0.5 * sigma**2 * float(delta @ delta)) < 4 * se


@pytest.mark.parametrize("name", SDES)
def test_sigma2_dsm_over_uniform_time_is_the_integrated_closed_form(name):
    oracle, sde = gaussian_3d(), SDES[name]()
    values = loss_values(DSM("sigma2"), exact_model(oracle, sde), oracle, Uniform(), 100000)
    mean, se = mean_and_se(values)
    assert abs(mean - expected_objective(oracle, sde, lambda sde, t: torch.ones_like(t))) < 4 * se


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_likelihood_dsm_is_the_integrated_closed_form(name, sampler):
    """E[(w/q) ℓ] = ∫ w(t) ½[D − σ² tr C⁻¹] dt, w the truncated likelihood weight, for either sampler."""
    oracle, sde = gaussian_3d(), SDES[name]()
    values = loss_values(DSM("likelihood"), exact_model(oracle, sde), oracle, SAMPLERS[sampler], 100000)
    mean, se = mean_and_se(values)
    expected = expected_objective(oracle, sde, lambda sde, t: sde.truncated_likelihood_weight(t))
    print(f"\n[dsm] likelihood-weighted, {name}, {sampler}: {mean:.3f} ± {se:.3f}, exact {expected:.3f}")
    assert abs(mean - expected) < 4 * se


def gaussian_10d():
    gen = torch.Generator().manual_seed(10)
    return GaussianOracle(torch.randn(10, generator=gen, dtype=torch.float64), random_cov(10, gen))


@pytest.mark.parametrize("network", ["untrained", "exact"])
def test_debiased_time_keeps_the_mean_and_cuts_the_variance(network):
    """Likelihood-weighted DSM, D = 10: Debiased and Uniform estimate the same objective; Debiased's
    variance is ≥ 10× lower (the uniform estimate T w(t) ℓ is dominated by w ~ 1/t at small t)."""
    oracle, sde = gaussian_10d(), VPSDE()
    if network == "untrained":
        model = DiffusionModel(sde, Drift(RandomTimeMLP(10), sde))
    else:
        model = exact_model(oracle, sde)
    uniform = loss_values(DSM("likelihood"), model, oracle, Uniform(), 100000, seed=1)
    debiased = loss_values(DSM("likelihood"), model, oracle, Debiased(), 100000, seed=2)
    (mu, su), (md, sd) = mean_and_se(uniform), mean_and_se(debiased)
    ratio = float(uniform.var() / debiased.var())
    print(f"\n[dsm] {network} network: uniform {mu:.2f} ± {su:.2f}, debiased {md:.2f} ± {sd:.2f}, "
          f"variance ratio {ratio:.1f}")
    assert abs(mu - md) < 3 * math.hypot(su, sd)
    assert ratio >= 10


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_debiased_likelihood_weight_over_density_is_the_constant_Z(name):
    """w(t)/q(t) = Z for every t; exact for the closed-form VP density, to the table's cell width else."""
    sde = SDES[name]()
    density = sde.likelihood_time_density
    t = sde.T * torch.cat([torch.logspace(-7, 0, 300, dtype=torch.float64),
                           torch.rand(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)])
    rtol = 1e-10 if name == "vp" else math.log(sde.T / sde.t_eps) / 20000
    ratio = sde.truncated_likelihood_weight(t) / Debiased().density(sde, t)
    torch.testing.assert_close(ratio, torch.full_like(ratio, density.Z), rtol=rtol, atol=0)


@pytest.mark.parametrize("n", [1, 64])
def test_debiased_likelihood_dsm_is_Z_times_the_per_time_loss(n):
    """Replaying the generator: the loss is exactly Z · ℓ(x, t) for the t and ε it drew."""
    sde = VPSDE()
    model = DiffusionModel(sde, Drift(RandomTimeMLP(3), sde))
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = DSM("likelihood")(model, x, Debiased(), generator=torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    t, _ = Debiased().sample(sde, n, generator=replay)
    eps = torch.randn(x.shape, generator=replay, dtype=x.dtype)
    expected = sde.likelihood_time_density.Z * dsm_per_time(model, x, t.to(x.dtype), eps)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_dsm_per_time_loss_is_half_squared_norm_of_a_sigma_over_g_plus_eps():
    sde = SubVPSDE()
    model = DiffusionModel(sde, Drift(RandomTimeMLP(3), sde))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(5, generator=gen, dtype=torch.float64)
    y = sde.m(t)[:, None] * x + sde.sigma(t)[:, None] * eps
    a = model.a(y, t)
    expected = 0.5 * ((a * (sde.sigma(t) / sde.g(t))[:, None] + eps) ** 2).sum(dim=1)
    torch.testing.assert_close(dsm_per_time(model, x, t, eps), expected)


def test_negative_elbo_loss_is_minus_the_elbo():
    sde = VPSDE()
    model = DiffusionModel(sde, Drift(RandomTimeMLP(3), sde))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = NegativeELBO("gaussian")(model, x, Debiased(), generator=torch.Generator().manual_seed(1))
    value = elbo(model, x, Debiased(), probe="gaussian", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss.detach(), -value)


@pytest.mark.parametrize("n", [1, 16])
def test_negative_elbo_loss_backpropagates_to_the_network(n):
    sde = VPSDE()
    model = DiffusionModel(sde, Drift(RandomTimeMLP(3), sde))
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = NegativeELBO()(model, x, Uniform(), generator=torch.Generator().manual_seed(1))
    assert loss.shape == (n,)
    loss.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("param_cls", [Drift, Score, Noise])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("loss", [DSM("sigma2"), DSM("likelihood"), NegativeELBO()])
def test_losses_work_for_a_batch_of_one(loss, sampler, param_cls):
    sde = VPSDE()
    model = DiffusionModel(sde, param_cls(RandomTimeMLP(3), sde))
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = loss(model, x, SAMPLERS[sampler], generator=torch.Generator().manual_seed(1))
    assert value.shape == (1,) and torch.isfinite(value).all()
    value.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: DSM(weighting="uniform"), "weighting"),
        (lambda: NegativeELBO(probe="hutchinson"), "probe"),
        (lambda: NegativeELBO(probe="exact"), "probe"),
    ],
)
def test_bad_loss_arguments_raise_invalid_argument_naming_it(factory, argument):
    with pytest.raises(InvalidArgument) as info:
        factory()
    assert info.value.argument == argument
