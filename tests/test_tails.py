"""The error bar that knows when it is wrong (MATH.md §16): the Pareto shape k̂ of the per-example values'
upper tail, on draws of known shape, on a constructed heavy-tailed evaluation, and on the single-draw ELBO
protocol of the reference against the shipped Swiss-roll evaluation settings."""

from __future__ import annotations

import math

import pytest
import torch

from oracles import GaussianOracle
from sdeflow.core.model import ExactScoreModel
from sdeflow.core.statistics import WARN_K, pareto_k, tail_diagnostic
from sdeflow.evaluation.evaluate import format_results, summarize
from sdeflow.experiment.config import EvalConfig
from sdeflow.likelihood.estimators import make_estimators, prepare_all
from sdeflow_builtin.sdes import VPSDE
from sdeflow_builtin.time_samplers import Debiased, Uniform


def pareto_draws(k: float, n: int, seed: int = 0) -> torch.Tensor:
    """Generalized Pareto draws of shape k (scale 1) by inversion; k = 0 is the exponential."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(u) if k == 0 else (u ** (-k) - 1) / k


@pytest.mark.parametrize("k", [-0.3, 0.0, 0.3, 0.8, 1.2])
def test_pareto_k_recovers_the_shape_of_the_tail(k):
    estimates = [pareto_k(pareto_draws(k, 4000, seed)) for seed in range(5)]
    assert abs(sum(estimates) / len(estimates) - k) < 0.15


def test_a_light_tail_is_trusted_and_a_heavy_one_is_not_and_says_so():
    light = summarize(pareto_draws(0.0, 1000) * 2 * math.log(2), None, 2, 0.0)  # bpd = the draws
    heavy = summarize(pareto_draws(0.9, 1000) * 2 * math.log(2), None, 2, 0.0)
    assert light["tail"]["se_trusted"] is True and light["tail"]["pareto_k"] < WARN_K
    assert heavy["tail"]["se_trusted"] is False and heavy["tail"]["pareto_k"] > 0.7
    assert heavy["tail"]["top1pct_share"] > 4 * light["tail"]["top1pct_share"]  # 45 % against 10 %
    lines = format_results({"elbo": {**heavy, "split": "test"}}, "vector").splitlines()
    assert len(lines) == 2 and "warning" in lines[1] and "cannot be trusted" in lines[1] and "Pareto k" in lines[1]
    assert len(format_results({"elbo": {**light, "split": "test"}}, "vector").splitlines()) == 1
    assert summarize(torch.ones(10), None, 2, 0.0)["tail"] == {"pareto_k": None, "tail_length": 0,
                                                                "top1pct_share": 0.0, "se_trusted": None}


def thin_gaussian_model():
    """Data on a thin ellipse (variances 1 and 1e-4), like the Swiss roll's thin arms: with the exact score
    the ELBO integrand is huge for the rare draws of t where σ(t)² is below the thin variance."""
    oracle = GaussianOracle(torch.zeros(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 1e-4],
                                                                                         dtype=torch.float64)))
    sde = VPSDE()
    return oracle, ExactScoreModel(sde, oracle.score(sde))


def test_the_single_draw_protocol_warns_and_the_shipped_swissroll_settings_do_not():
    oracle, model = thin_gaussian_model()
    x = oracle.sample(2000, torch.Generator().manual_seed(0))
    pilot = oracle.sample(256, torch.Generator().manual_seed(1))
    reference = EvalConfig(probe="exact")  # the paper's code: elbo, uniform t, K = 1
    shipped = EvalConfig(probe="exact", samples_per_example=4, estimator="combined_elbo", time_proposal="fitted",
                         stratify_time=True, time_sampler="debiased")  # experiments/swissroll.yaml's eval
    tails = {}
    for label, cfg, sampler in (("reference", reference, Uniform()), ("shipped", shipped, Debiased())):
        (name, estimate), = make_estimators(cfg.estimator, cfg, sampler).items()
        prepare_all({name: estimate}, model, pilot, seed=0)
        nll = -estimate(model, x, torch.Generator().manual_seed(2)).double()
        tails[label] = summarize(nll, None, 2, 0.0)["tail"]
    assert tails["reference"]["se_trusted"] is False, tails
    assert tails["shipped"]["se_trusted"] is True, tails
    assert tail_diagnostic(torch.zeros(49))["pareto_k"] is None
