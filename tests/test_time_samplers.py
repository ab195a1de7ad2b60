"""Time samplers and the debiased density q(t) ∝ g²/σ² truncated below t_ε (MATH.md §6)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats

from sdeflow.core.interfaces import TabulatedTimeDensity
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE, VPLikelihoodTimeDensity
from sdeflow_builtin.time_samplers import Debiased, Uniform

VP_PARAMS = [
    {},
    {"beta_min": 0.5, "beta_max": 5.0, "t_eps": 1e-2},
    {"beta_min": 0.1, "beta_max": 20.0, "T": 2.0, "t_eps": 1e-4},
    {"beta_min": 1.0, "beta_max": 1.0},
]
OTHER_SDES = {
    "subvp": lambda: SubVPSDE(),
    "subvp-custom": lambda: SubVPSDE(beta_min=0.3, beta_max=8.0, T=1.5, t_eps=1e-4),
    "ve": lambda: VESDE(),
    "ve-custom": lambda: VESDE(sigma_min=0.1, sigma_max=5.0, T=2.0, t_eps=1e-2),
}
KS_SAMPLES = 20000
KS_LEVEL = 1e-3


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


def probe_times(sde):
    """Random times and a log-spaced sweep reaching far below t_ε."""
    gen = torch.Generator().manual_seed(0)
    return torch.cat([
        sde.T * torch.rand(500, generator=gen, dtype=torch.float64),
        sde.T * torch.logspace(-7, 0, 200, dtype=torch.float64),
    ])


def integral_of_pdf(density, sde):
    """∫₀ᵀ q by adaptive quadrature, split at t_ε where q has a kink (for a smooth q)."""
    pdf = lambda s: float(density.pdf(t64(s)))  # noqa: E731
    return integrate.quad(pdf, 0, sde.t_eps)[0] + integrate.quad(pdf, sde.t_eps, sde.T, limit=500)[0]


def integral_of_table(density):
    """∫₀ᵀ q for a tabulated q, which is constant on each cell: Σ q(midpoint) × width, exactly."""
    mid = 0.5 * (density.knots[1:] + density.knots[:-1])
    return float((density.pdf(mid) * density.knots.diff()).sum())


def ks_pvalue(samples, density):
    return stats.kstest(samples.double().numpy(), lambda s: density.cdf(torch.from_numpy(s)).numpy()).pvalue


@pytest.mark.parametrize("params", VP_PARAMS)
def test_vp_density_integrates_to_one(params):
    sde = VPSDE(**params)
    assert integral_of_pdf(sde.likelihood_time_density, sde) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("params", VP_PARAMS)
def test_vp_normaliser_is_the_integral_of_the_truncated_weight(params):
    sde = VPSDE(**params)
    w = lambda s: float(sde.truncated_likelihood_weight(t64(s)))  # noqa: E731
    Z = integrate.quad(w, 0, sde.t_eps)[0] + integrate.quad(w, sde.t_eps, sde.T, limit=500)[0]
    assert sde.likelihood_time_density.Z == pytest.approx(Z, rel=1e-8)


@pytest.mark.parametrize("params", VP_PARAMS)
def test_vp_cdf_is_the_integral_of_the_pdf(params):
    sde = VPSDE(**params)
    density = sde.likelihood_time_density
    for t in (0.5 * sde.t_eps, 3 * sde.t_eps, 0.1 * sde.T, 0.6 * sde.T):
        area = integrate.quad(lambda s: float(density.pdf(t64(s))), 0, min(t, sde.t_eps))[0]
        if t > sde.t_eps:
            area += integrate.quad(lambda s: float(density.pdf(t64(s))), sde.t_eps, t, limit=500)[0]
        assert float(density.cdf(t64(t))) == pytest.approx(area, abs=1e-9)
    assert float(density.cdf(t64(0.0))) == 0.0
    assert float(density.cdf(t64(sde.T))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("params", VP_PARAMS)
def test_vp_inverse_cdf_inverts_the_cdf(params):
    sde = VPSDE(**params)
    density, t = sde.likelihood_time_density, probe_times(sde)
    torch.testing.assert_close(density.icdf(density.cdf(t)), t, rtol=1e-8, atol=1e-12)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(density.cdf(density.icdf(u)), u, rtol=0, atol=1e-9)


@pytest.mark.parametrize("params", VP_PARAMS)
def test_vp_closed_form_agrees_with_the_kernels_table(params):
    """The table's pdf is the exact average over each log-spaced cell, so its relative error is at most
    about the relative cell width ln(T/t_ε)/(points − 1); Z and the CDF are far more accurate."""
    sde = VPSDE(**params)
    closed, table = VPLikelihoodTimeDensity(sde), TabulatedTimeDensity(sde)
    cell = math.log(sde.T / sde.t_eps) / (20001 - 1)
    t = probe_times(sde)
    assert table.Z == pytest.approx(closed.Z, rel=1e-6)
    torch.testing.assert_close(table.pdf(t), closed.pdf(t), rtol=cell, atol=0)
    torch.testing.assert_close(table.cdf(t), closed.cdf(t), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("params", VP_PARAMS)
def test_debiased_vp_samples_follow_the_cdf(params):
    sde = VPSDE(**params)
    t, q = Debiased().sample(sde, KS_SAMPLES, generator=torch.Generator().manual_seed(0))
    assert ks_pvalue(t, sde.likelihood_time_density) > KS_LEVEL
    torch.testing.assert_close(q, sde.likelihood_time_density.pdf(t.double()).float(), rtol=1e-5, atol=0)
    assert torch.all((t > 0) & (t <= sde.T))


def test_debiased_sampler_uses_the_sdes_own_beta():
    """The reference code hard-codes β_min = 0.1, β_max = 20: samples for β_max = 5 must not fit that."""
    own, default = VPSDE(beta_min=0.5, beta_max=5.0), VPSDE()
    t, _ = Debiased().sample(own, KS_SAMPLES, generator=torch.Generator().manual_seed(1))
    assert ks_pvalue(t, own.likelihood_time_density) > KS_LEVEL
    assert ks_pvalue(t, default.likelihood_time_density) < 1e-10


@pytest.mark.parametrize("name", OTHER_SDES)
def test_tabulated_density_integrates_to_one_and_inverts(name):
    sde = OTHER_SDES[name]()
    density, t = sde.likelihood_time_density, probe_times(sde)
    assert integral_of_table(density) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(density.icdf(density.cdf(t)), t, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", OTHER_SDES)
def test_tabulated_density_matches_truncated_weight_over_its_quadrature(name):
    """q = w / Z with Z = ∫ w by scipy: an independent check of the table's normaliser and shape."""
    sde = OTHER_SDES[name]()
    w = lambda s: float(sde.truncated_likelihood_weight(t64(s)))  # noqa: E731
    Z = integrate.quad(w, 0, sde.t_eps)[0] + integrate.quad(w, sde.t_eps, sde.T, limit=500)[0]
    cell = math.log(sde.T / sde.t_eps) / (20001 - 1)
    t = probe_times(sde)
    assert sde.likelihood_time_density.Z == pytest.approx(Z, rel=1e-6)
    torch.testing.assert_close(sde.likelihood_time_density.pdf(t), sde.truncated_likelihood_weight(t) / Z,
                               rtol=2 * cell, atol=0)


@pytest.mark.parametrize("name", OTHER_SDES)
def test_debiased_samples_follow_the_tabulated_cdf(name):
    sde = OTHER_SDES[name]()
    t, _ = Debiased().sample(sde, KS_SAMPLES, generator=torch.Generator().manual_seed(2))
    assert ks_pvalue(t, sde.likelihood_time_density) > KS_LEVEL


@pytest.mark.parametrize("name", ["ve", "ve-custom"])
def test_ve_debiased_density_is_uniform(name):
    """For VE g²/σ² is constant, so q(t) = 1/T and Z = 2 log(σ_max/σ_min)."""
    sde = OTHER_SDES[name]()
    t = probe_times(sde)
    density = sde.likelihood_time_density
    torch.testing.assert_close(density.pdf(t), torch.full_like(t, 1 / sde.T), rtol=1e-9, atol=0)
    torch.testing.assert_close(density.cdf(t), t / sde.T, rtol=1e-9, atol=1e-12)
    assert density.Z == pytest.approx(2 * math.log(sde.sigma_max / sde.sigma_min), rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_uniform_sampler_is_uniform_on_0_T(T):
    sde = VPSDE(T=T)
    t, q = Uniform().sample(sde, KS_SAMPLES, generator=torch.Generator().manual_seed(3))
    assert torch.all((t > 0) & (t <= T))
    assert torch.all(q == 1 / T)
    assert stats.kstest(t.double().numpy(), stats.uniform(0, T).cdf).pvalue > KS_LEVEL


@pytest.mark.parametrize("sampler", [Uniform(), Debiased()])
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_samplers_draw_a_single_time(sampler, name):
    sde = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}[name]()
    t, q = sampler.sample(sde, 1, generator=torch.Generator().manual_seed(4))
    assert t.shape == q.shape == (1,)
    torch.testing.assert_close(q, sampler.density(sde, t))
    assert 0 < float(t) <= sde.T
