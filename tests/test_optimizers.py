"""Optimizers and learning-rate schedules as component kinds (built-ins, a third party's, checks, the rate
each update uses, exact resume mid-schedule, older checkpoints), and gradient accumulation (the same
update as one batch, with and without DDP)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from helpers_exp import Killed, assert_one_line_error, die_at_step, losses, run_cli, tiny_config, write_experiment
from sdeflow.api import component
from sdeflow.assembly.run import build_run
from sdeflow.components.registry import build_registry
from sdeflow.core.distributed import DistContext
from sdeflow.core.hookspecs import hookimpl
from sdeflow.core.interfaces import Loss
from sdeflow.experiment.config import load_experiment
from sdeflow.rundir.checkpoint import load, save_atomic
from sdeflow.rundir.log import read_metrics
from sdeflow.training.trainer import Trainer, train
from sdeflow_builtin.losses import dsm_per_time
from test_training import assert_same_state

SCHEDULED = ("optimizer={name: adamw, weight_decay: 0.1}",
             "lr_schedule={name: warmup_cosine, warmup_steps: 3, final_fraction: 0.1}")
"""AdamW under a warm-up and cosine decay over the run's 7 steps."""


# ------------------------------------------------------------------ a third party's components


class FixedDraws(Loss):
    """DSM at a time and noise that are functions of the example, so no random draw depends on how the
    batch is split: the whole batch's mean and the micro-batches' shares can be compared exactly."""

    def __call__(self, model, x, time_sampler, *, generator=None):
        t = 0.05 + 0.9 * torch.sigmoid(x.sum(dim=1))
        return dsm_per_time(model, x, t, torch.flip(x, dims=[1]))


def sgd(params, lr: float, momentum: float = 0.0) -> torch.optim.SGD:
    """Plain SGD: the update is the gradient itself, so a wrongly scaled gradient shows in the weights."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


class Halving:
    """Halves the rate every ``every`` updates by counting its own calls: state a checkpoint must carry."""

    def __init__(self, steps: int, every: int = 2):
        self.every, self.calls = every, 0

    def __call__(self, step: int) -> float:
        factor = 0.5 ** (self.calls // self.every)
        self.calls += 1
        return factor

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


class ThirdParty:
    """A plugin offering an optimizer, a stateful schedule and a loss without random draws."""

    @hookimpl
    def sdeflow_register_optimizers(self, register):
        register("sgd", sgd)

    @hookimpl
    def sdeflow_register_lr_schedules(self, register):
        register("halving", Halving)

    @hookimpl
    def sdeflow_register_losses(self, register):
        register("fixed_draws", FixedDraws)


def third_party_registry():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_registry([("third-party", ThirdParty())])


def experiment(tmp_path, *overrides: str, registry=None, **sections):
    return load_experiment(write_experiment(tmp_path, **sections), list(overrides), registry=registry)


# ------------------------------------------------------------------ kinds, defaults, checks


def test_the_built_in_optimizers_and_schedules_are_listed_with_their_arguments(plugin_env, capsys):
    listed = {}
    for kind in ("optimizer", "lr_schedule"):
        status, out, _ = run_cli(capsys, "components", kind, "--json")
        assert status == 0
        listed |= {item["name"]: [a["name"] for a in item["arguments"]] for item in json.loads(out)}
    assert listed == {"adam": ["betas", "eps"], "adamw": ["betas", "eps", "weight_decay"],  # params, lr injected
                      "constant": [], "warmup": ["warmup_steps"],  # steps (train.steps) injected
                      "warmup_cosine": ["warmup_steps", "decay_steps", "final_fraction"],
                      "warmup_linear": ["warmup_steps", "decay_steps", "final_fraction"]}


def test_the_default_is_fused_adam_at_a_constant_rate(tmp_path):
    exp = experiment(tmp_path)
    assert exp.components["optimizer"]["name"] == "adam" and exp.components["lr_schedule"]["name"] == "constant"
    probe = Trainer(build_run(exp, tmp_path / "probe"))
    probe.lock.release()
    assert type(probe.optimizer) is torch.optim.Adam and probe.optimizer.defaults["fused"] is True
    assert probe.optimizer.defaults["betas"] == (0.9, 0.999) and probe.optimizer.defaults["eps"] == 1e-8
    assert [probe.schedule(k) for k in (0, 1, 10**6)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("override, fragments", [
    ("optimizer.name=lion", ["optimizer.name", "unknown optimizer 'lion'", "available: adam, adamw"]),
    ("optimizer={name: adamw, weight_decay: heavy}", ["optimizer.weight_decay", "expected float", "'heavy'"]),
    ("optimizer={name: adamw, betas: [0.9, 1.5]}", ["optimizer.betas", "in [0, 1)"]),
    ("lr_schedule.name=cosine", ["lr_schedule.name", "unknown lr_schedule 'cosine'", "warmup_cosine"]),
    ("lr_schedule={name: warmup_cosine, warmup_steps: 10, decay_steps: 5}",
     ["lr_schedule.decay_steps", "more than warmup_steps (10)"]),
    ("lr_schedule={name: warmup, warmup_steps: 0}", ["lr_schedule.warmup_steps", "at least 1"]),
    ("train.accumulate=3", ["train.accumulate", "does not divide train.batch_size 32"]),
    ("train.accumulate=0", ["train.accumulate", "at least 1"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_check_refuses_bad_optimizer_schedule_and_accumulate_settings_in_one_line(tmp_path, capsys, override,
                                                                                  fragments):
    status, _, err = run_cli(capsys, "check", write_experiment(tmp_path), override)
    assert_one_line_error(status, err, *fragments)


def test_schedule_factors_warm_up_linearly_then_decay_to_the_final_fraction():
    warmup = component("lr_schedule", "warmup", steps=100, warmup_steps=4)
    assert [warmup(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = component("lr_schedule", "warmup_cosine", steps=10, warmup_steps=2, final_fraction=0.1)
    assert [cosine(0), cosine(1), cosine(2)] == [0.5, 1.0, 1.0]
    assert cosine(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))  # halfway down
    assert cosine(10) == cosine(50) == pytest.approx(0.1)  # stays at the final fraction after decay_steps
    linear = component("lr_schedule", "warmup_linear", steps=10, decay_steps=20)  # decay_steps overrides steps
    assert [linear(0), linear(5), linear(20), linear(30)] == [1.0, 0.75, 0.0, 0.0]
    assert component("lr_schedule", "constant", steps=10)(3) == 1.0


def test_every_group_steps_at_its_base_rate_times_the_factor_and_metrics_log_it(tmp_path):
    run_dir = tmp_path / "run"
    train(experiment(tmp_path, "lr_schedule={name: warmup, warmup_steps: 4}", "train.steps=6",
                     "train.component_lr={sde: 0.05}", sde={"name": "learned_vp"}, loss={"name": "elbo"}), run_dir)
    factors = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    logged = [r["lr"] for r in read_metrics(run_dir) if "loss" in r]
    assert logged == pytest.approx([1e-3 * f for f in factors], rel=1e-12)
    state = load(run_dir / "checkpoints" / "last.pt")  # saved after step 4 (checkpoint_every: 2), then 6
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([1e-3, 0.05])
    assert state["lr_schedule"] == {}  # a function of the step keeps no state of its own


# ------------------------------------------------------------------ exact resume


def test_resume_after_a_kill_mid_schedule_repeats_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    exp = experiment(tmp_path, "train.steps=7", *SCHEDULED)  # checkpoints every 2 steps
    train(exp, tmp_path / "a")
    with monkeypatch.context() as patch:
        die_at_step(patch, 6)
        with pytest.raises(Killed):
            train(exp, tmp_path / "b")
    assert load(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 4  # in the middle of the decay
    train(exp, tmp_path / "b")
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    lrs = {tmp: [r["lr"] for r in read_metrics(tmp_path / tmp) if "loss" in r] for tmp in "ab"}
    assert lrs["a"] == lrs["b"] and len(set(lrs["a"])) == 6  # updates 2 and 3 at the peak, the others apart
    assert_same_state(load(tmp_path / "a" / "checkpoints" / "last.pt"),
                      load(tmp_path / "b" / "checkpoints" / "last.pt"))


def test_a_run_extended_under_a_fixed_decay_horizon_repeats_the_longer_run_exactly(tmp_path):
    schedule = "lr_schedule={name: warmup_linear, warmup_steps: 2, decay_steps: 6, final_fraction: 0.2}"
    train(experiment(tmp_path, "train.steps=6", schedule), tmp_path / "a")
    train(experiment(tmp_path, "train.steps=3", schedule), tmp_path / "b")
    train(experiment(tmp_path, "train.steps=6", schedule), tmp_path / "b")
    assert_same_state(load(tmp_path / "a" / "checkpoints" / "last.pt"),
                      load(tmp_path / "b" / "checkpoints" / "last.pt"))


def test_a_third_party_schedules_state_travels_in_the_checkpoint(tmp_path):
    registry = third_party_registry()
    args = ("lr_schedule={name: halving, every: 2}", "optimizer={name: sgd, momentum: 0.9}")
    train(experiment(tmp_path, "train.steps=6", *args, registry=registry), tmp_path / "a", registry=registry)
    train(experiment(tmp_path, "train.steps=3", *args, registry=registry), tmp_path / "b", registry=registry)
    assert load(tmp_path / "b" / "checkpoints" / "last.pt")["lr_schedule"] == {"calls": 3}
    train(experiment(tmp_path, "train.steps=6", *args, registry=registry), tmp_path / "b", registry=registry)
    assert_same_state(load(tmp_path / "a" / "checkpoints" / "last.pt"),
                      load(tmp_path / "b" / "checkpoints" / "last.pt"))
    assert [r["lr"] for r in read_metrics(tmp_path / "b") if "loss" in r] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4]


def test_a_checkpoint_from_before_optimizer_and_schedule_sections_resumes_exactly(tmp_path):
    train(experiment(tmp_path, "train.steps=6"), tmp_path / "a")
    run_dir = tmp_path / "b"
    train(experiment(tmp_path, "train.steps=4"), run_dir)
    for name in ("last.pt", "previous.pt"):  # as written before this change: no schedule state, no sections
        path = run_dir / "checkpoints" / name
        state = load(path)
        del state["lr_schedule"]
        state["config"] = {k: v for k, v in state["config"].items() if k not in ("optimizer", "lr_schedule")}
        del state["config"]["train"]["accumulate"]
        save_atomic(state, path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config.pop("sdeflow", None)  # an older run's config.yaml: settings it lacks take their defaults
    for records in (config, config["plugins"]):
        records.pop("optimizer"), records.pop("lr_schedule")
    del config["train"]["accumulate"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    train(experiment(tmp_path, "train.steps=6"), run_dir)
    assert_same_state(load(tmp_path / "a" / "checkpoints" / "last.pt"), load(run_dir / "checkpoints" / "last.pt"))


def test_on_resume_the_configured_optimizer_settings_win_and_another_optimizer_starts_fresh(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(experiment(tmp_path, "optimizer={name: adamw, weight_decay: 0.0}", "train.steps=2"), run_dir)
    changed = experiment(tmp_path, "optimizer={name: adamw, weight_decay: 0.5, betas: [0.8, 0.99]}", "train.steps=4")
    probe = Trainer(build_run(changed, run_dir), allow_changes=True)
    probe.lock.release()
    assert probe.step == 2 and probe.optimizer.state  # the moments came back
    assert all(g["weight_decay"] == 0.5 and g["betas"] == (0.8, 0.99) for g in probe.optimizer.param_groups)
    capsys.readouterr()
    probe = Trainer(build_run(experiment(tmp_path, "train.steps=4"), run_dir), allow_changes=True)
    probe.lock.release()
    assert probe.step == 2 and not probe.optimizer.state and type(probe.optimizer) is torch.optim.Adam
    assert "optimizer changed since the checkpoint (adamw → adam): its state starts afresh" in capsys.readouterr().err


# ------------------------------------------------------------------ gradient accumulation


def test_accumulated_micro_batches_give_the_update_of_one_batch(tmp_path):
    registry = third_party_registry()
    args = ("loss.name=fixed_draws", "optimizer.name=sgd", "train.steps=3", "train.lr=0.05")
    for n in (1, 4):
        exp = experiment(tmp_path, *args, f"train.accumulate={n}", registry=registry)
        train(exp, tmp_path / f"n{n}", registry=registry)
    whole, accumulated = (load(tmp_path / f"n{n}" / "checkpoints" / "last.pt") for n in (1, 4))
    for name, value in whole["model"].items():
        torch.testing.assert_close(accumulated["model"][name], value, rtol=1e-5, atol=1e-6)
    assert [v for _, v in losses(tmp_path / "n4")] == pytest.approx([v for _, v in losses(tmp_path / "n1")], rel=1e-5)


def one_step_gradients(trainer: Trainer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss and the gradients the optimizer would step with, for one step of seed 0."""
    grads = []
    trainer.optimizer.step = lambda: grads.extend(p.grad.clone() for p in trainer.objective.parameters())
    torch.manual_seed(0)
    return trainer.train_step(x), grads


def test_micro_batches_draw_one_after_another_from_the_steps_stream_and_average_over_the_whole_batch(tmp_path):
    """With random draws (DSM's t and noise) the N micro-batches take consecutive draws of the step's stream;
    the update is exactly that of one batch whose examples got those draws, the mean over all of it."""
    accumulated = Trainer(build_run(experiment(tmp_path, "train.accumulate=4"), tmp_path / "n4"))
    whole = Trainer(build_run(experiment(tmp_path), tmp_path / "n1"))
    for trainer in (accumulated, whole):
        trainer.lock.release()
    x = accumulated.run.data.train[:32]
    objective = whole.objective
    whole.ddp_objective = lambda batch: torch.cat([objective(part) for part in batch.chunk(4)])  # one graph
    loss, grads = one_step_gradients(accumulated, x)
    reference_loss, reference = one_step_gradients(whole, x)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads)


WORLD = 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accumulating_ddp_worker(rank: int, port: int, config: str, run_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    registry = third_party_registry()
    trainer = Trainer(build_run(load_experiment(config, registry=registry), run_dir, registry=registry,
                                ctx=DistContext(rank, WORLD, rank, torch.device("cpu"))))
    reductions = []

    def counted(state, bucket):
        reductions.append(1)
        return allreduce_hook(state, bucket)

    trainer.ddp_objective.register_comm_hook(None, counted)
    trainer.loop()  # the steps only: no final evaluation
    trainer.save()
    trainer.lock.release()
    if rank == 0:
        (trainer.run.run_dir / "reductions.json").write_text(json.dumps(len(reductions)))
    dist.barrier()  # leave together: an early teardown can abort the other rank
    dist.destroy_process_group()


@pytest.mark.slow  # two processes that import torch: about 20 s on 2 busy cores
def test_under_ddp_accumulated_micro_batches_all_reduce_once_and_give_the_update_of_one_batch(tmp_path):
    registry = third_party_registry()
    sections = {"loss": {"name": "fixed_draws"}, "optimizer": {"name": "sgd"},
                "train": {"steps": 3, "batch_size": 16, "lr": 0.05, "checkpoint_every": 0, "log_every": 1}}
    config = tiny_config(**sections, eval={"max_examples": 8})
    train(load_experiment(write_experiment(tmp_path, config), registry=registry), tmp_path / "single",
          registry=registry)
    config["train"]["accumulate"] = 2
    config = write_experiment(tmp_path, config, filename="ddp.yaml")
    mp.spawn(_accumulating_ddp_worker, args=(_free_port(), str(config), str(tmp_path / "ddp")), nprocs=WORLD,
             join=True)
    assert json.loads((tmp_path / "ddp" / "reductions.json").read_text()) == 3  # one per step, not per micro-batch
    whole, accumulated = (load(tmp_path / name / "checkpoints" / "last.pt") for name in ("single", "ddp"))
    for name, value in whole["model"].items():
        torch.testing.assert_close(accumulated["model"][name], value, rtol=1e-5, atol=1e-6)


def test_under_ddp_accumulate_must_split_every_ranks_share_equally(tmp_path):
    from sdeflow.assembly.build import check_accumulate
    from sdeflow.core.errors import ConfigError

    exp = experiment(tmp_path, "train.accumulate=8")  # batch 32: 8 micro-batches of 4 in one process
    check_accumulate(exp, world=1)
    with pytest.raises(ConfigError, match=r"train.accumulate: 8 × 3 ranks does not divide train.batch_size 32"):
        check_accumulate(exp, world=3)
