"""Exact likelihood by the probability-flow ODE (MATH.md §7), the ``ode`` sampler, and ELBO estimators.

With the exact marginal score the probability-flow ODE carries q_{t₀} to q_T exactly, so
log q_T(x_T) + ∫ ∇·v dt = log q_{t₀}(x) up to solver error; what ``ode_log_likelihood`` returns uses
the prior p_T instead of q_T, and differs from log q_{t₀}(x) by log p_T(x_T) − log q_T(x_T) on top.
The ELBO tests compare the uniform and the importance-sampled (debiased, MATH.md §6) time samplers.
Run ``pytest -s`` to see the measured gaps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchdiffeq import odeint

from helpers_exp import run_cli, tiny_config
from oracles import GaussianOracle, RandomTimeMLP, gaussian_3d, one_thread
from sdeflow.assembly.run import open_run
from sdeflow.components.registry import default_registry
from sdeflow.core.model import DiffusionModel, ExactScoreModel
from sdeflow.core.statistics import mean_and_se
from sdeflow.experiment.config import structure
from sdeflow.likelihood.elbo import elbo, exact_divergence
from sdeflow.likelihood.ode import ode_log_likelihood, ode_velocity
from sdeflow.training.trainer import train
from sdeflow_builtin.parameterizations import Drift
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE
from sdeflow_builtin.time_samplers import Debiased, Uniform

T0 = 1e-5  # ode_log_likelihood's default t₀
NATS_PER_DIM = 1e-3  # the brief's accuracy for the exact-score ODE likelihood
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def with_exact_prior(sde_cls, oracle: GaussianOracle, **kwargs):
    """``sde_cls`` whose prior is the exact marginal q_T of the oracle's data instead of N(0, s² I).

    Only ``prior_log_prob`` changes, and the ODE uses the prior only at its end point, so with this
    SDE the exact-score ODE log-likelihood must equal log q_{t₀}(x) up to the solver's error alone.
    """

    def prior_log_prob(self, y):
        T = torch.full((1,), self.T, dtype=y.dtype)
        return oracle.log_marginal(y, self.m(T), self.sigma(T))

    return type(f"ExactPrior{sde_cls.__name__}", (sde_cls,), {"prior_log_prob": prior_log_prob})(**kwargs)


def log_q_t0(oracle: GaussianOracle, sde, x):
    """log q_{t₀}(x): the data density diffused to t₀ (VE adds σ_min² noise even at t₀ → 0)."""
    t0 = torch.full((1,), T0, dtype=x.dtype)
    return oracle.log_marginal(x, sde.m(t0), sde.sigma(t0))


def report(label, per_dim_gap):
    print(f"\n[ode] {label}: max |gap| {float(per_dim_gap.abs().max()):.2e} nats/dim, "
          f"mean {float(per_dim_gap.mean()):+.2e}")


# ------------------------------------------------------------------ the exact-score ODE against oracles


@pytest.mark.parametrize("time", ["t", "log_t", "log_snr"])
@pytest.mark.parametrize("sde_name", SDES)
def test_exact_score_ode_log_likelihood_has_only_solver_error(sde_name, time):
    """Prior replaced by the exact q_T (see ``with_exact_prior``): the non-centred, correlated 3-D
    Gaussian must come out to within 1e-3 nats/dim on every example, for VP, sub-VP and VE alike, whatever
    variable the solver steps in (log-SNR by closed-form inversion for VP and sub-VP, bisection for VE)."""
    oracle = gaussian_3d()
    sde = with_exact_prior(SDES[sde_name], oracle)
    x = oracle.sample(256, torch.Generator().manual_seed(0))
    log_p, nfe = ode_log_likelihood(ExactScoreModel(sde, oracle.score(sde)), x, probe="exact", time=time)
    gap = (log_p - log_q_t0(oracle, sde, x)) / oracle.dim
    report(f"{sde_name}, exact prior, exact divergence, in {time} (nfe {nfe})", gap)
    assert gap.abs().max() < NATS_PER_DIM
    assert 0 < nfe < 1000


def test_ode_repeats_combine_their_dequantization_draws_in_data_space():
    """``repeated`` returns the log p(z) whose bpd is that of the mean (or log-mean-exp) of the K draws'
    log p(x̃_k) − log q_k, whatever the first draw's log-det and log q."""
    from sdeflow.evaluation.evaluate import repeated

    values = iter([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])])
    draws = iter([(torch.zeros(2, 1), torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.2]))])

    class Fake:
        repeats, combine = 2, "mean"

        def __call__(self, model, z, generator):
            return next(values)

    first = (torch.zeros(2, 1), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.3]))
    out = repeated(Fake(), None, lambda x, generator: next(draws), torch.zeros(2, 1), first, None, lambda k: None)
    per_draw = torch.tensor([[1.0 + 0.0 - 0.0, 2.0 + 1.0 - 0.3], [3.0 + 0.5 - 0.1, 0.0 + 0.5 - 0.2]],
                            dtype=torch.float64)
    expected = per_draw.mean(dim=0) - first[1].double() + first[2].double()
    assert torch.allclose(out, expected)
    values = iter([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])])
    draws = iter([(torch.zeros(2, 1), torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.2]))])
    Fake.combine = "logmeanexp"
    out = repeated(Fake(), None, lambda x, generator: next(draws), torch.zeros(2, 1), first, None, lambda k: None)
    expected = torch.logsumexp(per_draw, dim=0) - math.log(2) - first[1].double() + first[2].double()
    assert torch.allclose(out, expected)
    assert bool((out >= per_draw.mean(dim=0) - first[1].double() + first[2].double() - 1e-12).all())  # Jensen


def test_exact_score_ode_log_likelihood_matches_the_data_density_end_to_end():
    """The real N(0, I) prior of VP (β_max = 20) and the plain data density log p(x).

    Why centred data: m(T) ≈ 6.6e-3, so for a mean μ₀ the prior mismatch log p_T(x_T) − log q_T(x_T)
    is first order, ≈ m(T) μ₀·x_T, up to 8e-3 nats/dim per example for ``gaussian_3d`` (above the
    tolerance). With μ₀ = 0 it is second order, O(m(T)²) ≈ 4e-5; t₀ = 1e-5 adds O(σ²(t₀)/λ) ≈ 1e-5.
    """
    oracle = GaussianOracle(torch.zeros(3), gaussian_3d().covs[0])
    sde = VPSDE()
    x = oracle.sample(256, torch.Generator().manual_seed(1))
    log_p, _ = ode_log_likelihood(ExactScoreModel(sde, oracle.score(sde)), x, probe="exact")
    gap = (log_p - oracle.log_prob(x)) / oracle.dim
    report("vp, N(0, I) prior, centred data, exact divergence", gap)
    assert gap.abs().max() < NATS_PER_DIM


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_ode_log_likelihood_is_unbiased(probe):
    """One fixed probe per solve: the trajectory does not depend on it, so E_v[Δ] = ∫ tr(∂v/∂x) dt.
    The mean over 2000 examples of (Hutchinson − exact divergence) must be 0 within 4 s.e."""
    oracle = gaussian_3d()
    sde = with_exact_prior(VPSDE, oracle)
    model = ExactScoreModel(sde, oracle.score(sde))
    gen = torch.Generator().manual_seed(2)
    x = oracle.sample(2000, gen)
    exact, _ = ode_log_likelihood(model, x, probe="exact")
    noisy, _ = ode_log_likelihood(model, x, probe=probe, generator=gen)
    gap, se = mean_and_se(noisy - exact)
    per_dim, per_dim_se = gap / oracle.dim, se / oracle.dim
    print(f"\n[ode] {probe} probe − exact divergence: {per_dim:+.4f} ± {per_dim_se:.4f} nats/dim (s.e.)")
    assert 0 < se < 0.1  # the probe really is random, and 2000 examples pin the mean down
    assert abs(gap) < 4 * se
    # and against the exact density, through the s.e.: every example is correct on average
    truth_gap, truth_se = mean_and_se(noisy - log_q_t0(oracle, sde, x))
    assert abs(truth_gap) < 4 * truth_se + NATS_PER_DIM * oracle.dim


# ------------------------------------------------------------------ integrating the wrong way


def hand_solved_log_likelihood(model, x, times, divergence_sign=1.0):
    """log p_T(x_end) + sign · ∫ ∇·v dt, integrated by torchdiffeq from ``times[0]`` to ``times[1]``.

    Time is clamped to the interval: dopri5 evaluates past the end of its last step, and VP's β(t)
    is negative (g = NaN) below t ≈ −0.005, which would stop a solve that ends near t = 0.
    """
    lo, hi = min(times), max(times)

    def dynamics(t, state):
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            velocity = ode_velocity(model, y, t.clamp(lo, hi).to(y.dtype).expand(y.shape[0]))
            div = exact_divergence(velocity, y)
        return velocity.detach(), div.detach()

    start = (x, torch.zeros(x.shape[0], dtype=x.dtype))
    xs, deltas = odeint(dynamics, start, torch.tensor(times, dtype=x.dtype), rtol=1e-5, atol=1e-5)
    return model.sde.prior_log_prob(xs[-1]) + divergence_sign * deltas[-1]


def test_integrating_in_the_wrong_direction_gives_a_far_off_log_likelihood():
    """The forward solve t₀ → T matches the oracle to 1e-3 nats/dim (and ``ode_log_likelihood``);
    solving T → t₀ from the data, or flipping the divergence's sign, is off by over a nat per
    dimension (≈ 1.5 bits/dim) on average: a thousand times the tolerance."""
    oracle = GaussianOracle(torch.zeros(3), gaussian_3d().covs[0])  # centred: see the end-to-end test
    sde = VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    x = oracle.sample(128, torch.Generator().manual_seed(3))
    log_p = oracle.log_prob(x)

    def per_dim_error(value):
        return (value - log_p) / oracle.dim

    correct = hand_solved_log_likelihood(model, x, [T0, sde.T])
    library, _ = ode_log_likelihood(model, x, probe="exact")
    assert per_dim_error(correct).abs().max() < NATS_PER_DIM
    torch.testing.assert_close(library, correct, rtol=0, atol=1e-3)

    reversed_interval = per_dim_error(hand_solved_log_likelihood(model, x, [sde.T, T0]))
    flipped_divergence = per_dim_error(hand_solved_log_likelihood(model, x, [T0, sde.T], -1.0))
    for label, error in [("T → t₀", reversed_interval), ("−∇·v", flipped_divergence)]:
        print(f"\n[ode] wrong way ({label}): mean |error| {float(error.abs().mean()):.3f} nats/dim")
        assert error.abs().mean() > 0.5


# ------------------------------------------------------------------ the ode sampler


@pytest.mark.parametrize("sde_name", SDES)
def test_ode_sampler_with_the_exact_score_reproduces_the_data_gaussian(sde_name):
    """Prior samples pushed through the exact-score ODE: mean and covariance of 4000 samples within
    4 s.e. of μ₀ and Σ₀ (the prior mismatch moves them by ≈ m(T)|μ₀| ≈ 0.003 ≪ s.e. ≈ 0.02);
    ``trajectory`` returns steps + 1 states, from x_T to the returned sample."""
    oracle, sde = gaussian_3d(), SDES[sde_name]()
    model = ExactScoreModel(sde, oracle.score(sde))
    sampler = default_registry().get("sampler", "ode").factory(steps=10)
    n = 4000
    x_T = sde.prior_sample((n, 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x, states = sampler.trajectory(model, x_T, sampler.time_grid(sde))

    assert states.shape == (sampler.steps + 1, n, 3)
    torch.testing.assert_close(states[0], x_T)
    torch.testing.assert_close(states[-1], x)
    cov = oracle.covs[0]
    mean_se = (cov.diagonal() / n).sqrt()
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    mean_z = (x.mean(0) - oracle.mean) / mean_se
    cov_z = (torch.cov(x.T) - cov) / cov_se
    print(f"\n[ode] sampler, {sde_name}: max |z| mean {float(mean_z.abs().max()):.2f}, "
          f"covariance {float(cov_z.abs().max()):.2f}")
    assert mean_z.abs().max() < 4
    assert cov_z.abs().max() < 4


# ------------------------------------------------------------------ uniform vs importance-sampled t


def elbo_draws(model, x, sampler, seed):
    return elbo(model, x, sampler, probe="exact", generator=torch.Generator().manual_seed(seed))


def compare_time_samplers(model, x, label):
    """(uniform ELBOs, debiased ELBOs) on the same examples, independent draws; prints the comparison."""
    uniform, debiased = elbo_draws(model, x, Uniform(), 10), elbo_draws(model, x, Debiased(), 11)
    (mu, su), (md, sd) = mean_and_se(uniform), mean_and_se(debiased)
    print(f"\n[elbo] {label}: uniform {mu:.3f} ± {su:.3f}, debiased {md:.3f} ± {sd:.3f} (s.e.); "
          f"variance ratio uniform/debiased {float(uniform.var() / debiased.var()):.2f}")
    return uniform, debiased


def assert_same_mean(uniform, debiased):
    (mu, su), (md, sd) = mean_and_se(uniform), mean_and_se(debiased)
    assert abs(mu - md) < 3 * math.hypot(su, sd)


def exact_score_model(oracle, sde):
    return ExactScoreModel(sde, oracle.score(sde))


def untrained_drift_model(oracle, sde):
    return DiffusionModel(sde, Drift(RandomTimeMLP(oracle.dim), sde))


def exact_score_plus_untrained_drift(oracle, sde):
    """a = g s* + n(y, t) with n an untrained network: an imperfect model near the exact one."""
    network, exact = RandomTimeMLP(oracle.dim), oracle.score(sde)
    return ExactScoreModel(sde, lambda y, t: exact(y, t) + network(y, t) / sde.g(t)[:, None])


def narrow_gaussian_3d():
    """``gaussian_3d`` with its covariance scaled by 1e-3 (eigenvalues 1e-4 … 2e-3): like images'
    fine structure, the marginal score is ≈ −ε/σ (so ‖a‖² ∝ g²/σ²) until σ² falls to the data's scale."""
    wide = gaussian_3d()
    return GaussianOracle(wide.mean, wide.covs[0] * 1e-3)


@pytest.mark.parametrize("make_model", [exact_score_model, untrained_drift_model, exact_score_plus_untrained_drift])
@pytest.mark.parametrize("make_oracle", [gaussian_3d, narrow_gaussian_3d])
def test_debiased_and_uniform_elbo_have_the_same_mean(make_oracle, make_model):
    oracle, sde = make_oracle(), VPSDE()
    x = oracle.sample(20000, torch.Generator().manual_seed(5))
    uniform, debiased = compare_time_samplers(make_model(oracle, sde), x,
                                              f"{make_oracle.__name__}, {make_model.__name__}")
    assert_same_mean(uniform, debiased)


@pytest.mark.parametrize(("make_oracle", "make_model"), [
    (narrow_gaussian_3d, exact_score_model),
    (narrow_gaussian_3d, exact_score_plus_untrained_drift),
])
def test_debiased_elbo_has_lower_variance_where_the_integrand_scales_like_g2_over_sigma2(make_oracle, make_model):
    """q(t) ∝ g²/σ² is the profile of ½‖a‖² when a ≈ g ε/σ, as for the exact score of data with fine
    (≪ 1) structure until σ² falls to that scale; also with an untrained network's drift added.
    There the debiased sampler must cut the variance (measured ≈ 6× for both).

    It is not lower everywhere: where the score stays bounded as t → 0 — the exact score of the
    wide ``gaussian_3d`` (eigenvalues ≥ 0.1), or an untrained drift-parameterized network, whose
    integrand is O(β) — the debiased sampler spends its draws near t = 0 where little happens and
    the variance goes *up* (measured 1.3× and 2.6×; printed by the same-mean test above). An
    untrained network under the noise parameterization (a = −g n/σ) has ½‖a‖² ∝ g²/σ² but no
    finite ELBO (∫ g²/σ² dt diverges at 0), so it cannot be compared.
    """
    oracle, sde = make_oracle(), VPSDE()
    x = oracle.sample(20000, torch.Generator().manual_seed(6))
    uniform, debiased = compare_time_samplers(make_model(oracle, sde), x,
                                              f"{make_oracle.__name__}, {make_model.__name__}")
    assert_same_mean(uniform, debiased)
    assert uniform.var() > 2 * debiased.var()


# ------------------------------------------------------------------ a trained toy model


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 2-D Gaussian, a 64-unit MLP trained by DSM for 300 steps (a few seconds); exact divergence."""
    config = tiny_config(
        data={"n": 2048, "n_test": 512},
        network={"name": "mlp", "hidden": 64, "depth": 2},
        train={"steps": 300, "batch_size": 128, "lr": 3e-3, "log_every": 100, "checkpoint_every": 0},
        eval={"batch_size": 512, "max_examples": None, "probe": "exact", "samples_per_example": 4},
    )
    run_dir = tmp_path_factory.mktemp("likelihood") / "toy"
    with one_thread():
        train(structure(config, "toy", default_registry()), run_dir)
    return run_dir


def test_ode_bpd_of_a_trained_toy_model_is_at_most_its_elbo_bpd(toy_run):
    """The ELBO bounds the λ = 0 SDE's likelihood and the ODE is exact for its own (λ = 1) model, so
    ODE bpd ≤ ELBO bpd holds only approximately: within 3 s.e. of the difference. Neither can beat
    the true density in expectation (KL ≥ 0): ODE bpd ≥ exact bpd − 3 s.e."""
    with one_thread():
        results = open_run(toy_run).evaluate(estimator="both", time_sampler="debiased")
    ode, bound, exact = results["ode"], results["elbo"], results["exact"]
    print(f"\n[ode] toy model: ODE {ode['bpd']:.4f} ± {ode['bpd_se']:.4f}, ELBO {bound['bpd']:.4f} ± "
          f"{bound['bpd_se']:.4f}, exact {exact['bpd']:.4f} ± {exact['bpd_se']:.4f} bits/dim; nfe {ode['nfe']}")
    assert ode["bpd"] <= bound["bpd"] + 3 * math.hypot(ode["bpd_se"], bound["bpd_se"])
    assert ode["bpd"] >= exact["bpd"] - 3 * math.hypot(ode["bpd_se"], exact["bpd_se"])
    assert ode["nfe"] > 0
    assert ode["n"] == bound["n"] == 512


def test_eval_cli_with_both_estimators_prints_both_and_writes_them_to_eval_json(toy_run, capsys):
    (toy_run / "eval.json").unlink(missing_ok=True)  # the one training wrote: this must be the CLI's
    with one_thread():
        status, out, err = run_cli(capsys, "eval", toy_run, "--estimator", "both", "--time-sampler", "debiased",
                                   "--samples-per-example", "2", "--max-examples", "128")
    assert status == 0, err
    labels = [line.split(":")[0].strip() for line in out.strip().splitlines()]
    assert {"elbo", "ode"} <= set(labels)
    saved = json.loads((toy_run / "eval.json").read_text())
    # 128 of the split's examples: recorded beside the training run's results, not as the headline
    entries = {e["estimator"]: e for e in saved["results"].values() if e["n"] == 128}
    assert entries["elbo"]["full"] is entries["ode"]["full"] is False
    assert entries["ode"]["nfe"] > 0
    assert all(math.isfinite(entries[k]["bpd"]) for k in ("elbo", "ode"))
