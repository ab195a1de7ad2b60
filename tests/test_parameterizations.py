"""Drift, score and noise parameterizations (MATH.md §2): a ↔ s ↔ ε round-trips and equivalences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oracles import RandomTimeMLP
from sdeflow.core.interfaces import bcast
from sdeflow.core.model import DiffusionModel
from sdeflow_builtin.parameterizations import Drift, Noise, Score
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE

SDES = {
    "vp": lambda: VPSDE(beta_min=0.2, beta_max=15.0, T=2.0),
    "subvp": lambda: SubVPSDE(),
    "ve": lambda: VESDE(sigma_min=0.05, sigma_max=20.0),
}
D = 4


class Rescaled(nn.Module):
    """n'(y, τ) = c(τ T) · n(y, τ): turns one parameterization's network into another's."""

    def __init__(self, network: nn.Module, coefficient):
        super().__init__()
        self.network, self.coefficient = network, coefficient

    def forward(self, y, tau):
        return bcast(self.coefficient(tau), y) * self.network(y, tau)


class TauRecorder(nn.Module):
    """Returns y and remembers the time it was given."""

    def forward(self, y, tau):
        self.tau = tau
        return y


def batch(sde, n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, D, generator=gen, dtype=torch.float64)
    t = sde.T * (1e-3 + (1 - 1e-3) * torch.rand(n, generator=gen, dtype=torch.float64))
    return y, t


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("n", [1, 8])
def test_drift_parameterization_outputs_a_and_s_equals_a_over_g(name, n):
    sde, net = SDES[name](), RandomTimeMLP(D)
    param, (y, t) = Drift(net, sde), batch(sde, n)
    a = param.drift(y, t)
    torch.testing.assert_close(a, net(y, t / sde.T))
    torch.testing.assert_close(param.score(y, t), a / sde.g(t)[:, None])
    assert a.abs().min() > 0


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("n", [1, 8])
def test_score_parameterization_outputs_s_and_a_equals_g_s(name, n):
    sde, net = SDES[name](), RandomTimeMLP(D)
    param, (y, t) = Score(net, sde), batch(sde, n)
    s = param.score(y, t)
    torch.testing.assert_close(s, net(y, t / sde.T))
    torch.testing.assert_close(param.drift(y, t), sde.g(t)[:, None] * s)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("n", [1, 8])
def test_noise_parameterization_gives_s_equals_minus_eps_over_sigma(name, n):
    sde, net = SDES[name](), RandomTimeMLP(D)
    param, (y, t) = Noise(net, sde), batch(sde, n)
    eps_hat = net(y, t / sde.T)
    torch.testing.assert_close(param.noise(y, t), eps_hat)
    torch.testing.assert_close(param.score(y, t), -eps_hat / sde.sigma(t)[:, None])
    torch.testing.assert_close(param.drift(y, t), -sde.g(t)[:, None] * eps_hat / sde.sigma(t)[:, None])


@pytest.mark.parametrize("name", SDES)
def test_score_network_n_and_drift_network_g_n_are_the_same_model(name):
    sde, net = SDES[name](), RandomTimeMLP(D)
    y, t = batch(sde)
    score = Score(net, sde)
    drift = Drift(Rescaled(net, lambda tau: sde.g(tau * sde.T)), sde)
    torch.testing.assert_close(drift.drift(y, t), score.drift(y, t))
    torch.testing.assert_close(drift.score(y, t), score.score(y, t))


@pytest.mark.parametrize("name", SDES)
def test_noise_network_n_and_score_network_minus_n_over_sigma_are_the_same_model(name):
    sde, net = SDES[name](), RandomTimeMLP(D)
    y, t = batch(sde)
    noise = Noise(net, sde)
    score = Score(Rescaled(net, lambda tau: -1 / sde.sigma(tau * sde.T)), sde)
    torch.testing.assert_close(score.drift(y, t), noise.drift(y, t))
    torch.testing.assert_close(score.score(y, t), noise.score(y, t))


@pytest.mark.parametrize("param_cls", [Drift, Score, Noise])
def test_network_sees_time_divided_by_T(param_cls):
    sde, recorder = VPSDE(T=2.0), TauRecorder()
    y, t = batch(sde, 3)
    param_cls(recorder, sde).drift(y, t)
    torch.testing.assert_close(recorder.tau, t / 2.0)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 8])
def test_model_mu_and_reverse_sde_coefficients(lam, n):
    """μ = g a − f, μ_λ = (1 − λ/2) g a − f, σ_λ = √(1 − λ) g (MATH.md §3, §5)."""
    sde = VPSDE()
    model = DiffusionModel(sde, Drift(RandomTimeMLP(D), sde))
    y, t = batch(sde, n)
    a, f, g = model.a(y, t), sde.f(y, t), sde.g(t)[:, None]
    torch.testing.assert_close(model.mu(y, t), g * a - f)
    torch.testing.assert_close(model.mu_lambda(y, t, lam), (1 - lam / 2) * g * a - f)
    torch.testing.assert_close(model.sigma_lambda(t, lam), (1 - lam) ** 0.5 * sde.g(t))
    torch.testing.assert_close(model.s(y, t), a / g)
