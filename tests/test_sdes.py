"""The forward SDEs (MATH.md §1): marginals consistent with f and g, closed forms, priors, arguments."""

from __future__ import annotations

import math

import pytest
import torch

from sdeflow.core.errors import InvalidArgument
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE

SDES = {
    "vp": lambda: VPSDE(),
    "vp-custom": lambda: VPSDE(beta_min=0.5, beta_max=8.0, T=2.0, t_eps=1e-2),
    "subvp": lambda: SubVPSDE(),
    "subvp-custom": lambda: SubVPSDE(beta_min=0.2, beta_max=12.0, T=1.5, t_eps=1e-4),
    "ve": lambda: VESDE(),
    "ve-custom": lambda: VESDE(sigma_min=0.05, sigma_max=10.0, T=2.0, t_eps=1e-2),
}
H = 1e-5  # central-difference step; truncation error O(H²), round-off O(1e-16 / H)


def interior_times(sde, n: int = 41):
    return torch.linspace(0.01 * sde.T, 0.99 * sde.T, n, dtype=torch.float64)


def f_coefficient(sde, t):
    """f(y, t) / y, read off f at y = 1 (every SDE here has a drift linear in y)."""
    return sde.f(torch.ones(len(t), 1, dtype=torch.float64), t)[:, 0]


def central_difference(fn, t):
    return (fn(t + H) - fn(t - H)) / (2 * H)


@pytest.mark.parametrize("name", SDES)
def test_mean_coefficient_solves_its_moment_ode(name):
    sde = SDES[name]()
    t = interior_times(sde)
    expected = f_coefficient(sde, t) * sde.m(t)
    torch.testing.assert_close(central_difference(sde.m, t), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", SDES)
def test_variance_solves_its_moment_ode(name):
    """dσ²/dt = 2 (f/y) σ² + g²."""
    sde = SDES[name]()
    t = interior_times(sde)
    expected = 2 * f_coefficient(sde, t) * sde.sigma(t) ** 2 + sde.g(t) ** 2
    derivative = central_difference(lambda s: sde.sigma(s) ** 2, t)
    torch.testing.assert_close(derivative, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", SDES)
def test_marginal_starts_at_the_data(name):
    sde = SDES[name]()
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(sde.m(zero)) == 1.0
    sigma0 = sde.sigma_min if isinstance(sde, VESDE) else 0.0
    assert float(sde.sigma(zero)) == pytest.approx(sigma0, abs=1e-15)


@pytest.mark.parametrize("name", SDES)
def test_likelihood_weight_is_g2_over_sigma2(name):
    sde = SDES[name]()
    t = torch.logspace(-5, 0, 30, dtype=torch.float64) * sde.T
    expected = sde.g(t) ** 2 / sde.sigma(t) ** 2
    torch.testing.assert_close(sde.likelihood_weight(t), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", SDES)
def test_truncated_likelihood_weight_is_capped_below_t_eps(name):
    sde = SDES[name]()
    below = torch.tensor([1e-9, 0.3 * sde.t_eps, sde.t_eps], dtype=torch.float64)
    above = torch.tensor([1.5 * sde.t_eps, 0.5 * sde.T, sde.T], dtype=torch.float64)
    r_eps = sde.likelihood_weight(torch.tensor([sde.t_eps], dtype=torch.float64))
    torch.testing.assert_close(sde.truncated_likelihood_weight(below), r_eps.expand(3), rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.truncated_likelihood_weight(above), sde.likelihood_weight(above))


def test_vp_closed_forms_match_math_md():
    """β = β_min + Δβ t, B = β_min t + ½ Δβ t², m = e^{−B/2}, σ² = 1 − e^{−B}, g² = β, r = β/(1 − e^{−B})."""
    sde = VPSDE(beta_min=0.3, beta_max=7.0)
    for t in (1e-4, 0.2, 0.7, 1.0):
        beta, B = 0.3 + 6.7 * t, 0.3 * t + 0.5 * 6.7 * t**2
        tt = torch.tensor([t], dtype=torch.float64)
        assert float(sde.m(tt)) == pytest.approx(math.exp(-B / 2), rel=1e-12)
        assert float(sde.sigma(tt)) ** 2 == pytest.approx(1 - math.exp(-B), rel=1e-12)
        assert float(sde.g(tt)) ** 2 == pytest.approx(beta, rel=1e-12)
        assert float(sde.likelihood_weight(tt)) == pytest.approx(beta / (1 - math.exp(-B)), rel=1e-10)


def test_subvp_closed_forms_match_math_md():
    """g² = β (1 − e^{−2B}), σ = 1 − e^{−B}, so r = β (1 + e^{−B}) / (1 − e^{−B})."""
    sde = SubVPSDE(beta_min=0.3, beta_max=7.0)
    for t in (1e-4, 0.2, 0.7, 1.0):
        beta, B = 0.3 + 6.7 * t, 0.3 * t + 0.5 * 6.7 * t**2
        tt = torch.tensor([t], dtype=torch.float64)
        assert float(sde.sigma(tt)) == pytest.approx(1 - math.exp(-B), rel=1e-12)
        assert float(sde.g(tt)) ** 2 == pytest.approx(beta * (1 - math.exp(-2 * B)), rel=1e-12)
        assert float(sde.likelihood_weight(tt)) == pytest.approx(
            beta * (1 + math.exp(-B)) / (1 - math.exp(-B)), rel=1e-9
        )


def test_ve_closed_forms_match_math_md():
    """σ = σ_min (σ_max/σ_min)^t, f = 0, and r = g²/σ² = 2 log(σ_max/σ_min), constant in t."""
    sde = VESDE(sigma_min=0.02, sigma_max=30.0)
    t = torch.tensor([1e-4, 0.2, 0.7, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sde.sigma(t), 0.02 * (30.0 / 0.02) ** t, rtol=1e-12, atol=0)
    assert torch.all(sde.f(torch.randn(4, 3, dtype=torch.float64), t) == 0)
    torch.testing.assert_close(sde.likelihood_weight(t), torch.full_like(t, 2 * math.log(1500.0)))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_default_marginal_at_T_is_the_prior(name):
    """The default schedules end (almost) exactly at the prior: m(T) ≈ 0 for VP, σ(T) = prior std."""
    sde = SDES[name]()
    T = torch.tensor([sde.T], dtype=torch.float64)
    prior_std = sde.sigma_max if isinstance(sde, VESDE) else 1.0
    assert float(sde.sigma(T)) == pytest.approx(prior_std, rel=1e-4)
    if not isinstance(sde, VESDE):
        assert float(sde.m(T)) < 0.01


@pytest.mark.parametrize("name", ["vp", "ve-custom"])
def test_prior_log_prob_is_the_isotropic_gaussian(name):
    sde = SDES[name]()
    std = sde.sigma_max if isinstance(sde, VESDE) else 1.0
    y = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std
    expected = torch.distributions.Normal(0.0, std).log_prob(y).sum(dim=(1, 2))
    torch.testing.assert_close(sde.prior_log_prob(y), expected)


@pytest.mark.parametrize("name", ["vp", "ve-custom"])
def test_prior_samples_have_the_prior_variance(name):
    sde = SDES[name]()
    std = sde.sigma_max if isinstance(sde, VESDE) else 1.0
    n = 20000
    y = sde.prior_sample((n, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # var of a sample variance of Gaussians: 2 std⁴ / n per coordinate
    variance = torch.full((4,), std**2, dtype=torch.float64)
    assert torch.allclose(y.var(dim=0), variance, rtol=4 * math.sqrt(2 / n), atol=0)
    assert torch.all(y.mean(dim=0).abs() < 4 * std / math.sqrt(n))


@pytest.mark.parametrize("name", SDES)
def test_marginal_sample_is_m_x_plus_sigma_eps(name):
    sde = SDES[name]()
    x, eps = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    t = torch.tensor([0.3 * sde.T], dtype=torch.float64)
    torch.testing.assert_close(sde.marginal_sample(x, t, eps), sde.m(t) * x + sde.sigma(t) * eps)


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: VPSDE(beta_min=-0.1), "beta_min"),
        (lambda: VPSDE(beta_min=1.0, beta_max=-2.0), "beta_max"),
        (lambda: SubVPSDE(beta_min=0.0), "beta_min"),
        (lambda: VPSDE(t_eps=1.0), "t_eps"),
        (lambda: VPSDE(T=2.0, t_eps=3.0), "t_eps"),
        (lambda: SubVPSDE(t_eps=-1e-3), "t_eps"),
        (lambda: VPSDE(T=-1.0), "T"),
        (lambda: VESDE(sigma_min=-0.01), "sigma_min"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: VESDE(t_eps=1.0), "t_eps"),
    ],
)
def test_bad_arguments_raise_invalid_argument_naming_it(factory, argument):
    with pytest.raises(InvalidArgument) as info:
        factory()
    assert info.value.argument == argument
    assert argument in str(info.value)
