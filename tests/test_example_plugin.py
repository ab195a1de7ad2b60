"""The separately installed example plugin works end to end: its SDE and network train, evaluate and
sample through the kernel exactly like built-ins (its SDE has no closed-form time density, so the
debiased sampler runs on the kernel's tabulated one)."""

from __future__ import annotations

import json
import math

from helpers_exp import run_cli, tiny_config, write_experiment
from sdeflow.sweeps.summary import COLUMNS


def test_an_experiment_built_from_the_example_plugin_trains_evaluates_and_samples(tmp_path, capsys):
    config = tiny_config(sde={"name": "vp_const", "beta": 8.0}, network={"name": "resmlp", "hidden": 16},
                         time_sampler={"name": "debiased"}, loss={"name": "dsm", "weighting": "likelihood"})
    path = write_experiment(tmp_path, config)
    run = tmp_path / "run"
    status, out, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert status == 0, err
    result = json.loads((run / "eval.json").read_text())["test"]
    assert math.isfinite(result["elbo"]["bpd"]) and result["elbo"]["n"] == 16
    plugins = (run / "config.yaml").read_text()
    assert "sdeflow-example-plugin" in plugins and "plugin: example" in plugins
    status, out, _ = run_cli(capsys, "sample", run, "--num", "8", "--out", tmp_path / "s.png")
    assert status == 0 and (tmp_path / "s.png").exists()


def test_a_third_party_trainable_sde_is_trained_by_the_bound_and_refused_with_dsm(tmp_path, capsys):
    """vp_learned_beta is an nn.Module with one parameter and nothing else: the kernel trains β (with
    the ELBO loss), keeps it in the checkpoint and its EMA, and refuses σ²-weighted DSM for it."""
    import torch

    from sdeflow.rundir.checkpoint import load

    sde = {"name": "vp_learned_beta", "beta": 5.0}
    path = write_experiment(tmp_path, tiny_config(sde=sde, loss={"name": "elbo"},
                                                  train={"steps": 4, "component_lr": {"sde": 0.1}}))
    run = tmp_path / "run"
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert status == 0, err
    state = load(run / "checkpoints" / "last.pt")
    beta = torch.nn.functional.softplus(state["model"]["sde.rho"])
    assert abs(float(beta) - 5.0) > 0.05 and "sde.rho" in state["ema"]  # four steps at rate 0.1 moved it
    refused = write_experiment(tmp_path, tiny_config(sde=sde), filename="dsm.yaml")
    status, _, err = run_cli(capsys, "check", refused)
    assert status == 2 and "sde: {name: vp_learned_beta" in err and "not a bound on the likelihood" in err


def test_a_third_party_estimator_and_metric_work_in_eval_experiments_and_sweeps(tmp_path, capsys):
    """The example plugin's ``ode_rk4`` estimator and ``mean_distance`` metric, installed from their own
    package: listed, named in an experiment's eval section, run by ``sdeflow eval``, and summarised in a
    sweep whose only estimator is the plugin's."""
    status, out, _ = run_cli(capsys, "components", "estimator")
    assert status == 0 and "ode_rk4" in out and "example" in out
    status, out, _ = run_cli(capsys, "components", "metric")
    assert status == 0 and "mean_distance" in out
    config = tiny_config(eval={"estimator": "ode,ode_rk4", "metrics": "mean_distance,swd", "max_examples": 16,
                               "probe": "exact"})
    path = write_experiment(tmp_path, config)
    status, out, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert status == 0, err
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    rk4 = saved["test"]["ode_rk4"]
    assert math.isfinite(rk4["bpd"]) and rk4["settings"]["method"] == "rk4" and rk4["nfe"] == 400
    assert abs(rk4["bpd"] - saved["test"]["ode"]["bpd"]) < 1e-3  # one ODE, two solvers (exact divergence)
    quality = saved["quality"]["test"]
    assert {"mean_distance", "swd"} <= set(quality) and quality["mean_distance"]["floor"] > 0
    status, out, err = run_cli(capsys, "eval", tmp_path / "run", "--estimator", "ode_rk4", "--metrics",
                               "mean_distance", "--max-examples", "8")
    assert status == 0, err
    assert "ode_rk4" in out and "mean_distance" in out
    sweep = tiny_config(eval={"estimator": "ode_rk4", "max_examples": 16},
                        ablations=[{"name": "score", "set": {"parameterization.name": "score"}}])
    path = write_experiment(tmp_path, sweep, filename="sweep.yaml")
    status, out, err = run_cli(capsys, "sweep", path, "--runs-dir", tmp_path / "runs")
    assert status == 0, err
    summary = (tmp_path / "runs" / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(row.split(",")[COLUMNS.index("test_bpd")] for row in summary[1:])
