"""The named likelihood estimators (sdeflow.likelihood.estimators) and the time proposals they draw from.

Every estimator × time proposal is an unbiased estimate of the same ELBO (MATH.md §5, §9): with the exact
score, its mean over many x is log p(x) up to the prior mismatch (≈ 1e-5 nats for VP), checked within
4 standard errors; for any network, trained or not, the divergence and denoising forms have the same mean.
Run ``pytest -s`` to see the measured gaps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import integrate, stats

from oracles import FixedTime, RandomTimeMLP, gaussian_3d, mixture_2d, one_thread
from sdeflow.core.errors import InvalidArgument
from sdeflow.core.model import DiffusionModel, ExactScoreModel
from sdeflow.core.statistics import mean_and_se
from sdeflow.evaluation.evaluate import elbo_estimator
from sdeflow.experiment.config import EvalConfig
from sdeflow.likelihood.elbo import denoising_constant, dsm_elbo, elbo, elbo_forms, prior_term
from sdeflow.likelihood.estimators import ESTIMATOR_NAMES, make_estimators, parse_estimators, prepare_all
from sdeflow.likelihood.time_proposals import FittedProposal, Stratified, log_time_edges
from sdeflow_builtin.losses import DSM
from sdeflow_builtin.parameterizations import Drift
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE
from sdeflow_builtin.time_samplers import Debiased, Uniform

N_EXAMPLES = 20_000
K = 4
ORACLES = {"gaussian-3d": gaussian_3d, "mixture-2d": mixture_2d}
PROPOSALS = {  # name: (time sampler, EvalConfig settings)
    "uniform": (Uniform, {}),
    "debiased": (Debiased, {}),
    "uniform-stratified": (Uniform, {"stratify_time": True}),
    "debiased-stratified": (Debiased, {"stratify_time": True}),
    "fitted": (Debiased, {"time_proposal": "fitted"}),
    "fitted-stratified": (Debiased, {"time_proposal": "fitted", "stratify_time": True}),
}
SDES = {"vp": VPSDE, "subvp": lambda: SubVPSDE(beta_max=8.0, T=1.5), "ve": lambda: VESDE(0.05, 20.0)}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def build(name: str, proposal: str, samples: int = K, **settings):
    sampler, extra = PROPOSALS[proposal]
    cfg = EvalConfig(samples_per_example=samples, batch_size=4096, **{**extra, **settings})
    return make_estimators([name], cfg, sampler(), time_sampler_name=proposal)[name]


def prepared(name, proposal, model, x, seed=7, **settings):
    estimate = build(name, proposal, **settings)
    prepare_all({name: estimate}, model, x[:256], seed=seed)
    return estimate


# ------------------------------------------------------------------ unbiased, against exact log-densities


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("name", ["elbo", "dsm_elbo", "combined_elbo"])
@pytest.mark.parametrize("data", ORACLES)
def test_exact_score_estimate_is_the_log_density(data, name, proposal):
    """Gap ELBO − log p in [−KL bound, 0] within 4 s.e.; the denoising constant alone is many s.e."""
    oracle, sde = ORACLES[data](), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    gen = torch.Generator().manual_seed(11)
    x = oracle.sample(N_EXAMPLES, gen)
    estimate = prepared(name, proposal, model, oracle.sample(256, gen))
    gap, se = mean_and_se(estimate(model, x, gen) - oracle.log_prob(x))
    kl = oracle.prior_kl_bound(sde)
    print(f"\n[estimators] {data} {name} {proposal}: gap {gap:+.4f} ± {se:.4f}")
    assert -kl - 4 * se <= gap <= 4 * se
    assert denoising_constant(sde, oracle.dim) > 25 * se  # leaving out the constant of §9 would be caught


def test_exact_score_gap_is_the_prior_mismatch_for_every_form():
    """β_max = 4: KL(q_T ‖ p_T) ≈ 0.09 nats, many s.e.: each form must find −KL, not 0."""
    oracle, sde = gaussian_3d(), VPSDE(beta_max=4.0)
    model = ExactScoreModel(sde, oracle.score(sde))
    gen = torch.Generator().manual_seed(3)
    x = oracle.sample(8 * N_EXAMPLES, gen)
    kl = oracle.prior_kl(sde)
    for name in ("dsm_elbo", "combined_elbo"):
        estimate = prepared(name, "fitted-stratified", model, x)
        gap, se = mean_and_se(estimate(model, x, gen) - oracle.log_prob(x))
        print(f"\n[estimators] β_max=4 {name}: gap {gap:+.4f} ± {se:.4f}, expected {-kl:+.4f}")
        assert kl > 6 * se
        assert abs(gap + kl) < 4 * se


# ------------------------------------------------------------------ the two forms agree for any network


@pytest.mark.parametrize("sde_name", SDES)
def test_forms_agree_for_an_untrained_network(sde_name):
    """MATH.md §9 holds for every network: on the same draws, divergence − denoising form has mean 0;
    and the independent estimators elbo and dsm_elbo agree within their s.e."""
    sde = SDES[sde_name]()
    model = DiffusionModel(sde, Drift(RandomTimeMLP(3, seed=1), sde))
    gen = torch.Generator().manual_seed(5)
    x = gaussian_3d().sample(N_EXAMPLES, gen)
    forms = elbo_forms(model, x, Debiased(), generator=gen)
    diff, se = mean_and_se(forms.divergence_form() - forms.denoising_form())
    print(f"\n[estimators] {sde_name} untrained: divergence − denoising form {diff:+.4f} ± {se:.4f}")
    assert abs(diff) < 4 * se
    (a, se_a), (b, se_b) = mean_and_se(elbo(model, x, Debiased(), generator=gen)), \
        mean_and_se(dsm_elbo(model, x, Debiased(), generator=gen))
    assert abs(a - b) < 4 * math.hypot(se_a, se_b)
    assert denoising_constant(sde, 3) > 10 * se


def test_forms_agree_for_a_briefly_trained_model():
    """A small MLP trained by DSM for a few hundred steps on the 2-D mixture: elbo, dsm_elbo and
    combined_elbo (fitted proposal) estimate the same ELBO, within their s.e."""
    oracle, sde = mixture_2d(), VPSDE()
    torch.manual_seed(0)
    model = DiffusionModel(sde, Drift(RandomTimeMLP(2, hidden=64, seed=2), sde))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    loss = DSM("likelihood")
    for _ in range(300):
        optimiser.zero_grad()
        loss(model, oracle.sample(256, gen), Debiased(), generator=gen).mean().backward()
        optimiser.step()
    model.requires_grad_(False)
    x = oracle.sample(N_EXAMPLES // 2, gen)
    results = {}
    for name in ("elbo", "dsm_elbo", "combined_elbo"):
        results[name] = mean_and_se(prepared(name, "fitted", model, x)(model, x, gen) - oracle.log_prob(x))
        print(f"\n[estimators] trained: {name} gap {results[name][0]:+.4f} ± {results[name][1]:.4f}")
    (ref, ref_se) = results["elbo"]
    for gap, se in results.values():
        assert abs(gap - ref) < 4 * math.hypot(se, ref_se)
    assert results["elbo"][0] < 0  # a bound: a briefly trained model is visibly below log p
    forms = elbo_forms(model, x, Debiased(), generator=gen)
    diff, se = mean_and_se(forms.divergence_form() - forms.denoising_form())
    assert abs(diff) < 4 * se


# ------------------------------------------------------------------ the pieces of the denoising form


@pytest.mark.parametrize("sde_name", SDES)
def test_denoising_constant_is_the_integral_of_D_c(sde_name):
    """∫_{t_ε}^T D (½ r + κ) dt = ½ D log(σ²(T)/σ²(t_ε)): checks each SDE's κ = linear_drift."""
    sde = SDES[sde_name]()
    c = lambda s: float(0.5 * sde.likelihood_weight(torch.tensor([s], dtype=torch.float64))  # noqa: E731
                        + sde.linear_drift(torch.tensor([s], dtype=torch.float64)))
    value = integrate.quad(c, sde.t_eps, sde.T, limit=500, points=[10 * sde.t_eps])[0]
    assert 5 * value == pytest.approx(float(denoising_constant(sde, 5)), rel=1e-6)


@pytest.mark.parametrize("sde_name", SDES)
def test_closed_form_prior_term_is_the_mean_of_log_p_T(sde_name):
    sde = SDES[sde_name]()
    gen = torch.Generator().manual_seed(0)
    x = gaussian_3d().sample(4, gen)
    exact = prior_term(sde, x)
    T = torch.full((200_000,), sde.T, dtype=torch.float64)
    for i in range(4):
        xs = x[i].expand(200_000, 3)
        draws = sde.prior_log_prob(sde.marginal_sample(xs, T, torch.randn(xs.shape, generator=gen,
                                                                            dtype=torch.float64)))
        mean, se = mean_and_se(draws)
        assert abs(float(exact[i]) - mean) < 4 * se + 1e-9


class NonLinearDrift(VPSDE):
    """A VP-SDE that does not declare its drift linear, and has no Gaussian prior declared either."""

    def linear_drift(self, t):
        return None

    def prior_std(self):
        return None


def test_dsm_elbo_needs_a_declared_linear_drift():
    sde = NonLinearDrift()
    model = ExactScoreModel(sde, gaussian_3d().score(sde))
    x = torch.zeros(2, 3, dtype=torch.float64)
    for fn in (dsm_elbo, elbo_forms):
        with pytest.raises(InvalidArgument, match="linear drift") as info:
            fn(model, x, Uniform())
        assert info.value.argument == "estimator"
    with pytest.raises(InvalidArgument, match="linear drift"):
        make_estimators("combined_elbo", EvalConfig(), Uniform(), sde=sde)
    assert set(make_estimators("elbo,ode", EvalConfig(), Uniform(), sde=sde)) == {"elbo", "ode"}
    # without a declared Gaussian prior, the prior term is one draw of log p_T(Y_T): still finite
    assert torch.isfinite(prior_term(sde, x, torch.Generator().manual_seed(0))).all()


# ------------------------------------------------------------------ time proposals


@pytest.mark.parametrize("sampler", [Uniform, Debiased])
def test_stratified_times_have_the_base_marginal_and_one_per_stratum(sampler):
    sde, k = VPSDE(), 8
    base = sampler()
    t, q = Stratified(base, k).sample(sde, 2500 * k, generator=torch.Generator().manual_seed(0))
    density = sde.likelihood_time_density
    cdf = (lambda s: s / sde.T) if sampler is Uniform else (lambda s: density.cdf(torch.from_numpy(s)).numpy())
    assert stats.kstest(t.double().numpy(), cdf).pvalue > 1e-3
    torch.testing.assert_close(q, base.density(sde, t))
    u = torch.as_tensor(cdf(t.double().numpy()))
    strata = (u * k).floor().clamp(max=k - 1).reshape(-1, k).sort(dim=1).values
    assert (strata == torch.arange(k, dtype=strata.dtype)).all()


def test_stratification_needs_an_inverse_cdf():
    with pytest.raises(InvalidArgument, match="inverse CDF") as info:
        make_estimators("dsm_elbo", EvalConfig(stratify_time=True), FixedTime(0.5))
    assert info.value.argument == "stratify_time"
    # a fitted proposal has its own inverse CDF, so any base sampler will do
    make_estimators("dsm_elbo", EvalConfig(stratify_time=True, time_proposal="fitted"), FixedTime(0.5))


def test_fitted_proposal_is_a_positive_density_its_draws_follow():
    sde = SubVPSDE(T=1.5)
    edges = log_time_edges(sde, 12)
    mass = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mass[[0, 5, 11]] = 0  # bins the pilot never saw
    proposal = FittedProposal(sde, edges, mass)
    grid = torch.cat([torch.logspace(-9, math.log10(sde.T), 2000, dtype=torch.float64),
                      sde.T * torch.rand(2000, dtype=torch.float64)])
    assert (proposal.density(sde, grid) > 0).all()
    mid = 0.5 * (proposal.knots[1:] + proposal.knots[:-1])
    assert float((proposal.density(sde, mid) * proposal.knots.diff()).sum()) == pytest.approx(1.0, abs=1e-12)
    t, q = proposal.sample(sde, 20000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(q, proposal.density(sde, t))
    assert stats.kstest(t.numpy(), lambda s: proposal.cdf(torch.from_numpy(s)).numpy()).pvalue > 1e-3


def test_fitted_proposal_from_a_pilot_and_its_reload():
    """prepare() fits a positive proposal; a fit restored from its JSON gives the same estimates."""
    oracle, sde = gaussian_3d(), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    x = oracle.sample(512, torch.Generator().manual_seed(0))
    estimate = prepared("combined_elbo", "fitted-stratified", model, x)
    assert (estimate.proposal.density(sde, torch.logspace(-8, 0, 500, dtype=torch.float64)) > 0).all()
    fitted = json.loads(json.dumps(estimate.fitted))
    again = build("combined_elbo", "fitted-stratified")
    again.load_fitted(sde, fitted)
    torch.testing.assert_close(again(model, x, torch.Generator().manual_seed(4)),
                               estimate(model, x, torch.Generator().manual_seed(4)))


# ------------------------------------------------------------------ the combined weight


def test_fitted_combination_has_less_variance_than_the_average():
    """With uniform t and the exact score, the denoising form is far noisier than the divergence form
    (r ℓ / q blows up at small t): the fitted per-bin weights must beat the fixed ½."""
    oracle, sde = gaussian_3d(), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    gen = torch.Generator().manual_seed(8)
    x = oracle.sample(N_EXAMPLES // 2, gen)
    half = build("combined_elbo", "uniform", samples=1, combined_weight=0.5)
    fitted = prepared("combined_elbo", "uniform", model, x, samples=1)
    v_half, v_fit = (float((e(model, x, gen) - oracle.log_prob(x)).var()) for e in (half, fitted))
    v_div, v_dsm = (float((e(model, x, gen) - oracle.log_prob(x)).var())
                    for e in (build("elbo", "uniform", samples=1), build("dsm_elbo", "uniform", samples=1)))
    print(f"\n[estimators] variances: divergence {v_div:.1f}, denoising {v_dsm:.1f}, ½ {v_half:.1f}, "
          f"fitted {v_fit:.1f}")
    assert v_dsm > 4 * v_div
    assert v_fit < 0.5 * v_half
    assert v_fit < 1.2 * v_div


# ------------------------------------------------------------------ names, settings, the old entry point


def test_parse_estimators():
    assert parse_estimators("elbo") == ["elbo"]
    assert parse_estimators("both") == ["elbo", "ode"]
    assert parse_estimators(" dsm_elbo, both ,elbo,combined_elbo,dsm_elbo") == ["dsm_elbo", "elbo", "ode",
                                                                               "combined_elbo"]
    assert set(parse_estimators(",".join(ESTIMATOR_NAMES))) == set(ESTIMATOR_NAMES)
    with pytest.raises(InvalidArgument, match="did you mean 'dsm_elbo'") as info:
        parse_estimators("elbo,dsm_elb")
    assert info.value.argument == "estimator"
    assert "unknown estimator 'dsm_elb'" in info.value.message
    with pytest.raises(InvalidArgument, match="unknown estimator ''"):
        parse_estimators("elbo,")


def test_every_estimator_has_json_settings():
    cfg = EvalConfig(time_proposal="fitted", stratify_time=True, samples_per_example=3)
    estimators = make_estimators("elbo,dsm_elbo,combined_elbo,ode", cfg, Debiased(), time_sampler_name="debiased")
    for name, estimate in estimators.items():
        settings = json.loads(json.dumps(estimate.settings))
        assert settings["estimator"] == name
        assert callable(getattr(estimate, "prepare", None))
    assert estimators["combined_elbo"].settings["samples_per_example"] == 3
    assert estimators["combined_elbo"].settings["pilot_examples"] == cfg.pilot_examples
    assert estimators["ode"].settings["method"] == cfg.ode_method and estimators["ode"].nfe == []


def test_elbo_estimator_is_still_the_plain_elbo():
    """sdeflow.evaluation.evaluate.elbo_estimator gives exactly elbo() on the same stream (results do not move)."""
    oracle, sde = mixture_2d(), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    x = oracle.sample(64, torch.Generator().manual_seed(0))
    cfg = EvalConfig(samples_per_example=2)
    ours = elbo_estimator(cfg, Uniform())(model, x, torch.Generator().manual_seed(1))
    plain = elbo(model, x, Uniform(), samples=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
