"""``sdeflow train | eval | sample`` on run folders: tiny 2-D runs and tiny MNIST / CIFAR-10 runs read by
the real torchvision classes; user errors (divergence, a changed component) exit 2 with one line."""

from __future__ import annotations

import json

import pytest

from fakedata import use_fake_cifar10_checksums, write_cifar10, write_mnist
from helpers_exp import assert_one_line_error, is_png, losses, run_cli, snapshot, write_experiment
from sdeflow.experiment.config import load_experiment
from sdeflow.rundir.checkpoint import load
from sdeflow.training.trainer import train
from sdeflow_builtin.losses import DSM
from sdeflow_builtin.networks import group_norm_silu as fused

TINY_UNET = {"name": "unet", "ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
             "num_groups": 4}
IMAGE_RUN = {
    "network": TINY_UNET,
    "sampler": {"name": "euler_maruyama", "steps": 2},
    "train": {"steps": 2, "batch_size": 4},
    "eval": {"batch_size": 4, "max_examples": 4},
    "sample": {"num": 4},
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 4-step run on 2-D Gaussian data (shared: tests only read it or add files)."""
    folder = tmp_path_factory.mktemp("trained")
    train(load_experiment(write_experiment(folder)), folder / "run")
    return folder / "run"


# ------------------------------------------------------------------ train


def test_train_writes_a_run_folder_and_prints_the_bpd(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, out, err = run_cli(capsys, "train", path, "train.steps=3", "--run-dir", tmp_path / "run")
    assert status == 0, err
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert f"{saved['test']['elbo']['bpd']:.4f}" in out and "bits/dim" in out
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3


def test_train_accepts_overrides_after_the_run_dir_option(tmp_path, capsys):
    # `sdeflow train EXP --run-dir DIR key=value` is how people type it: plain parse_args would leave the
    # overrides after an option unrecognised.
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run", "train.steps=3")
    assert status == 0, err
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3


def test_train_refuses_a_changed_network_and_leaves_the_folder_untouched(trained_run, capsys):
    before = snapshot(trained_run)
    status, _, err = run_cli(capsys, "train", write_experiment(trained_run.parent), "network.hidden=8",
                             "--run-dir", trained_run)
    assert_one_line_error(status, err, str(trained_run), "different network", "--restart")
    assert snapshot(trained_run) == before


def test_train_restart_moves_the_old_run_aside(tmp_path, capsys):
    path = write_experiment(tmp_path)
    run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    before = snapshot(tmp_path / "run")
    status, _, err = run_cli(capsys, "train", path, "train.steps=2", "--run-dir", tmp_path / "run", "--restart")
    assert status == 0 and "moved the previous run" in err
    (backup,) = tmp_path.glob("run.old-*")
    assert snapshot(backup) == before
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2]


def test_divergence_exits_2_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    path = write_experiment(tmp_path)
    run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    before = checkpoint.read_bytes()
    honest_loss = DSM.__call__
    monkeypatch.setattr(DSM, "__call__", lambda self, *a, **k: honest_loss(self, *a, **k) * float("nan"))
    status, _, err = run_cli(capsys, "train", path, "train.steps=8", "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, "non-finite loss", f"last good checkpoint kept at {checkpoint}",
                          notices=True)
    assert checkpoint.read_bytes() == before


# ------------------------------------------------------------------ eval and sample


def test_eval_writes_eval_json_and_prints_the_bpd(trained_run, capsys):
    status, out, err = run_cli(capsys, "eval", trained_run, "--max-examples", 32)
    assert status == 0, err
    saved = json.loads((trained_run / "eval.json").read_text())
    entries = {e["estimator"]: e for e in saved["results"].values() if e["n"] == 32}
    assert entries["elbo"]["split"] == entries["exact"]["split"] == "test"
    assert entries["elbo"]["step"] == 4  # the training step of the weights evaluated
    assert f"{entries['elbo']['bpd']:.4f}" in out
    # not the experiment's evaluation (eval.max_examples = 16): kept beside the headline, not in its place
    assert saved["test"]["elbo"]["n"] == 16 and "not as its headline" in err


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    status, _, err = run_cli(capsys, "eval", tmp_path)
    assert_one_line_error(status, err, str(tmp_path), "not a run folder")


def test_sample_writes_a_png_where_asked(trained_run, tmp_path, capsys):
    out_path = tmp_path / "X.png"
    status, out, err = run_cli(capsys, "sample", trained_run, "--num", 16, "--out", out_path)
    assert status == 0, err
    assert is_png(out_path) and str(out_path) in out


def test_sample_defaults_to_the_run_samples_folder(trained_run, capsys):
    status, out, err = run_cli(capsys, "sample", trained_run, "--num", 8, "--steps", 4, "--lam", 1)
    assert status == 0, err
    assert is_png(trained_run / "samples" / "sample.png") and "sample.png" in out


def test_sample_trajectories_on_2d_data_writes_the_figure(trained_run, tmp_path, capsys):
    status, out, err = run_cli(capsys, "sample", trained_run, "--num", 8, "--steps", 4, "--trajectories")
    assert status == 0, err
    assert is_png(trained_run / "samples" / "trajectories.png") and "trajectories.png" in out
    status, out, err = run_cli(capsys, "sample", trained_run, "--num", 8, "--steps", 4, "--trajectories",
                               "--out", tmp_path / "s.png")
    assert status == 0, err
    assert out.split() == [str(tmp_path / "s.png"), str(tmp_path / "s_trajectories.png")]
    assert is_png(tmp_path / "s.png") and is_png(tmp_path / "s_trajectories.png")


def test_sample_needs_at_least_one_sample(trained_run, capsys):
    status, _, err = run_cli(capsys, "sample", trained_run, "--num", 0)
    assert_one_line_error(status, err, "--num")


def test_sample_rejects_a_lambda_outside_the_unit_interval(trained_run, capsys):
    status, _, err = run_cli(capsys, "sample", trained_run, "--lam", 2)
    assert_one_line_error(status, err, "lam")


# ------------------------------------------------------------------ tiny image data sets


def test_tiny_mnist_trains_evaluates_and_samples(tmp_path, capsys):
    write_mnist(tmp_path / "data", n_train=8, n_test=4)
    path = write_experiment(tmp_path, data={"name": "mnist", "root": str(tmp_path / "data"), "download": False,
                                                  "n_val": 2},
                            **IMAGE_RUN)
    run_dir = tmp_path / "run"
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run_dir)
    assert status == 0, err
    assert load(run_dir / "checkpoints" / "last.pt")["step"] == 2
    status, out, err = run_cli(capsys, "eval", run_dir, "--max-examples", 4)
    assert status == 0 and "bpd" in out, err
    status, _, err = run_cli(capsys, "sample", run_dir, "--num", 4, "--out", tmp_path / "grid.png")
    assert status == 0 and is_png(tmp_path / "grid.png"), err
    status, _, err = run_cli(capsys, "sample", run_dir, "--trajectories")
    assert_one_line_error(status, err, "--trajectories", "2-D")


def test_channels_last_training_on_the_elbo_follows_the_nchw_run(tmp_path, capsys, monkeypatch):
    """channels_last on the CPU runs GroupNorm+SiLU in the fused kernel; the elbo loss differentiates
    through its backward once more. Same seed, same data: the losses agree with the NCHW run's."""
    write_mnist(tmp_path / "data", n_train=8, n_test=4)
    unet = {**TINY_UNET, "ch": 16, "ch_mult": [1, 2]}
    path = write_experiment(tmp_path, data={"name": "mnist", "root": str(tmp_path / "data"), "download": False,
                                                  "n_val": 2},
                            **{**IMAGE_RUN, "network": unet, "loss": {"name": "elbo"},
                               "train": {"steps": 3, "batch_size": 4, "log_every": 1}})
    second_order = []
    original = fused._graph_backward
    monkeypatch.setattr(fused, "_graph_backward", lambda *a: second_order.append(1) or original(*a))
    runs = {}
    for layout in ("false", "true"):
        run_dir = tmp_path / f"run-{layout}"
        status, _, err = run_cli(capsys, "train", path, f"train.channels_last={layout}", "--run-dir", run_dir)
        assert status == 0, err
        runs[layout] = [loss for _, loss in losses(run_dir)]
    assert len(runs["true"]) == 3 and second_order  # the fused kernel ran, and was differentiated twice
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-4)


def test_tiny_cifar10_trains_and_evaluates(tmp_path, capsys, monkeypatch):
    write_cifar10(tmp_path / "data", n_train=10, n_test=4)
    use_fake_cifar10_checksums(monkeypatch, tmp_path / "data")
    path = write_experiment(tmp_path, data={"name": "cifar10", "root": str(tmp_path / "data"), "download": False,
                                                  "n_val": 2},
                            **IMAGE_RUN)
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert status == 0, err
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["test"]["elbo"]["n"] == 4 and saved["test"]["elbo"]["bpd"] > 0
    assert is_png(tmp_path / "run" / "samples" / "step_0000002.png")
