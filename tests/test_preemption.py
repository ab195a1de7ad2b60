"""Preemption (issue 17): SIGTERM, SIGUSR1, SIGUSR2 and SIGINT stop training after the current step with a
checkpoint and exit status 75; the rerun resumes exactly; timed checkpoints; DDP ranks stop together."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch.multiprocessing as mp

from helpers_exp import Killed, die_at_step, losses, run_cli, tiny_config, write_experiment
from sdeflow.experiment.config import load_experiment
from sdeflow.rundir.checkpoint import load
from sdeflow.rundir.results import headline
from sdeflow.training.preemption import EXIT_PREEMPTED, Preempted, StopRequests
from sdeflow.training.trainer import Trainer, train
from test_distributed import WORLD, _free_port
from test_reliability import sdeflow_process
from test_training import assert_same_state

LAST = ("checkpoints", "last.pt")


def last_step(run_dir) -> int:
    return int(load(run_dir.joinpath(*LAST))["step"])


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver ``signum`` to this process during training step ``step`` (as a cluster would)."""
    honest_step = Trainer.train_step

    def step_then_signal(self, x):
        if self.step == step - 1:
            os.kill(os.getpid(), signum)
        return honest_step(self, x)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_saves_and_the_rerun_repeats_the_uninterrupted_run(
        tmp_path, monkeypatch, signum):
    exp = load_experiment(write_experiment(tmp_path, train={"steps": 9, "checkpoint_every": 4}))
    train(exp, tmp_path / "a")
    before = signal.getsignal(signum)

    signal_at(monkeypatch, 6, signum)  # between the checkpoints at 4 and 8
    with pytest.raises(Preempted) as stopped:
        train(exp, tmp_path / "b")
    assert stopped.value.step == 6 and stopped.value.exit_code == EXIT_PREEMPTED
    assert signal.Signals(signum).name in str(stopped.value)
    assert last_step(tmp_path / "b") == 6  # saved at the stop, not only at the last scheduled checkpoint
    assert [s for s, _ in losses(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]  # the logs are flushed
    assert signal.getsignal(signum) == before  # the handler that was there comes back
    assert not (tmp_path / "b" / "eval.json").exists()

    monkeypatch.undo()
    train(exp, tmp_path / "b")
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert_same_state(load(tmp_path.joinpath("a", *LAST)), load(tmp_path.joinpath("b", *LAST)))


def test_a_signal_during_the_final_evaluation_keeps_the_trained_checkpoint_and_the_rerun_only_evaluates(
        tmp_path, monkeypatch, capsys):
    exp = load_experiment(write_experiment(tmp_path))
    honest_evaluate = Trainer.evaluate

    def signalled_evaluate(self, split=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return honest_evaluate(self, split)

    monkeypatch.setattr(Trainer, "evaluate", signalled_evaluate)
    with pytest.raises(Preempted):
        train(exp, tmp_path / "run")
    monkeypatch.undo()
    assert last_step(tmp_path / "run") == 4
    checkpoint = tmp_path.joinpath("run", *LAST).read_bytes()
    capsys.readouterr()
    train(exp, tmp_path / "run")
    assert "already trained to step 4" in capsys.readouterr().err
    assert headline(tmp_path / "run", "test")["elbo"]["step"] == 4
    assert tmp_path.joinpath("run", *LAST).read_bytes() == checkpoint  # evaluated, not retrained


def test_the_command_line_exits_75_on_an_external_sigterm_and_the_rerun_resumes_exactly(tmp_path, capsys):
    path = write_experiment(tmp_path, train={"steps": 3000, "log_every": 1, "checkpoint_every": 0})
    run = tmp_path / "run"
    process = sdeflow_process("train", path, "--run-dir", run)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 20):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, err
    stopped = last_step(run)
    assert 20 < stopped < 3000
    assert f"stopped by SIGTERM at step {stopped}" in err and "error" not in err
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    assert run_cli(capsys, "train", path, "--run-dir", tmp_path / "whole")[0] == 0
    assert losses(run) == losses(tmp_path / "whole")
    assert_same_state(load(run.joinpath(*LAST)), load(tmp_path.joinpath("whole", *LAST)))


def test_a_second_signal_during_the_save_changes_nothing(tmp_path):
    path = write_experiment(tmp_path, train={"steps": 9, "checkpoint_every": 0})
    run = tmp_path / "run"
    second_signal_while_saving = """
        import os, signal, torch
        from sdeflow.training.trainer import Trainer
        honest_step, real_save = Trainer.train_step, torch.save
        def step(self, x):
            if self.step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return honest_step(self, x)
        def save(obj, f, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler insists, mid-write
            os.kill(os.getpid(), signal.SIGINT)
            return real_save(obj, f, *args, **kwargs)
        Trainer.train_step, torch.save = step, save
    """
    process = sdeflow_process("train", path, "--run-dir", run, script=second_signal_while_saving)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, err
    assert "received SIGTERM again" in err and "received SIGINT again" in err
    assert last_step(run) == 5
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_checkpoint_minutes_saves_by_wall_time_between_step_checkpoints(tmp_path, monkeypatch):
    exp = load_experiment(write_experiment(tmp_path), ["train.steps=9", "train.checkpoint_every=0",
                                                       "train.checkpoint_minutes=1e-9"])  # due at every step
    die_at_step(monkeypatch, 6)
    with pytest.raises(Killed):
        train(exp, tmp_path / "run")
    assert last_step(tmp_path / "run") == 5  # only steps 6.. are lost, though no step checkpoint was due


def test_checkpoint_minutes_must_not_be_negative(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "check", path, "train.checkpoint_minutes=-1")
    assert status == 2 and "train.checkpoint_minutes" in err and "got -1" in err


def test_stop_requests_outside_the_main_thread_install_nothing():
    import threading

    seen = []

    def body():
        with StopRequests() as stop:
            seen.append((stop.requested, signal.getsignal(signal.SIGTERM)))

    before = signal.getsignal(signal.SIGTERM)
    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == [(False, before)]


def _ddp_worker(rank: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sdeflow.cli.commands import main

    honest_step = Trainer.train_step

    def step(self, x):
        if rank == 1 and self.step == 12:  # only rank 1 is told to stop
            os.kill(os.getpid(), signal.SIGUSR1)
        return honest_step(self, x)

    Trainer.train_step = step
    with open(f"{out}.{rank}", "w") as f:
        json.dump(main(argv), f)


def test_under_ddp_the_ranks_stop_together_when_one_is_signalled(tmp_path):
    config = tiny_config(train={"steps": 40, "checkpoint_every": 0, "log_every": 5})
    path = write_experiment(tmp_path, config)
    run = tmp_path / "run"
    out = str(tmp_path / "status")
    mp.spawn(_ddp_worker, args=(_free_port(), ["train", str(path), "--run-dir", str(run)], out),
             nprocs=WORLD, join=True)
    assert [json.loads(open(f"{out}.{r}").read()) for r in range(WORLD)] == [EXIT_PREEMPTED] * WORLD
    assert last_step(run) == 20  # the next agreement point after step 13
