"""Dequantizers (MATH.md §14): each q(u | x) is a density on the unit bin, each gives a valid bound on
−log₂ P(x), and the kernel's bpd counts log q. The toy: D independent pixels of L = 4 levels with known
probabilities P, and a continuous density of x̃ whose shape inside each bin is flat or a ramp."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fakedata import write_mnist
from helpers_exp import assert_one_line_error, run_cli, write_experiment
from sdeflow.assembly.objective import Objective
from sdeflow.components.registry import default_registry
from sdeflow.core.distributed import DistContext
from sdeflow.core.errors import ConfigError, InvalidArgument
from sdeflow.core.model import DiffusionModel
from sdeflow.core.transforms import ModelSpace, UnitInterval, bits_per_dim, into_bins
from sdeflow.rundir.checkpoint import load
from sdeflow.training.trainer import train
from sdeflow_builtin.dequantizers import TruncatedNormal, Uniform, Variational
from sdeflow_builtin.networks.mlp import MLP
from sdeflow_builtin.parameterizations import Drift
from sdeflow_builtin.sdes import VPSDE
from sdeflow_builtin.time_samplers import Uniform as UniformTime
from test_trainable import FixedDraws
from test_training import assert_same_state, experiment

L = 4
P = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def toy(n: int, dim: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x ∈ {0..3}/3 as float64, the levels k), each pixel drawn from P."""
    k = torch.multinomial(P, n * dim, replacement=True, generator=torch.Generator().manual_seed(seed)).reshape(n, dim)
    return k.double() / (L - 1), k


def log_density(x_tilde: torch.Tensor, k: torch.Tensor, ramp: bool) -> torch.Tensor:
    """log p(x̃) = Σ_d log(P_k L g(v)), v = L x̃ − k the position in the bin; g = 1 (flat) or 2v (ramp)."""
    v = (L * x_tilde - k).clamp(1e-12, 1)
    inside = torch.log(2 * v) if ramp else torch.zeros_like(v)
    return (torch.log(P[k] * L) + inside).sum(dim=1)


def exact_bits(k: torch.Tensor) -> torch.Tensor:
    return -torch.log2(P[k]).mean(dim=1)


def bound_bits(dequantizer, x, k, ramp: bool, seed: int = 1) -> torch.Tensor:
    """The kernel's bpd of the exact continuous density under ``dequantizer``, per example."""
    space = ModelSpace(UnitInterval(), L, dequantizer)
    x_tilde, log_det, log_q = space(x, generator=torch.Generator().manual_seed(seed))
    return bits_per_dim(log_density(x_tilde, k, ramp), log_det, x.shape[1], space.bits_offset, log_q)


def perturbed(dequantizer: Variational, scale: float = 0.3, seed: int = 0) -> Variational:
    """The flow with its zero-initialised last layers made random, so it is not the uniform one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for coupling in dequantizer.couplings:
            for p in coupling.net[-1].parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return dequantizer


def dequantizers() -> dict[str, object]:
    return {"uniform": Uniform(), "truncated_normal": TruncatedNormal(tau=3.0),
            "truncated_normal_wide": TruncatedNormal(tau=0.5),
            "variational": perturbed(Variational((2,), hidden=8, couplings=2).double())}


def mean_gap(bound: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    gap = bound - exact
    gap = gap.detach()
    return float(gap.mean()), float(gap.std() / math.sqrt(gap.numel()))


# ------------------------------------------------------------------ the bound


def test_uniform_dequantization_of_a_piecewise_uniform_density_is_exact():
    x, k = toy(500)
    torch.testing.assert_close(bound_bits(Uniform(), x, k, ramp=False), exact_bits(k), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ramp", [False, True], ids=["flat", "ramp"])
@pytest.mark.parametrize("name", ["uniform", "truncated_normal", "truncated_normal_wide", "variational"])
def test_every_dequantizer_bounds_minus_log2_p(name, ramp):
    x, k = toy(20000)
    gap, se = mean_gap(bound_bits(dequantizers()[name], x, k, ramp), exact_bits(k))
    assert gap > -4 * se, f"{name}: the bound is below −log₂ P by {-gap:.4f} ± {se:.4f} bits"


def test_uniform_on_a_ramp_costs_its_kl_divergence():
    """Per dimension KL(U ‖ g) = E_U[−log 2v] = 1 − log 2 nats."""
    x, k = toy(20000)
    gap, se = mean_gap(bound_bits(Uniform(), x, k, ramp=True), exact_bits(k))
    assert abs(gap - (1 - math.log(2)) / math.log(2)) < 4 * se


@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_truncated_normal_on_a_flat_density_costs_minus_its_entropy(tau):
    """On a flat density the gap is E[log q] = −H(u); w ~ N(0,1) on [−τ, τ] has entropy
    log(√(2πe) Z) − τ φ(τ)/Z, and u = ½ + w/(2τ) loses log 2τ of it."""
    x, k = toy(20000)
    gap, se = mean_gap(bound_bits(TruncatedNormal(tau=tau), x, k, ramp=False), exact_bits(k))
    Z = math.erf(tau / math.sqrt(2))
    phi = math.exp(-tau**2 / 2) / math.sqrt(2 * math.pi)
    entropy_u = math.log(math.sqrt(2 * math.pi * math.e) * Z) - tau * phi / Z - math.log(2 * tau)
    assert abs(gap - (-entropy_u) / math.log(2)) < 4 * se + 1e-9


def test_variational_learns_the_ramp_inside_the_bins_that_uniform_cannot():
    torch.manual_seed(0)
    x, k = toy(4096, seed=3)
    flow = Variational((2,), hidden=16, couplings=2).double()
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for step in range(250):
        batch = torch.randint(0, x.shape[0], (256,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        bound_bits(flow, x[batch], k[batch], ramp=True, seed=step).mean().backward()
        optimizer.step()
    x_test, k_test = toy(20000, seed=4)
    exact = exact_bits(k_test)
    with torch.no_grad():
        learned, se = mean_gap(bound_bits(flow, x_test, k_test, ramp=True, seed=5), exact)
    uniform, _ = mean_gap(bound_bits(Uniform(), x_test, k_test, ramp=True, seed=5), exact)
    assert learned > -4 * se  # still a bound
    assert learned < 0.5 * uniform and uniform - learned > 20 * se, (learned, uniform, se)


# ------------------------------------------------------------------ each q is a density on the bin


def logit_density(dequantizer, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The density of logit(u) at v: for the flow its own (it is a flow in logit space), for the others
    q(σ(v)) σ′(v); smooth, with tails that a grid over v covers."""
    if isinstance(dequantizer, Variational):
        return torch.exp(dequantizer.log_prob_logit(v, x)).detach()
    u = torch.sigmoid(v)
    return torch.exp(dequantizer.log_prob(u, x, L)) * (u * (1 - u)).prod(dim=1)


@pytest.mark.parametrize("name", ["uniform", "truncated_normal", "variational"])
def test_each_q_integrates_to_one_over_its_bin(name):
    one_dim = {"uniform": Uniform(), "truncated_normal": TruncatedNormal(tau=2.0),
               "variational": perturbed(Variational((1,), hidden=8, couplings=3).double(), scale=1.0)}[name]
    v = torch.linspace(-30 if name != "variational" else -150, 30 if name != "variational" else 150, 30001,
                       dtype=torch.float64)[:, None]
    for level in range(L):
        x = torch.full((v.shape[0], 1), level / (L - 1), dtype=torch.float64)
        integral = float(torch.trapezoid(logit_density(one_dim, v, x), v[:, 0]))
        assert integral == pytest.approx(1.0, abs=2e-4), f"{name} at level {level}"


def test_the_flow_integrates_to_one_jointly_over_a_two_dimensional_bin():
    flow = perturbed(Variational((2,), hidden=8, couplings=3).double(), scale=1.0, seed=1)
    v = torch.linspace(-120, 120, 801, dtype=torch.float64)
    a, b = torch.meshgrid(v, v, indexing="ij")
    grid = torch.stack([a.flatten(), b.flatten()], dim=1)
    x = torch.tensor([[1 / 3, 1.0]], dtype=torch.float64).expand(grid.shape[0], 2)
    density = logit_density(flow, grid, x).reshape(801, 801)
    assert float(torch.trapezoid(torch.trapezoid(density, v), v)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", ["uniform", "truncated_normal", "variational"])
def test_samples_stay_in_their_bin_and_follow_log_q(name):
    one_dim = {"uniform": Uniform(), "truncated_normal": TruncatedNormal(tau=2.0),
               "variational": perturbed(Variational((1,), hidden=8, couplings=3).double(), scale=0.3)}[name]
    n = 100_000
    x = torch.full((n, 1), 2 / 3, dtype=torch.float64)
    u, log_q = one_dim.sample(x, L, generator=torch.Generator().manual_seed(0))
    assert bool(((u >= 0) & (u <= 1)).all())
    x_tilde = into_bins(x, u, L)
    assert bool(((x_tilde >= 2 / L) & (x_tilde <= 3 / L)).all())
    # The log-density a draw comes with is the density at that draw (where u is not rounded to a bin edge) ...
    interior = ((u > 1e-9) & (u < 1 - 1e-9))[:, 0]
    assert interior.float().mean() > 0.99
    torch.testing.assert_close(log_q[interior], one_dim.log_prob(u, x, L)[interior], rtol=1e-6, atol=1e-9)
    # ... and the draws follow it: histogram counts against the integral of q over each of 20 cells (the
    # CDF integrated in logit coordinates, where the density is smooth).
    counts = torch.histc(u[:, 0], bins=20, min=0, max=1)
    v = torch.linspace(-150, 150, 300001, dtype=torch.float64)
    grid = v if name == "variational" else v.clamp(-30, 30)
    cdf = torch.cumulative_trapezoid(logit_density(one_dim, grid[:, None], x[:1].expand(v.numel(), 1)), grid)
    inner = torch.logit(torch.linspace(0, 1, 21, dtype=torch.float64)[1:-1])
    at_edges = torch.cat([torch.zeros(1), cdf[torch.searchsorted(grid[1:], inner)], torch.ones(1)])
    expected = n * at_edges.diff()
    assert bool(((counts - expected).abs() < 5 * expected.sqrt() + 5).all()), (counts, expected)


def test_the_flow_starts_as_the_uniform_dequantizer():
    x, _ = toy(64)
    u, log_q = Variational((2,)).sample(x.float(), L, generator=torch.Generator().manual_seed(0))
    r = torch.rand((64, 2, 1, 1), generator=torch.Generator().manual_seed(0)).reshape(64, 2)
    assert torch.equal(log_q, torch.zeros(64)) and torch.allclose(u, r, atol=1e-6)


@pytest.mark.parametrize(("factory", "kwargs", "argument"), [(TruncatedNormal, {"tau": 0.0}, "tau"),
                                                            (Variational, {"hidden": 0}, "hidden"),
                                                            (Variational, {"couplings": 0}, "couplings")])
def test_bad_dequantizer_arguments_raise_invalid_argument(factory, kwargs, argument):
    with pytest.raises(InvalidArgument) as info:
        factory(data_shape=(2,), **kwargs)
    assert info.value.argument == argument


def test_the_dequantizers_are_registered():
    assert {"uniform", "truncated_normal", "variational"} <= set(default_registry().names("dequantizer"))


# ------------------------------------------------------------------ trained with the model


def discrete_objective(dequantizer) -> Objective:
    torch.manual_seed(0)
    sde = VPSDE()
    net = MLP(data_shape=(3,), hidden=16, depth=1)
    return Objective(DiffusionModel(sde, Drift(net, sde)), FixedDraws(), UniformTime(),
                     ModelSpace(UnitInterval(), L, dequantizer))


class FixedNoise(Variational):
    """The flow with its uniform draws a function of x, so shards and their union see the same noise."""

    def sample(self, x, levels, *, generator=None):
        r = torch.sigmoid(torch.sin(7 * x + torch.arange(x.shape[1], dtype=x.dtype))).reshape(-1, *self.planes)
        return self.flow(r, x)


def _union() -> torch.Tensor:
    return toy(8, dim=3, seed=2)[0]


def _ddp_objective() -> Objective:
    torch.manual_seed(0)  # the same initial flow in every process
    return discrete_objective(perturbed(FixedNoise((3,), hidden=8, couplings=2))).double()


def _grads(objective: Objective, x: torch.Tensor) -> list[torch.Tensor]:
    objective(x).mean().backward()
    return [p.grad for p in objective.parameters()]


def _ddp_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank, torch.device("cpu"))
    objective = _ddp_objective()
    wrapped = ctx.wrap(objective)  # held: a DDP wrapper collected before backward all-reduces nothing
    wrapped(ctx.shard(_union())).mean().backward()
    if rank == 0:
        torch.save([p.grad for p in objective.parameters()], out)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_all_reduces_the_dequantizer_gradient_like_one_process(tmp_path):
    objective = _ddp_objective()
    assert objective.bound_in_data_space  # the flow's parameters make the loss the data-space bound
    single = _grads(objective, _union())
    flow = [p for p in objective.dequantizer.parameters()]
    assert flow and all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow)  # every one is reached
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    for a, b in zip(single, torch.load(out, weights_only=True), strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


def test_the_loss_is_the_data_space_bound_only_when_the_dequantizer_trains():
    x = _union().float()
    fixed, flow = discrete_objective(Uniform()), discrete_objective(Variational((3,), hidden=8, couplings=2))
    space = fixed.space
    torch.manual_seed(1)
    z, log_det, _ = space(x)
    torch.manual_seed(1)
    assert torch.equal(fixed(x), FixedDraws()(fixed.model, z, fixed.time_sampler))  # the model's loss, as logged
    torch.manual_seed(1)
    z, log_det, log_q = flow.space(x)
    torch.manual_seed(1)
    torch.testing.assert_close(flow(x), FixedDraws()(flow.model, z, flow.time_sampler) + log_q - log_det)


TINY_IMAGES = {
    "network": {"name": "unet", "ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "num_groups": 4},
    "sampler": {"name": "euler_maruyama", "steps": 2},
    "loss": {"name": "elbo"},
    "dequantizer": {"name": "variational", "hidden": 4, "couplings": 2},
    "eval": {"batch_size": 4, "max_examples": 4},
    "sample": {"num": 4},
}


def mnist_experiment(tmp_path, *overrides, **sections):
    write_mnist(tmp_path / "data", n_train=12, n_test=4)
    data = {"name": "mnist", "root": str(tmp_path / "data"), "download": False, "n_val": 2}
    return experiment(tmp_path, "train.batch_size=4", "train.checkpoint_every=3", *overrides,
                      **{"data": data, **TINY_IMAGES, **sections})


def test_a_variational_dequantizer_trains_checkpoints_and_resumes_exactly(tmp_path):
    train(mnist_experiment(tmp_path, "train.steps=6"), tmp_path / "a")
    train(mnist_experiment(tmp_path, "train.steps=3"), tmp_path / "b")
    train(mnist_experiment(tmp_path, "train.steps=6"), tmp_path / "b")
    a, b = load(tmp_path / "a" / "checkpoints" / "last.pt"), load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert_same_state(a, b)
    for key in ("components", "ema_components"):
        assert a[key]["dequantizer"].keys() == b[key]["dequantizer"].keys()
        assert all(torch.equal(a[key]["dequantizer"][n], b[key]["dequantizer"][n]) for n in a[key]["dequantizer"])
    last = a["components"]["dequantizer"]["couplings.0.net.2.weight"]
    assert last.abs().sum() > 0  # trained away from its zero (uniform) start
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())["test"]["elbo"]
    assert saved["protocol"]["dequantizer"] == {"name": "variational", "hidden": 4, "couplings": 2}
    assert saved["protocol"]["dequantization"].startswith("variational")


def test_a_trainable_dequantizer_needs_a_loss_that_bounds_the_likelihood(tmp_path):
    with pytest.raises(ConfigError, match=r"dequantizer: \{name: variational.*loss: \{name: dsm"):
        train(mnist_experiment(tmp_path, "train.steps=1", loss={"name": "dsm"}), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_dequantizer_on_continuous_data_is_a_config_error(tmp_path, capsys):
    path = write_experiment(tmp_path, dequantizer={"name": "truncated_normal"})
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, "dequantizer", "truncated_normal", "continuous")


def test_eval_under_another_dequantizer_is_recorded_beside_the_headline(tmp_path, capsys):
    exp = mnist_experiment(tmp_path, "train.steps=2", dequantizer={"name": "uniform"})
    train(exp, tmp_path / "run")
    status, out, err = run_cli(capsys, "eval", tmp_path / "run", "--dequantizer", "{name: truncated_normal, tau: 2}")
    assert status == 0, err
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["test"]["elbo"]["protocol"]["dequantizer"] == {"name": "uniform"}  # the headline is unchanged
    other = [e for e in saved["results"].values() if e["protocol"]["dequantizer"]["name"] == "truncated_normal"]
    assert len(other) == 1 and not other[0]["full"]
    assert other[0]["settings"]["dequantizer"] == {"name": "truncated_normal", "tau": 2.0}
    assert other[0]["bpd"] != saved["test"]["elbo"]["bpd"]
    status, _, err = run_cli(capsys, "eval", tmp_path / "run", "--dequantizer", "nonesuch")
    assert_one_line_error(status, err, "--dequantizer", "nonesuch")
