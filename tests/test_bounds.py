"""The three bounds (MATH.md §15) on an oracle: discrete data of L levels made from a Gaussian with a diagonal
covariance in model space z = 2x̃ − 1, and the exact score, so every model's P(x) is computable bin by bin.

With the exact score the generative marginal at t_ε is the forward one, N(m μ, m² Σ + σ² I), so
- paper:     P(x) = the Gaussian N(μ, Σ)'s mass of the bin (the ELBO to t = 0 is log N exactly);
- truncated: the model of z̃ is Y_{t_ε}/m, N(μ, Σ + σ²/m² I);
- discrete:  P(x) = Π_d ∫ N(y; m μ_d, m² Σ_dd + σ²) softmax_k(−(y − m v_k)²/2σ²)[x_d] dy (quadrature).
Each bound must lie above its model's −log₂ P(x)/D. On this density, smooth at the bin's scale with
σ(t_ε) far below the bin width, theory orders them: the decoder is nearly exact, uniform dequantization
pays the small KL of a flat q to p within the bin, and the matched truncated normal (τ ≈ 12) its negative
entropy, about 2.5 bits per dimension.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers_exp import assert_one_line_error, run_cli, tiny_config, write_experiment
from oracles import GaussianMixtureOracle, GaussianOracle
from sdeflow.core.bounds import Discrete, Truncated, make_bound
from sdeflow.core.model import ExactScoreModel
from sdeflow.core.transforms import Affine, bits_per_dim
from sdeflow.likelihood.elbo import dsm_elbo, elbo, elbo_forms
from sdeflow_builtin.dequantizers import Uniform
from sdeflow_builtin.sdes import VPSDE
from sdeflow_builtin.time_samplers import Debiased

L = 8
MU = torch.tensor([0.1, -0.2], dtype=torch.float64)
STD = torch.tensor([0.5, 0.4], dtype=torch.float64)
N, K = 300, 256


def normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def levels_data(n: int = N) -> torch.Tensor:
    """x ∈ {0..L−1}/(L−1) whose bins carry the Gaussian's mass (drawn by discretising Gaussian draws)."""
    g = torch.Generator().manual_seed(0)
    z = MU + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    k = ((z + 1) / 2 * L).floor().clamp(0, L - 1)
    return k / (L - 1)


def bin_edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin of x in model space: x̃ ∈ [k/L, (k+1)/L] → z ∈ [2k/L − 1, 2(k+1)/L − 1]."""
    k = torch.round(x * (L - 1))
    return 2 * k / L - 1, 2 * (k + 1) / L - 1


def gaussian_bin_bits(x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """−log₂ of N(μ, diag var)'s mass of x's bin, per dimension, averaged over dimensions."""
    lo, hi = bin_edges(x)
    std = var.sqrt()
    mass = normal_cdf((hi - MU) / std) - normal_cdf((lo - MU) / std)
    return -torch.log2(mass).mean(dim=1)


def discrete_bits(x: torch.Tensor, m: float, sigma: float, points: int = 4001) -> torch.Tensor:
    """The discrete model's −log₂ P(x)/D by quadrature over y, one dimension at a time."""
    values = 2 * torch.arange(L, dtype=torch.float64) / (L - 1) - 1
    bits = torch.zeros(x.shape[0], dtype=torch.float64)
    for d in range(2):
        sd = math.sqrt(m**2 * STD[d] ** 2 + sigma**2)
        y = torch.linspace(float(m * MU[d]) - 8 * sd, float(m * MU[d]) + 8 * sd, points, dtype=torch.float64)
        density = torch.exp(-0.5 * ((y - m * MU[d]) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        decoder = torch.softmax(-((y[:, None] - m * values) ** 2) / (2 * sigma**2), dim=1)  # (points, L)
        P = torch.trapezoid(density[:, None] * decoder, y, dim=0)  # (L,)
        k = torch.round(x[:, d] * (L - 1)).long()
        bits -= torch.log2(P[k]) / 2
    return bits


def setup():
    sde = VPSDE()
    model = ExactScoreModel(sde, GaussianOracle(MU, torch.diag(STD**2)).score(sde))
    t = torch.tensor([sde.t_eps], dtype=torch.float64)
    return sde, model, float(sde.m(t)), float(sde.sigma(t))


def bound_bits(model, bound, x: torch.Tensor, estimator=dsm_elbo, seed: int = 1) -> torch.Tensor:
    """The kernel's bpd under ``bound``: its model space, the estimator (K draws, debiased t, exact
    divergence) and the bits conversion, per example."""
    model.bound = bound
    space = bound.space(Affine(), L, Uniform(), model.sde)
    g = torch.Generator().manual_seed(seed)
    z, log_det, log_q = space(x, generator=g)
    kwargs = {"probe": "exact", "samples": K, "generator": g}
    logp = estimator(model, z, Debiased(), **kwargs)
    return bits_per_dim(logp, log_det, 2, space.bits_offset, log_q)


def assert_above(bits: torch.Tensor, exact: torch.Tensor, slack: float = 0.0) -> float:
    gap = bits - exact
    mean, se = float(gap.mean()), float(gap.std() / math.sqrt(gap.numel()))
    assert mean > -3 * se - slack, (mean, se)
    return mean


def test_each_bound_lies_above_its_models_probability_and_theory_orders_them():
    """A smooth density (the continuous Gaussian's score): uniform dequantization is all but tight; the
    bounds from t_ε pay for a q far narrower than the model's density within a bin: the truncated one its
    negative entropy −H(u) (τ ≈ 12), the discrete one log(spacing · m/(σ √(2πe))), the KL of the
    forward q(y_ε | x) to a posterior spread over the level's whole cell."""
    sde, model, m, sigma = setup()
    x = levels_data()
    gaps = {
        "paper": assert_above(bound_bits(model, make_bound("paper"), x), gaussian_bin_bits(x, STD**2)),
        "truncated": assert_above(bound_bits(model, Truncated(), x), gaussian_bin_bits(x, STD**2 + sigma**2 / m**2)),
        "discrete": assert_above(bound_bits(model, make_bound("discrete", Affine(), L), x), discrete_bits(x, m, sigma)),
    }
    tau = m / (L * sigma)
    Z = math.erf(tau / math.sqrt(2))
    minus_entropy = math.log(2 * tau) - math.log(math.sqrt(2 * math.pi * math.e) * Z) + tau * math.exp(-tau**2 / 2) / (
        math.sqrt(2 * math.pi) * Z)
    cell = math.log(2 / (L - 1) * m / (sigma * math.sqrt(2 * math.pi * math.e)))
    assert abs(gaps["paper"]) < 0.12
    assert abs(gaps["truncated"] - minus_entropy / math.log(2)) < 0.2
    assert abs(gaps["discrete"] - cell / math.log(2)) < 0.25
    assert gaps["paper"] < gaps["truncated"] < gaps["discrete"]


def levels_oracle(centres: torch.Tensor) -> tuple[GaussianMixtureOracle, torch.Tensor]:
    """A model that has learned the levels: data all at ``centres`` (per dimension, in model space) with the
    Gaussian's bin masses p_k, as a mixture of L² (nearly) point masses; and p_k per dimension."""
    lo = 2 * torch.arange(L, dtype=torch.float64) / L - 1
    p = torch.stack([normal_cdf((lo + 2 / L - MU[d]) / STD[d]) - normal_cdf((lo - MU[d]) / STD[d]) for d in range(2)])
    p = p / p.sum(dim=1, keepdim=True)
    i, j = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    weights = (p[0][i] * p[1][j]).reshape(-1)
    means = torch.stack([centres[i], centres[j]], dim=-1).reshape(-1, 2)
    return GaussianMixtureOracle(weights, means, 1e-10 * torch.eye(2).expand(L * L, 2, 2)), p


@pytest.mark.parametrize("bound", ["discrete", "truncated"])
def test_a_bound_from_t_eps_is_tight_on_a_model_that_has_learned_the_levels(bound):
    """The exact score of discrete data (point masses at the levels, as each bound's space places them: the
    level values for the decoder, the bin centres for the dequantizer): both bounds reach −log₂ P(x)."""
    sde = VPSDE()
    values = 2 * torch.arange(L, dtype=torch.float64) / (L - 1) - 1
    centres = values if bound == "discrete" else 2 * (torch.arange(L, dtype=torch.float64) + 0.5) / L - 1
    oracle, p = levels_oracle(centres)
    model = ExactScoreModel(sde, oracle.score(sde))
    x = levels_data(100)
    k = torch.round(x * (L - 1)).long()
    exact = -(torch.log2(p[0][k[:, 0]]) + torch.log2(p[1][k[:, 1]])) / 2
    gap = bound_bits(model, make_bound(bound, Affine(), L), x, estimator=dsm_elbo) - exact
    assert abs(float(gap.mean())) < 0.03 + 3 * float(gap.std()) / math.sqrt(gap.numel())


def test_the_discrete_bound_is_its_models_probability_up_to_the_decoders_gap():
    """With the exact score the ELBO from t_ε is E_q log p_ε(y) exactly, so the discrete bound is
    E_q[log p_ε(y) + log p(x | y) − log q(y | x)], computed here by quadrature per dimension."""
    sde, model, m, sigma = setup()
    x = levels_data(100)
    bits = bound_bits(model, make_bound("discrete", Affine(), L), x)
    values = 2 * torch.arange(L, dtype=torch.float64) / (L - 1) - 1
    expected = torch.zeros(x.shape[0], dtype=torch.float64)
    e = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    w = torch.exp(-0.5 * e**2) / math.sqrt(2 * math.pi)
    for d in range(2):
        z = 2 * x[:, d] - 1
        y = m * z[:, None] + sigma * e  # (n, points)
        sd2 = m**2 * STD[d] ** 2 + sigma**2
        log_p_eps = -0.5 * (y - m * MU[d]) ** 2 / sd2 - 0.5 * torch.log(2 * math.pi * sd2)
        logits = -((y[..., None] - m * values) ** 2) / (2 * sigma**2)
        k = torch.round(x[:, d] * (L - 1)).long()
        log_decoder = torch.log_softmax(logits, dim=-1).gather(-1, k[:, None, None].expand(-1, len(e), 1))[..., 0]
        log_q = -0.5 * e**2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        expected += torch.trapezoid(w * (log_p_eps + log_decoder - log_q), e, dim=1)
    expected_bits = -expected / (2 * math.log(2))
    diff = bits - expected_bits
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(diff.numel()) + 1e-3


@pytest.mark.parametrize("bound", ["truncated", "discrete"])
def test_both_forms_and_the_combined_draws_estimate_the_same_bound(bound):
    sde, model, m, sigma = setup()
    x = levels_data(200)
    b = make_bound(bound, Affine(), L)
    divergence = bound_bits(model, b, x, estimator=elbo)
    denoising = bound_bits(model, b, x, estimator=dsm_elbo)
    diff = divergence - denoising
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(diff.numel())
    model.bound = b
    z = b.space(Affine(), L, Uniform(), sde)(x, generator=torch.Generator().manual_seed(2))[0]
    forms = elbo_forms(model, z, Debiased(), probe="exact", samples=4, generator=torch.Generator().manual_seed(3))
    below = forms.t < sde.t_eps
    assert bool(below.any())  # the debiased sampler puts about 5 % of its draws there
    assert torch.all(forms.divergence[below] == 0) and torch.all(forms.denoising[below] == 0)


def test_draws_below_t_eps_count_zero_and_the_network_never_sees_them():
    seen = []

    def score(y, t):
        seen.append(t.min())
        return -y

    sde = VPSDE()
    model = ExactScoreModel(sde, score)
    model.bound = Truncated()
    tiny = type("Tiny", (), {"sample": lambda self, sde, n, device=None, generator=None:
                             (torch.full((n,), 1e-6, dtype=torch.float64), torch.ones(n, dtype=torch.float64))})()
    x = torch.zeros(4, 3, dtype=torch.float64)
    value = elbo(model, x, tiny, probe="exact")
    prior = sde.prior_log_prob(sde.marginal_sample(x, torch.ones(4, dtype=torch.float64), torch.zeros_like(x)))
    assert min(float(t) for t in seen) >= sde.t_eps
    # Nothing of the integrand: the prior term (random Y_T) plus the head 3 log m(t_ε) only.
    head = 3 * math.log(float(sde.m(torch.tensor([sde.t_eps], dtype=torch.float64))))
    assert torch.allclose(value - head, value - head)  # finite
    assert float((value - head - prior).abs().max()) < 30  # Y_T is random: a prior term, not an integral of 1/t


def test_the_truncated_dequantizer_is_matched_to_sigma_at_t_eps_in_model_space():
    sde = VPSDE()
    t = torch.tensor([sde.t_eps], dtype=torch.float64)
    m, sigma = float(sde.m(t)), float(sde.sigma(t))
    space = Truncated().space(Affine(), 256, None, sde)
    x = torch.full((1, 5), 0.5, dtype=torch.float64)
    tau = space.dequantizer.tau(x, 256)
    assert torch.allclose(tau, torch.full_like(tau, m * 2 / (2 * 256 * sigma)))  # half-width 1/256 over σ/m
    from sdeflow.core.transforms import Logit
    logit = Truncated().space(Logit(0.05), 256, None, sde).dequantizer.tau(torch.tensor([[0.0, 0.5]]), 256)
    assert float(logit[0, 0]) > 2 * float(logit[0, 1])  # the logit stretches bins near the edges


# ------------------------------------------------------------------ the experiment's key and the CLI


def test_the_paper_bound_is_refused_for_a_parameterization_unbounded_at_zero(tmp_path, capsys):
    path = write_experiment(tmp_path, parameterization={"name": "velocity"})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, "bound: paper", "parameterization: {name: velocity}", "bound: truncated")
    path = write_experiment(tmp_path, tiny_config(parameterization={"name": "noise"}, bound="truncated"))
    status, out, err = run_cli(capsys, "check", path)
    assert status == 0, err


def test_a_bound_from_t_eps_owns_the_region_below_it(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(bound="truncated", dequantizer={"name": "truncated_normal"}))
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, "dequantizer: {name: truncated_normal", "bound: truncated")
    path = write_experiment(tmp_path, tiny_config(bound="discrete"))
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, "bound: discrete", "continuous")
    path = write_experiment(tmp_path, tiny_config(bound="nonesuch"))
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, "bound", "nonesuch")


def test_velocity_trains_on_the_truncated_bound_and_evaluates_finite_under_each(tmp_path, capsys):
    config = tiny_config(parameterization={"name": "velocity"}, loss={"name": "elbo", "form": "denoising"},
                         bound="truncated", eval={"estimator": "elbo,dsm_elbo,ode", "max_examples": 16,
                                                  "batch_size": 64})
    path = write_experiment(tmp_path, config)
    status, out, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert status == 0, err
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    for name in ("elbo", "dsm_elbo", "ode"):
        entry = saved["test"][name]
        assert math.isfinite(entry["bpd"]) and entry["protocol"]["bound"] == "truncated"
        assert entry["settings"]["bound"] == "truncated"
    status, out, err = run_cli(capsys, "eval", tmp_path / "run", "--bound", "paper")
    assert_one_line_error(status, err, "bound: paper", "velocity")
    status, out, err = run_cli(capsys, "eval", tmp_path / "run", "--bound", "discrete")
    assert_one_line_error(status, err, "bound: discrete", "continuous")


def test_eval_under_another_bound_is_recorded_beside_the_headline(tmp_path, capsys):
    path = write_experiment(tmp_path)
    assert run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")[0] == 0
    status, out, err = run_cli(capsys, "eval", tmp_path / "run", "--bound", "truncated")
    assert status == 0, err
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["test"]["elbo"]["protocol"]["bound"] == "paper"  # the headline is the experiment's own
    other = [e for key, e in saved["results"].items() if e["protocol"]["bound"] == "truncated" and "elbo" in key]
    assert len(other) == 1 and not other[0]["full"] and other[0]["settings"]["bound"] == "truncated"
    assert math.isfinite(other[0]["bpd"]) and other[0]["bpd"] != saved["test"]["elbo"]["bpd"]


def test_the_discrete_head_is_exact_for_a_decoder_that_cannot_be_wrong():
    """One level (L = 2 with σ tiny against the spacing): p(x | y) ≈ 1, so the head is the entropy term."""
    sde = VPSDE(t_eps=1e-7)
    model = ExactScoreModel(sde, lambda y, t: -y)
    bound = Discrete(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    z = torch.tensor([[-1.0, 1.0, 1.0]], dtype=torch.float64)
    sigma = float(sde.sigma(torch.tensor([1e-7], dtype=torch.float64)))
    head = bound.head(model, z, torch.Generator().manual_seed(0))
    assert float(head) == pytest.approx(1.5 * math.log(2 * math.pi * math.e * sigma**2), rel=1e-9)


@pytest.mark.parametrize("bound", ["truncated", "discrete"])
def test_images_train_and_evaluate_under_each_bound_with_repeated_ode_solves(tmp_path, bound):
    """MNIST-format images in VDM's affine space: the ELBO loss trains velocity under the bound, and the
    three ELBO estimators and the ODE (two solves per example, log-mean-exp over their dequantization
    draws) report finite bits per dimension, recorded with the bound, the repeats and the data NLL."""
    from fakedata import write_mnist
    from sdeflow.training.trainer import train
    from test_training import experiment

    write_mnist(tmp_path / "data", n_train=12, n_test=4)
    data = {"name": "mnist", "root": str(tmp_path / "data"), "download": False, "n_val": 2, "affine": True,
            "logit_alpha": None}
    network = {"name": "unet", "ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "num_groups": 4}
    exp = experiment(tmp_path, "train.batch_size=4", "train.steps=2", data=data, network=network, bound=bound,
                     parameterization={"name": "velocity"}, loss={"name": "elbo", "form": "denoising"},
                     sampler={"name": "euler_maruyama", "steps": 2}, sample={"num": 4},
                     eval={"batch_size": 4, "max_examples": 4, "estimator": "elbo,dsm_elbo,combined_elbo,ode",
                           "ode_repeats": 2, "ode_combine": "logmeanexp", "ode_rtol": 1e-3, "ode_atol": 1e-3,
                           "pilot_examples": 4, "proposal_bins": 4})
    train(exp, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())["test"]
    for name in ("elbo", "dsm_elbo", "combined_elbo", "ode"):
        entry = saved[name]
        assert math.isfinite(entry["bpd"]) and 0 < entry["bpd"] < 40, (name, entry["bpd"])
        assert entry["protocol"]["bound"] == bound
        assert entry["nats"] == pytest.approx(entry["bpd"] * 784 * math.log(2))
    assert saved["ode"]["settings"]["repeats"] == 2 and saved["ode"]["settings"]["combine"] == "logmeanexp"
    assert saved["elbo"]["protocol"]["bits_offset"] == (0.0 if bound == "discrete" else 8.0)
