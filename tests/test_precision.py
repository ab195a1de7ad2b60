"""Config switches that need hardware or a compiler fall back on CPU with a one-line notice; the ELBO
loss under a real ``torch.compile``."""

from __future__ import annotations

import json

import pytest
import torch

from sdeflow.assembly.build import build_parts
from sdeflow.experiment.config import load_experiment
from sdeflow.rundir.checkpoint import load
from sdeflow.training.trainer import train

EXPERIMENT = """
name: switches
device: cpu
data: {name: gaussian, dim: 2, n: 128, n_test: 16}
network: {name: mlp, hidden: 16, depth: 1}
sampler: {name: euler_maruyama, steps: 5}
train: {steps: 3, batch_size: 16, log_every: 1, checkpoint_every: 0}
eval: {batch_size: 16}
sample: {num: 8}
logging: {progress: false, tensorboard: false}
"""


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "switches.yaml"
    path.write_text(EXPERIMENT)
    return path


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in line]


def test_bf16_on_cpu_trains_in_fp32_with_a_notice(experiment, tmp_path, capsys):
    train(load_experiment(experiment, ["precision=bf16"]), tmp_path / "bf16")
    train(load_experiment(experiment), tmp_path / "fp32")
    assert "precision bf16 needs a CUDA device" in capsys.readouterr().err
    assert _losses(tmp_path / "bf16") == _losses(tmp_path / "fp32")  # the very same fp32 computation


def test_a_compile_failure_falls_back_to_eager_with_a_notice(experiment, tmp_path, capsys, monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("no compiler backend in this test")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    train(load_experiment(experiment, ["train.compile=true"]), tmp_path / "compiled")
    train(load_experiment(experiment), tmp_path / "eager")
    err = capsys.readouterr().err
    assert "train.compile unavailable here (RuntimeError: no compiler backend in this test); running eagerly" in err
    assert _losses(tmp_path / "compiled") == _losses(tmp_path / "eager")


def test_an_error_in_the_model_itself_is_not_hidden_by_the_compile_fallback(experiment, tmp_path, monkeypatch):
    from sdeflow_builtin.losses import DSM

    def broken_loss(self, *args, **kwargs):
        raise ValueError("a genuine bug")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    monkeypatch.setattr(DSM, "__call__", broken_loss)
    with pytest.raises(ValueError, match="a genuine bug"):
        train(load_experiment(experiment, ["train.compile=true"]), tmp_path / "run")


@pytest.mark.parametrize(("form", "sde"), [("denoising", "vp"), ("divergence", "vp"), ("denoising", "learned_vp")])
def test_the_elbo_loss_trains_under_torch_compile(experiment, tmp_path, capsys, monkeypatch, form, sde):
    """Compiled graphs have no double backward: draws whose loss differentiates the network twice (the
    divergence) run it eagerly, on the same parameters, the others compiled, in one step. With t_ε = 0.2
    a fifth of the denoising form's draws are such draws; the divergence form has only those."""
    real, calls = torch.compile, []

    def counted(module, **kwargs):
        compiled = real(module, **kwargs)
        return lambda *args: calls.append(len(args[0])) or compiled(*args)

    monkeypatch.setattr(torch, "compile", counted)
    args = [f"loss={{name: elbo, form: {form}}}", f"sde={{name: {sde}, t_eps: 0.2}}"]
    train(load_experiment(experiment, [*args, "train.compile=true"]), tmp_path / "compiled")
    err = capsys.readouterr().err
    if "train.compile unavailable here" in err:  # e.g. no C++ compiler on this machine
        pytest.skip(f"torch.compile is unavailable here: {err}")
    assert "the network runs eagerly for draws whose loss is differentiated twice" in err
    assert calls == ([16] * 3 if form == "denoising" else [])  # every step's whole batch, compiled
    train(load_experiment(experiment, args), tmp_path / "eager")
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5)
    if sde == "learned_vp":  # the schedule trained under compile as it does eagerly
        compiled, eager = (load(tmp_path / run / "checkpoints" / "last.pt")["model"] for run in ("compiled", "eager"))
        start = load_experiment(experiment, args)
        assert not torch.equal(compiled["sde.h.w2"], build_parts(start).sde.h.w2)
        torch.testing.assert_close(compiled["sde.h.w2"], eager["sde.h.w2"], rtol=1e-4, atol=1e-6)
