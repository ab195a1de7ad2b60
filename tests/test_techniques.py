"""The later likelihood techniques as plugins: v-prediction round trips and the log-SNR time sampler
against closed forms, for VP, sub-VP, VE and the learned VP."""

from __future__ import annotations

import pytest
import torch

from sdeflow.components.registry import default_registry
from sdeflow_builtin.parameterizations import Noise, Velocity
from sdeflow_builtin.sdes import VESDE, VPSDE, LearnedVPSDE, SubVPSDE
from sdeflow_builtin.time_samplers import LogSNR, log_snr

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "learned_vp": lambda: LearnedVPSDE(hidden=8)}


class Returns(torch.nn.Module):
    """A stand-in network that returns a fixed tensor, whatever it is asked."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, y, tau):
        return self.value


@pytest.mark.parametrize("name", SDES)
def test_velocity_round_trips_to_the_noise_the_data_the_score_and_the_drift(name):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.rand(6, generator=g) * 0.9 + 0.05
    with torch.no_grad():
        m, sigma = sde.m(t)[:, None], sde.sigma(t)[:, None]
        y = m * x + sigma * eps
        v = Velocity(Returns(m * eps - sigma * x), sde)
        assert torch.allclose(v.noise(y, t), eps, atol=1e-5) and torch.allclose(v.data(y, t), x, atol=1e-5)
        assert torch.allclose(v.score(y, t), -eps / sigma, rtol=1e-4, atol=1e-5)
        noise = Noise(Returns(eps), sde)  # the same prediction written as ε: the same score and drift
        assert torch.allclose(v.score(y, t), noise.score(y, t), rtol=1e-4, atol=1e-5)
        assert torch.allclose(v.drift(y, t), noise.drift(y, t), rtol=1e-4, atol=1e-4)
    assert "velocity" in default_registry().names("parameterization")


@pytest.mark.parametrize("name", SDES)
def test_log_snr_draws_are_uniform_in_log_snr_with_their_exact_density(name):
    sde, sampler = SDES[name](), LogSNR()
    with torch.no_grad():
        t, q = sampler.sample(sde, 200_000, generator=torch.Generator().manual_seed(0))
        t64 = t.double()
        above = t64 >= sde.t_eps
        lam = log_snr(sde, t64[above])
        ends = log_snr(sde, torch.tensor([sde.t_eps, sde.T], dtype=torch.float64))
        u = (ends[0] - lam) / (ends[0] - ends[1])  # uniform on [0, 1] if λ is
        assert float(u.mean()) == pytest.approx(0.5, abs=0.005) and float(u.var()) == pytest.approx(1 / 12, abs=0.003)
        same = torch.isclose(q, sampler.density(sde, t).float(), rtol=1e-5)
        assert (q > 0).all() and float(same.float().mean()) > 0.999  # t rounded to float32 may cross a knot
        grid = torch.linspace(0, sde.T, 400_001, dtype=torch.float64)
        assert float(torch.trapezoid(sampler.density(sde, grid), grid)) == pytest.approx(1.0, abs=1e-3)
        weights = 1.0 / sampler.density(sde, t64)  # E_q[w/q] = ∫ w for w = 1: T, unbiased
        assert float(weights.mean()) == pytest.approx(sde.T, rel=0.02)


def test_on_vp_log_snr_is_the_likelihood_weighting_above_t_eps():
    """For VP, −λ′(t) = g²/σ² = r(t): the log-SNR density is the debiased sampler's above t_ε."""
    sde = VPSDE()
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    ratio = LogSNR().density(sde, t) / sde.likelihood_time_density.pdf(t)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=2e-3)


def test_log_snr_of_a_trainable_sde_follows_its_parameters():
    sde, sampler = LearnedVPSDE(hidden=8), LogSNR()
    t = torch.tensor([0.3, 0.6])
    before = sampler.density(sde, t)
    with torch.no_grad():
        sde.h.w3.add_(3.0)
    assert not torch.allclose(before, sampler.density(sde, t))


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(beta_min=0.2, beta_max=10.0, T=1.5)], ids=["vp", "subvp"])
def test_log_snr_is_inverted_in_closed_form_for_vp_and_subvp(sde):
    from sdeflow_builtin.time_samplers import ClosedFormLogSNRDensity, log_snr_density

    t = torch.linspace(sde.t_eps, sde.T, 101, dtype=torch.float64)
    assert torch.allclose(sde.log_snr_inverse(log_snr(sde, t)), t, rtol=1e-9)
    exact, table = LogSNR().density_of(sde), log_snr_density(sde)
    assert isinstance(exact, ClosedFormLogSNRDensity)
    u = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    assert torch.allclose(exact.cdf(exact.icdf(u)), u, atol=1e-9)
    assert torch.allclose(exact.icdf(u), table.icdf(u), atol=2e-3)  # the numeric inversion agrees
    grid = torch.linspace(0, sde.T, 200_001, dtype=torch.float64)
    assert float(torch.trapezoid(exact.pdf(grid), grid)) == pytest.approx(1.0, abs=1e-4)
