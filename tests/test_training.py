"""Training into a run folder: what it writes, exact resume after an interruption, refusals that leave
the folder untouched, atomic checkpoints, divergence, and a data order that depends only on (seed, step)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import sdeflow.rundir.checkpoint
import sdeflow.rundir.folder
import sdeflow.training.optim
import sdeflow.training.trainer
from helpers_exp import Killed, die_at_step, is_png, losses, snapshot, write_experiment
from sdeflow.core.batches import batch_indices, train_batches
from sdeflow.core.errors import SdeflowError
from sdeflow.experiment.config import load_experiment
from sdeflow.rundir.checkpoint import load, save_atomic
from sdeflow.rundir.log import read_metrics
from sdeflow.training.trainer import TrainingDiverged, train
from sdeflow_builtin.losses import DSM

CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step", "rng", "config"}


def experiment(tmp_path, *overrides: str, **sections):
    return load_experiment(write_experiment(tmp_path, **sections), list(overrides))


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name}"
    assert a["step"] == b["step"]


# ------------------------------------------------------------------ what a run writes


def test_a_tiny_run_writes_config_metrics_checkpoint_samples_eval_and_tensorboard(tmp_path):
    exp = experiment(tmp_path, "train.eval_every=2", "train.sample_every=2", "logging.tensorboard=true")
    run_dir = tmp_path / "run"
    results = train(exp, run_dir)

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["sdeflow"]["config"] == 2  # the header of a complete config.yaml: read strictly
    assert config["network"] == {"name": "mlp", "hidden": 16, "depth": 1, "embed_dim": 64, "time_scale": 999.0,
                                 "fourier_features": None}  # every argument, given or defaulted
    assert config["plugins"]["sde"]["plugin"] and "version" in config["plugins"]["sde"]
    assert set(config["plugins"]) >= {"data", "sde", "network", "loss", "sampler"}

    records = read_metrics(run_dir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all({"lr", "it_per_s"} <= set(r) for r in train_records)
    eval_records = [r for r in records if "bpd" in r]
    assert [r["step"] for r in eval_records] == [2, 4]
    assert all({"bpd_se", "elbo"} <= set(r) for r in eval_records)

    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert CHECKPOINT_KEYS <= set(state)
    assert state["step"] == 4 and state["config"] == exp.to_dict()

    assert is_png(run_dir / "samples" / "step_0000002.png") and is_png(run_dir / "samples" / "step_0000004.png")

    saved = json.loads((run_dir / "eval.json").read_text())
    assert {"bpd", "bpd_se", "nats", "n"} <= set(saved["test"]["elbo"]) and saved["test"]["elbo"]["n"] == 16
    assert {"bpd", "bpd_se", "nats", "n"} <= set(saved["test"]["exact"])  # Gaussian data: the exact density
    assert saved["test"]["elbo"]["bpd"] == pytest.approx(results["test"]["elbo"]["bpd"])

    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events and all(p.stat().st_size > 0 for p in events)


def test_tensorboard_holds_the_training_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(experiment(tmp_path, "logging.tensorboard=true"), run_dir)
    tags = set()
    for path in run_dir.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(path)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/lr"} <= tags


# ------------------------------------------------------------------ resume


def test_resume_after_finishing_fewer_steps_repeats_the_uninterrupted_run_exactly(tmp_path):
    train(experiment(tmp_path, "train.steps=6"), tmp_path / "a")
    train(experiment(tmp_path, "train.steps=3"), tmp_path / "b")
    train(experiment(tmp_path, "train.steps=6"), tmp_path / "b")
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert_same_state(load(tmp_path / "a" / "checkpoints" / "last.pt"),
                      load(tmp_path / "b" / "checkpoints" / "last.pt"))


def test_resume_after_a_kill_mid_run_repeats_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    exp = experiment(tmp_path, "train.steps=7")  # checkpoints every 2 steps
    train(exp, tmp_path / "a")
    with monkeypatch.context() as patch:
        die_at_step(patch, 6)
        with pytest.raises(Killed):
            train(exp, tmp_path / "b")
    assert [s for s, _ in losses(tmp_path / "b")] == [1, 2, 3, 4, 5]
    assert load(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 4

    train(exp, tmp_path / "b")
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # step 5 is logged once, as in run a
    assert_same_state(load(tmp_path / "a" / "checkpoints" / "last.pt"),
                      load(tmp_path / "b" / "checkpoints" / "last.pt"))


def test_rerunning_a_finished_run_does_not_retrain(tmp_path, capsys):
    exp = experiment(tmp_path)
    run_dir = tmp_path / "run"
    train(exp, run_dir)
    checkpoint, metrics = (run_dir / "checkpoints" / "last.pt").read_bytes(), losses(run_dir)
    train(exp, run_dir)
    assert "already trained to step 4" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert losses(run_dir) == metrics


def test_restart_moves_the_old_run_aside_and_starts_from_step_zero(tmp_path):
    run_dir = tmp_path / "run"
    train(experiment(tmp_path), run_dir)
    before = snapshot(run_dir)
    train(experiment(tmp_path, "train.steps=2"), run_dir, restart=True)
    (backup,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert snapshot(backup) == before
    assert load(run_dir / "checkpoints" / "last.pt")["step"] == 2
    assert [s for s, _ in losses(run_dir)] == [1, 2]


def test_two_restarts_within_one_second_keep_both_old_runs_side_by_side(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    exp = experiment(tmp_path, "train.steps=1")
    train(exp, run_dir)
    monkeypatch.setattr(sdeflow.rundir.folder.time, "strftime", lambda *args: "20250101-000000")  # one clock second
    train(exp, run_dir, restart=True)
    train(exp, run_dir, restart=True)
    backups = sorted(tmp_path.glob("run.old-*"))
    assert len(backups) == 2, [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("last.pt")]
    assert all((b / "checkpoints" / "last.pt").exists() for b in backups)


def test_resuming_with_a_changed_learning_rate_logs_the_rate_config_yaml_records(tmp_path):
    run_dir = tmp_path / "run"
    train(experiment(tmp_path, "train.steps=2"), run_dir)
    try:
        train(experiment(tmp_path, "train.steps=4", "train.lr=0.5"), run_dir)
    except SdeflowError:
        return  # refusing the change is honest too
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"]
    used = [r["lr"] for r in read_metrics(run_dir) if r["step"] > 2 and "lr" in r]
    assert used and all(lr == recorded for lr in used), (recorded, used)


def test_resuming_with_a_different_network_is_refused_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    train(experiment(tmp_path), run_dir)
    before = snapshot(run_dir)
    with pytest.raises(SdeflowError, match=r"different network.*--restart"):
        train(experiment(tmp_path, "network.hidden=8", "train.steps=6"), run_dir)
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------ checkpoints and failures


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_atomic({"step": 1, "weights": torch.ones(3)}, path)
    before = path.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(sdeflow.rundir.checkpoint.torch, "save", torn_save)
    with pytest.raises(SdeflowError, match="last.pt: cannot write .disk full.; nothing was replaced"):
        save_atomic({"step": 2, "weights": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_crash_while_saving_during_training_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(experiment(tmp_path), run_dir)
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise OSError("disk full")

    monkeypatch.setattr(sdeflow.rundir.checkpoint.torch, "save", torn_save)
    with pytest.raises(SdeflowError, match="cannot write"):
        train(experiment(tmp_path, "train.steps=8"), run_dir)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert load(run_dir / "checkpoints" / "last.pt")["step"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "previous.pt"]


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(experiment(tmp_path), run_dir)
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    honest_loss = DSM.__call__
    monkeypatch.setattr(DSM, "__call__", lambda self, *a, **k: honest_loss(self, *a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint kept at .*last.pt"):
        train(experiment(tmp_path, "train.steps=8"), run_dir)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_a_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .*train\.lr"):
        train(experiment(tmp_path, "train.lr=1e30", "train.steps=10"), tmp_path / "run")


# ------------------------------------------------------------------ data order


def test_batch_indices_are_a_function_of_seed_and_step():
    first = [batch_indices(100, 10, seed=3, step=s) for s in range(10)]
    again = [batch_indices(100, 10, seed=3, step=s) for s in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sorted(torch.cat(first).tolist()) == list(range(100))  # one epoch sees every example once
    assert not torch.equal(batch_indices(100, 10, seed=4, step=0), first[0])
    assert not torch.equal(batch_indices(100, 10, seed=3, step=10), first[0])  # the next epoch reshuffles


def test_training_batches_started_mid_run_continue_the_same_order():
    data = torch.arange(50.0).unsqueeze(1)
    whole = list(train_batches(data, 8, seed=1, start=0, stop=9))
    tail = list(train_batches(data, 8, seed=1, start=4, stop=9))
    assert all(torch.equal(a, b) for a, b in zip(whole[4:], tail, strict=True))
    dataset = torch.utils.data.TensorDataset(data)  # the DataLoader path gives the same batches
    assert all(torch.equal(a, b) for a, b in zip(whole, train_batches(dataset, 8, 1, 0, 9), strict=True))


def test_adam_is_fused_where_pytorch_has_a_fused_kernel_and_plain_elsewhere():
    cpu = sdeflow.training.optim.adam([torch.nn.Parameter(torch.zeros(3))], 1e-3)
    assert cpu.defaults["fused"] is True
    # A device without a fused kernel must not ask for one (torch would refuse at construction).
    meta = sdeflow.training.optim.adam([torch.nn.Parameter(torch.zeros(3, device="meta"))], 1e-3)
    assert not meta.defaults["fused"]
    # The fused update is Adam: one step matches the textbook formula, lr·g/(|g|+eps) at step 1.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = sdeflow.training.optim.adam([p], 0.1)
    p.grad = torch.tensor([0.5, -4.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]), rtol=0, atol=1e-6)
