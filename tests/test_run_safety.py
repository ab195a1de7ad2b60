"""User mistakes caught before compute, and run folders that stay consistent after a crash."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers_exp import Killed, assert_one_line_error, losses, run_cli, snapshot, tiny_config, write_experiment
from sdeflow.core.seeding import derive_seed
from sdeflow.rundir.log import read_metrics
from sdeflow.training.trainer import Trainer, step_seed


def test_lambda_features_need_a_lambda_family_sampler(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(sampler={"name": "ode", "steps": 4}))
    status, _, err = run_cli(capsys, "check", path, "sample.trajectories=true")
    assert_one_line_error(status, err, "sample.trajectories", "sampler 'ode' has no λ")
    status, _, err = run_cli(capsys, "check", path, "sample.lam=0.5")
    assert_one_line_error(status, err, "sample.lam", "euler_maruyama")


def test_sample_with_lam_on_an_ode_run_is_a_one_line_error(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(sampler={"name": "ode", "steps": 4}))
    run = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    status, _, err = run_cli(capsys, "sample", run, "--lam", "0.5")
    assert_one_line_error(status, err, "--lam", "sampler 'ode' has no λ")


def test_an_unknown_ode_solver_is_caught_by_check(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "check", path, "eval.ode_method=dopri", "eval.estimator=ode")
    assert_one_line_error(status, err, "eval.ode_method", "unknown ODE solver 'dopri'", "dopri5")


def test_non_positive_counts_on_the_command_line_are_refused_before_anything_is_written(tmp_path, capsys):
    path = write_experiment(tmp_path)
    run = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    before = snapshot(run)
    for argv in (["eval", run, "--max-examples", "0"], ["eval", run, "--batch-size", "-5"],
                 ["eval", run, "--samples-per-example", "0"], ["sample", run, "--steps", "0"]):
        status, _, err = run_cli(capsys, *argv)
        assert_one_line_error(status, err, "must be at least 1")
    assert snapshot(run) == before


def test_a_crash_before_the_first_checkpoint_leaves_no_stale_metrics(tmp_path, capsys, monkeypatch):
    path = write_experiment(tmp_path, tiny_config(train={"checkpoint_every": 0}))
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", lambda self: (_ for _ in ()).throw(Killed()))  # dies as it would save
        with pytest.raises(Killed):
            run_cli(capsys, "train", path, "--run-dir", run)
    assert [step for step, _ in losses(run)] == [1, 2, 3, 4] and not (run / "checkpoints").exists()
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    steps = [step for step, _ in losses(run)]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # one run's records, not two interleaved


def test_a_different_experiment_is_refused_even_without_a_checkpoint(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(train={"checkpoint_every": 0}))
    run = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "network.hidden=32")
    assert_one_line_error(status, err, "different network", "--restart")
    assert snapshot(run) == before


def test_a_torn_last_metrics_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + '\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]


def test_ranks_draw_unrelated_noise_streams():
    # A linear formula (seed·K + rank·R + step) made rank 1 at step 0 replay rank 0 at step R.
    rank1 = {step_seed(0, 1, k) for k in range(100)}
    rank0 = {step_seed(0, 0, k) for k in range(20_000)}
    assert not rank1 & rank0
    assert derive_seed(0, "a", 1) != derive_seed(0, "a", 2) and derive_seed(1, "a") == derive_seed(1, "a")


def test_sweep_summary_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    status, _, err = run_cli(capsys, "sweep", "--summary", tmp_path / "nowhere")
    assert_one_line_error(status, err, "nowhere", "not a folder of sweep runs")
