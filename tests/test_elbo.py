"""The ELBO estimator (MATH.md §5) against exact log-densities, and its divergence estimators.

With the exact marginal score plugged in, E[ELBO(x)] = E[log p(x)] − KL(q_T ‖ p_T): the integrand
½‖a‖² + ∇·μ equals d/dt E[log q_t(Y_t)] along the inference process (Fokker–Planck), so the time
integral telescopes to E log q_T(Y_T) − log p(x), and only the prior mismatch at T is left. The tests
estimate the mean gap ELBO(x) − log p(x) over many x and compare it with −KL within 4 standard errors
(run ``pytest -s`` to see the measured gaps).
"""

from __future__ import annotations

import math

import pytest
import torch

from oracles import GaussianMixtureOracle, RandomTimeMLP, gaussian_3d, mixture_2d, one_thread
from sdeflow.core.errors import InvalidArgument
from sdeflow.core.model import DiffusionModel, ExactScoreModel
from sdeflow.core.statistics import mean_and_se
from sdeflow.likelihood.elbo import divergence, elbo, exact_divergence
from sdeflow_builtin.parameterizations import Drift
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE
from sdeflow_builtin.time_samplers import Debiased, Uniform

N_EXAMPLES = 200_000
SAMPLERS = {"uniform": Uniform(), "debiased": Debiased()}
ORACLES = {"gaussian-3d": gaussian_3d, "mixture-2d": mixture_2d}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def measured_gap(oracle, sde, sampler, probe, n=N_EXAMPLES, seed=1234):
    """Mean and standard error of ELBO(x) − log p(x) over n data points, one estimate each."""
    gen = torch.Generator().manual_seed(seed)
    x = oracle.sample(n, gen)
    model = ExactScoreModel(sde, oracle.score(sde))
    return mean_and_se(elbo(model, x, sampler, probe=probe, generator=gen) - oracle.log_prob(x))


def report(label, gap, se, expected):
    print(f"\n[elbo] {label}: ELBO − log p = {gap:+.4f} ± {se:.4f} (s.e.), expected {expected:+.5f}")


@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "exact"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("data", ORACLES)
def test_exact_score_elbo_matches_exact_log_density(data, sampler, probe):
    """VP (β_max = 20): the prior mismatch is ~1e-5 nats, so the gap must be 0 within MC error.

    For the mixture KL(q_T ‖ p_T) is bounded by Σ_k w_k KL(N_k,T ‖ N(0, I)) (convexity), so the gap lies
    in [−bound, 0] up to MC error.
    """
    oracle, sde = ORACLES[data](), VPSDE()
    gap, se = measured_gap(oracle, sde, SAMPLERS[sampler], probe)
    kl = oracle.prior_kl_bound(sde)
    report(f"{data}, vp, {sampler}, {probe}", gap, se, -kl)
    assert -kl - 4 * se <= gap <= 4 * se


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exact_score_elbo_gap_is_the_prior_mismatch(sampler):
    """With β_max = 4, m(T)² ≈ 0.12 and KL(q_T ‖ p_T) ≈ 0.09 nats: large against the s.e., so the
    estimator must find the gap −KL, not 0."""
    oracle, sde = gaussian_3d(), VPSDE(beta_max=4.0)
    gap, se = measured_gap(oracle, sde, SAMPLERS[sampler], "exact", n=2 * N_EXAMPLES)
    kl = oracle.prior_kl(sde)
    report(f"gaussian-3d, vp(β_max=4), {sampler}, exact", gap, se, -kl)
    assert kl > 8 * se
    assert abs(gap + kl) < 4 * se


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exact_score_elbo_for_subvp_on_a_longer_horizon(sampler):
    """T = 1.5 also checks that the uniform sampler's 1/q = T is applied."""
    oracle, sde = gaussian_3d(), SubVPSDE(beta_min=0.1, beta_max=8.0, T=1.5)
    gap, se = measured_gap(oracle, sde, SAMPLERS[sampler], "exact")
    kl = oracle.prior_kl(sde)
    report(f"gaussian-3d, subvp(β_max=8, T=1.5), {sampler}, exact", gap, se, -kl)
    assert abs(gap + kl) < 4 * se


def test_exact_score_elbo_for_ve():
    """VE starts from Y_0 ~ N(x, σ_min² I), so the ELBO telescopes to E log q_0(Y_0) with
    q_0 = N(μ₀, Σ₀ + σ_min² I): the expected gap is H(p) − H(q_0) − KL = −½ Σ log(1 + σ_min²/λ_i) − KL."""
    oracle, sde = gaussian_3d(), VESDE(sigma_min=0.05, sigma_max=20.0)
    gap, se = measured_gap(oracle, sde, Uniform(), "exact")
    expected = -0.5 * float(torch.log1p(sde.sigma_min**2 / oracle.lam).sum()) - oracle.prior_kl(sde, 20.0)
    report("gaussian-3d, ve(0.05, 20), uniform, exact", gap, se, expected)
    assert abs(gap - expected) < 4 * se


def test_averaging_samples_divides_the_variance():
    """``samples = k`` averages k independent estimates per example: the variance drops k-fold."""
    oracle, sde = gaussian_3d(), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    gen = torch.Generator().manual_seed(5)
    x = oracle.sample(20000, gen)
    one = elbo(model, x, Uniform(), generator=gen) - oracle.log_prob(x)
    eight = elbo(model, x, Uniform(), samples=8, generator=gen) - oracle.log_prob(x)
    ratio = float(one.var() / eight.var())
    print(f"\n[elbo] variance ratio samples=1 / samples=8: {ratio:.2f}")
    assert eight.shape == (20000,)
    assert 6 < ratio < 10


def test_elbo_is_the_same_with_and_without_autograd():
    oracle, sde = mixture_2d(), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    x = oracle.sample(64, torch.Generator().manual_seed(0))
    with_grad = elbo(model, x, Debiased(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        without = elbo(model, x, Debiased(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(with_grad, without, rtol=1e-12, atol=1e-12)
    assert not with_grad.requires_grad
    assert torch.isfinite(with_grad).all()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "exact"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_elbo_of_a_single_example(probe, sampler):
    """Batch size 1 works, and the ELBO of one example averaged over many draws is its log-density."""
    oracle, sde = gaussian_3d(), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    x = oracle.sample(1, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    single = elbo(model, x, SAMPLERS[sampler], probe=probe, generator=gen)
    assert single.shape == (1,) and torch.isfinite(single).all()
    n = 20000
    spread = elbo(model, x.expand(n, 3), SAMPLERS[sampler], probe=probe, generator=gen).std()
    averaged = elbo(model, x, SAMPLERS[sampler], probe=probe, samples=n, generator=gen)
    expected = float(oracle.log_prob(x))  # the prior mismatch (~1e-5 nats) is far below the s.e.
    assert averaged.shape == (1,)
    assert abs(float(averaged) - expected) < 4 * float(spread) / math.sqrt(n)


def test_elbo_backpropagates_to_the_network_with_create_graph():
    sde = VPSDE()
    model = DiffusionModel(sde, Drift(RandomTimeMLP(3), sde))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = elbo(model, x, Uniform(), generator=torch.Generator().manual_seed(1), create_graph=True)
    value.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_elbo_rejects_an_unknown_probe():
    sde = VPSDE()
    model = ExactScoreModel(sde, gaussian_3d().score(sde))
    with pytest.raises(InvalidArgument) as info:
        elbo(model, torch.zeros(2, 3, dtype=torch.float64), Uniform(), probe="hutchinson")
    assert info.value.argument == "probe"


# --- divergence estimators ---------------------------------------------------------------------


def randn_leaf(*shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(True)


def linear_map(dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, dim, generator=gen, dtype=torch.float64)


def test_exact_divergence_is_the_trace_of_the_jacobian():
    """A non-linear map: compare with the trace of torch.autograd.functional.jacobian, per example."""
    A = linear_map(4)
    fn = lambda y: torch.tanh(y @ A.T) * y.sum(dim=1, keepdim=True)  # noqa: E731
    y = randn_leaf(5, 4, seed=1)
    expected = torch.stack([torch.autograd.functional.jacobian(fn, yi[None])[0, :, 0].trace() for yi in y])
    torch.testing.assert_close(exact_divergence(fn(y), y), expected)
    torch.testing.assert_close(divergence(fn(y), y, "exact"), expected)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_divergence_is_unbiased(probe):
    """E[vᵀ A v] = tr A; the variance is 2‖A_sym‖_F² − 2 Σ A_ii² (Rademacher) or 2‖A_sym‖_F² (Gaussian)."""
    A = linear_map(6)
    n = 20000
    y = torch.zeros(n, 6, dtype=torch.float64, requires_grad=True)
    estimates = divergence(y @ A.T, y, probe, generator=torch.Generator().manual_seed(2))
    sym = 0.5 * (A + A.T)
    variance = 2 * (sym**2).sum() - (2 * (A.diag() ** 2).sum() if probe == "rademacher" else 0)
    mean, se = mean_and_se(estimates)
    assert abs(mean - float(A.trace())) < 4 * math.sqrt(float(variance) / n)
    assert float(estimates.var()) == pytest.approx(float(variance), rel=0.1)


def test_rademacher_divergence_is_exact_for_a_diagonal_jacobian():
    y = randn_leaf(3, 5, seed=3)
    out = torch.sin(y)
    torch.testing.assert_close(divergence(out, y, "rademacher", generator=torch.Generator().manual_seed(4)),
                               torch.cos(y).sum(dim=1))


def test_divergence_rejects_an_unknown_probe():
    y = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(InvalidArgument) as info:
        divergence(2 * y, y, "sphere")
    assert info.value.argument == "probe"


def test_mixture_oracle_score_is_the_gradient_of_its_log_density():
    """The oracle itself: a one-component mixture's autograd score equals the Gaussian closed form."""
    gaussian, sde = gaussian_3d(), VPSDE()
    as_mixture = GaussianMixtureOracle([1.0], gaussian.means, gaussian.covs)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(as_mixture.score(sde)(y, t), gaussian.score(sde)(y, t))
