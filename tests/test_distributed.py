"""torch.distributed on CPU with gloo: DDP gradients, sharded evaluation, rank-0 files, resume.

Each test spawns two processes that join a gloo group through a file store in tmp_path.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdeflow.core.distributed import DistContext

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model():
    from sdeflow.core.model import DiffusionModel
    from sdeflow_builtin.networks.mlp import MLP
    from sdeflow_builtin.parameterizations import Drift
    from sdeflow_builtin.sdes import VPSDE

    torch.manual_seed(0)
    sde = VPSDE()
    net = MLP(data_shape=(3,), hidden=16, depth=1)
    torch.nn.init.normal_(list(net.parameters())[-2], std=0.1)  # leave the zero init: real gradients
    return DiffusionModel(sde, Drift(net, sde))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g)
    t = torch.rand(8, generator=g) * 0.9 + 0.05
    eps = torch.randn(8, 3, generator=g)
    return x, t, eps


def _ddp_grad_worker(rank: int, store: str, out: str) -> None:
    from sdeflow_builtin.losses import dsm_per_time

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    ctx = DistContext(rank, WORLD, rank, torch.device("cpu"))
    model = _tiny_model()
    model.parameterization.network = ctx.wrap(model.parameterization.network)
    x, t, eps = (ctx.shard(v) for v in _batch())
    dsm_per_time(model, x, t, eps).mean().backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.barrier()  # leave together: an early teardown can abort the other rank
    dist.destroy_process_group()


def test_ddp_gradient_equals_single_process_gradient_on_the_union(tmp_path):
    from sdeflow_builtin.losses import dsm_per_time

    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_grad_worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    model = _tiny_model()
    dsm_per_time(model, *_batch()).mean().backward()
    ddp_grads = torch.load(out, weights_only=True)
    for single, distributed in zip([p.grad for p in model.parameters()], ddp_grads, strict=True):
        assert torch.allclose(single, distributed, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in ddp_grads)


def _eval_worker(rank: int, store: str, out: str, n_test: int) -> None:
    from sdeflow.evaluation.evaluate import elbo_estimator, evaluate
    from sdeflow.experiment.config import EvalConfig
    from sdeflow_builtin.datasets import gaussian
    from sdeflow_builtin.time_samplers import Uniform

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    ctx = DistContext(rank, WORLD, rank, torch.device("cpu"))
    data = gaussian(dim=3, n=16, n_test=n_test)
    results = evaluate(_tiny_model(), data, {"elbo": elbo_estimator(EvalConfig(), Uniform())}, batch_size=8,
                       seed=0, device=torch.device("cpu"), ctx=ctx)
    if rank == 0:
        for entry in results.values():
            entry["examples"] = {k: v.tolist() for k, v in entry["examples"].items()}
        Path(out).write_text(json.dumps(results))
    dist.barrier()  # leave together: an early teardown can abort the other rank
    dist.destroy_process_group()


@pytest.mark.parametrize("n_test", [50, 8], ids=["every-rank-has-batches", "rank-1-has-none"])
def test_distributed_eval_equals_single_process_eval(tmp_path, n_test):
    from sdeflow.evaluation.evaluate import elbo_estimator, evaluate
    from sdeflow.experiment.config import EvalConfig
    from sdeflow_builtin.datasets import gaussian
    from sdeflow_builtin.time_samplers import Uniform

    out = tmp_path / "eval.json"
    mp.spawn(_eval_worker, args=(str(tmp_path / "store"), str(out), n_test), nprocs=WORLD, join=True)
    distributed = json.loads(out.read_text())
    single = evaluate(_tiny_model(), gaussian(dim=3, n=16, n_test=n_test),
                      {"elbo": elbo_estimator(EvalConfig(), Uniform())}, batch_size=8, seed=0,
                      device=torch.device("cpu"))
    assert distributed["elbo"]["n"] == single["elbo"]["n"] == n_test  # every example exactly once
    for key in ("bpd", "bpd_se", "nats"):
        assert distributed["elbo"][key] == pytest.approx(single["elbo"][key], rel=1e-9, abs=1e-9)
    assert distributed["exact"]["bpd"] == pytest.approx(single["exact"]["bpd"], rel=1e-12)
    per_example = distributed["elbo"]["examples"]  # the same example gets the same draws on any rank
    assert per_example["index"] == single["elbo"]["examples"]["index"].tolist() == list(range(n_test))
    assert per_example["bpd"] == pytest.approx(single["elbo"]["examples"]["bpd"].tolist(), rel=1e-9)


EXPERIMENT = """
name: ddp
seed: 0
device: cpu
data: {name: gaussian, dim: 2, n: 256, n_test: 32}
network: {name: mlp, hidden: 16, depth: 1}
sampler: {name: euler_maruyama, steps: 10}
train: {steps: 6, batch_size: 16, lr: 1.0e-3, log_every: 2, checkpoint_every: 3}
eval: {batch_size: 16}
sample: {num: 16}
logging: {progress: false, tensorboard: false}
"""


def _train_worker(rank: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sdeflow.cli.commands import main

    assert main(argv) == 0


def test_distributed_run_writes_once_on_rank_zero_and_resumes(tmp_path):
    exp = tmp_path / "ddp.yaml"
    exp.write_text(EXPERIMENT)
    run_dir = tmp_path / "run"
    argv = ["train", str(exp), "--run-dir", str(run_dir)]
    mp.spawn(_train_worker, args=(_free_port(), argv), nprocs=WORLD, join=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]  # one writer: no duplicated lines
    assert json.loads((run_dir / "eval.json").read_text())["test"]["elbo"]["n"] == 32
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_0000006.png"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 6

    mp.spawn(_train_worker, args=(_free_port(), [*argv, "train.steps=8"]), nprocs=WORLD, join=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
