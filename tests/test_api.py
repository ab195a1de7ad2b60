"""The Python API (sdeflow.experiment / component / train / open_run / Run) against the CLI it underlies:
the same checks and errors, the same numbers, and chunked training equal to training in one go."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sdeflow
from helpers_exp import run_cli, tiny_config, write_experiment
from sdeflow.core.errors import ConfigError
from sdeflow.rundir.results import per_example


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return sdeflow.train(sdeflow.experiment(tiny_config()), tmp_path_factory.mktemp("api") / "run", progress=False)


def test_an_experiment_from_a_mapping_equals_the_same_yaml_file(tmp_path):
    path = write_experiment(tmp_path)
    from_file = sdeflow.experiment(path, {"train.steps": 7}, sde={"beta_max": 10.0})
    from_mapping = sdeflow.experiment(tiny_config(train={"steps": 7}, sde={"beta_max": 10.0}))
    assert from_file.to_dict() == {**from_mapping.to_dict(), "name": from_file.name}
    assert from_file.train.steps == 7 and from_file.components["sde"]["beta_max"] == 10.0


def test_experiment_errors_are_the_cli_errors(tmp_path, capsys):
    path = write_experiment(tmp_path)
    for overrides in ({"train.steps": 0}, {"sde.beta_maxx": 1.0}, {"eval.estimator": "elbo,nope"}):
        with pytest.raises(ConfigError) as raised:
            sdeflow.experiment(path, overrides, where="command line")
        status, _, err = run_cli(capsys, "check", path, *(f"{k}={v}" for k, v in overrides.items()))
        assert status == 2 and str(raised.value) in err


def test_component_is_checked_like_yaml_and_takes_the_kernels_inputs():
    sde = sdeflow.component("sde", "vp", beta_max=10.0)
    m = sde.m(torch.tensor([1.0])).item()  # exp(−½∫₀¹β): β(t) = 0.1 + (10 − 0.1) t
    assert m == pytest.approx(math.exp(-0.5 * (0.1 + 0.5 * 9.9)), rel=1e-6)
    network = sdeflow.component("network", "mlp", data_shape=(2,), hidden=8, depth=1)
    drift = sdeflow.component("parameterization", "drift", network=network, sde=sde)
    model = sdeflow.DiffusionModel(sde, drift)
    assert model.a(torch.zeros(3, 2), torch.full((3,), 0.5)).shape == (3, 2)
    with pytest.raises(ConfigError, match=r"^component: sde.beta_maxx: unknown argument .*did you mean 'beta_max'"):
        sdeflow.component("sde", "vp", beta_maxx=1.0)
    with pytest.raises(ConfigError, match=r"needs data_shape"):
        sdeflow.component("network", "mlp")
    with pytest.raises(ConfigError, match=r"unknown kind 'sdes'"):
        sdeflow.component("sdes", "vp")


def test_training_in_chunks_equals_training_in_one_go(tmp_path):
    exp = sdeflow.experiment(tiny_config())
    chunked = sdeflow.train(exp, tmp_path / "chunked", steps=2, progress=False)
    assert chunked.step == 2
    assert chunked.train(steps=2, progress=False) is chunked and chunked.step == 4
    straight = sdeflow.train(exp, tmp_path / "straight", progress=False)
    assert straight.step == 4
    for a, b in zip(chunked.ema.state_dict().values(), straight.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert sdeflow.train(exp, progress=False).path.name.startswith("sdeflow-tiny-")  # a temporary folder


def test_batch_bpd_is_the_evaluations_per_example_bpd(trained):
    """On the first evaluation batch with the experiment's seed, Run.bpd / Run.elbo give exactly the
    per-example values recorded by the final evaluation, and the two are one conversion apart."""
    recorded = per_example(trained.path, "test", "elbo")
    x = trained.examples("test", trained.exp.eval.max_examples)
    bpd = trained.bpd(x, seed=trained.exp.seed)
    assert torch.allclose(bpd, recorded["bpd"], rtol=0, atol=1e-12)
    nats = -trained.elbo(x, seed=trained.exp.seed)
    assert torch.allclose(nats, recorded["nats"], rtol=0, atol=1e-12)
    assert torch.allclose(bpd, nats / (2 * torch.log(torch.tensor(2.0, dtype=torch.float64))), atol=1e-12)
    assert not torch.equal(trained.bpd(x, seed=1), bpd)  # other draws: another unbiased estimate
    with pytest.raises(sdeflow.core.errors.SdeflowError, match="one name"):
        trained.bpd(x, estimator="elbo,ode")


def test_evaluate_returns_and_records_what_the_cli_prints(trained, capsys):
    results = trained.evaluate("val", estimator="dsm_elbo")
    out = capsys.readouterr().out
    assert f"{results['dsm_elbo']['bpd']:.4f}" in out
    saved = json.loads((trained.path / "eval.json").read_text())
    assert saved["val"]["dsm_elbo"]["bpd"] == results["dsm_elbo"]["bpd"]
    assert trained.results["val"]["dsm_elbo"]["bpd"] == results["dsm_elbo"]["bpd"]
    before = (trained.path / "eval.json").read_bytes()
    trained.evaluate("val", estimator="elbo", samples=2, save=False, show=False)
    assert (trained.path / "eval.json").read_bytes() == before


def test_samples_are_seeded_and_follow_the_sampler_asked_for(trained):
    a, b = trained.sample(32, seed=3), trained.sample(32, seed=3)
    assert a.shape == (32, 2) and torch.equal(a, b)
    assert not torch.equal(a, trained.sample(32, seed=4))
    ode = trained.sample(32, sampler="ode", seed=3)
    assert not torch.equal(ode, trained.sample(32, lam=1.0, seed=3))  # adaptive solve vs 8 Euler steps
    states = trained.trajectories(5, lam=0.5, steps=6)
    assert states.shape == (7, 5, 2)
    with pytest.raises(ConfigError, match="unknown argument"):
        trained.sample(4, sampler="ode", lam=0.5)


def test_metrics_and_figures(trained):
    records = trained.metrics()
    rows = records.to_dict("records") if hasattr(records, "to_dict") else records
    assert [r["step"] for r in rows if "loss" in r and r["loss"] == r["loss"]] == [1, 2, 3, 4]
    assert len(trained.figure("trajectories", n=4, lam=(0.0, 0.5, 1.0), steps=4).axes) == 3
    assert len(trained.figure("samples", n=8).axes) == 1
    assert len(trained.figure("curves").axes) == 2
    with pytest.raises(sdeflow.core.errors.SdeflowError, match="expected samples, trajectories or curves"):
        trained.figure("histogram")


def test_an_error_about_an_override_names_where_it_was_given(tmp_path, capsys):
    from helpers_exp import assert_one_line_error

    path = write_experiment(tmp_path, train={"steps": 0})
    status, _, err = run_cli(capsys, "check", path, "seed=3")
    assert status == 2 and "command line" not in err and f"{path}: train.steps" in err  # the file's own mistake
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "check", path, "train.steps=0")
    assert_one_line_error(status, err, "command line: train.steps: must be at least 1, got 0")
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run", "sde.beta_maxx=1")
    assert_one_line_error(status, err, "command line: sde.beta_maxx: unknown argument")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^overrides: train.steps: must be at least 1"):
        sdeflow.experiment(path, {"train.steps": 0})


def test_debiased_time_with_sigma2_weighting_is_flagged_with_the_fix(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "check", path, "time_sampler.name=debiased")
    assert status == 0
    (line,) = [x for x in err.splitlines() if "warning" in x]
    assert "time_sampler.name 'debiased'" in line and "loss.weighting=likelihood" in line
    status, _, err = run_cli(capsys, "check", path, "time_sampler.name=debiased", "loss.weighting=likelihood")
    assert status == 0 and "warning" not in err
    with pytest.warns(sdeflow.api.SdeflowAdvice, match="loss.weighting=likelihood"):
        sdeflow.experiment(path, {"time_sampler.name": "debiased"})
