"""Trainable components (sdeflow.assembly.objective) and the learned VP SDE: closed forms, the ELBO oracle for any
interior shape, gradients to every trainable parameter, the loss/trainable check, per-component rates,
densities that are never stale, exact resume, and DDP over 2 gloo ranks against one process."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers_exp import assert_one_line_error, run_cli, write_experiment
from oracles import gaussian_3d, one_thread
from sdeflow.assembly.objective import Objective
from sdeflow.assembly.run import build_run
from sdeflow.components.registry import default_registry
from sdeflow.core.bounds import make_bound
from sdeflow.core.distributed import DistContext
from sdeflow.core.errors import ConfigError
from sdeflow.core.hookspecs import hookimpl
from sdeflow.core.interfaces import SDE, Loss, TabulatedTimeDensity, flat_sum
from sdeflow.core.model import DiffusionModel, ExactScoreModel
from sdeflow.core.statistics import mean_and_se
from sdeflow.core.transforms import UnitInterval
from sdeflow.likelihood.elbo import dsm_elbo, elbo, prior_term
from sdeflow.rundir.checkpoint import load
from sdeflow.training.trainer import Trainer, train
from sdeflow_builtin.losses import NegativeELBO
from sdeflow_builtin.networks.mlp import MLP
from sdeflow_builtin.parameterizations import Drift
from sdeflow_builtin.sdes import VPSDE, LearnedVPSDE
from sdeflow_builtin.time_samplers import Debiased, Uniform
from test_training import assert_same_state, experiment

LEARNED = {"name": "learned_vp", "hidden": 8, "learn_endpoints": True}


def learned(seed: int = 0, **kwargs) -> LearnedVPSDE:
    torch.manual_seed(seed)
    return LearnedVPSDE(**{"hidden": 16, **kwargs})


# ------------------------------------------------------------------ learned_vp against closed forms


def test_learned_vp_hits_its_endpoints_and_its_coefficients_agree():
    sde = learned(gamma_min=-8.0, gamma_max=6.0).double()
    t = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    gamma, slope = sde.gamma_and_slope(t)
    gamma, slope = gamma.detach(), slope.detach()
    assert float(gamma[0]) == pytest.approx(-8.0, abs=1e-12) and float(gamma[-1]) == pytest.approx(6.0, abs=1e-12)
    assert bool((slope > 0).all())  # monotone: the log-SNR −γ falls
    with torch.no_grad():
        h = 1e-6
        assert torch.allclose(slope, (sde.gamma(t + h) - sde.gamma(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)
        beta_fd = (sde.B(t + h) - sde.B(t - h)) / (2 * h)
        assert torch.allclose(sde.beta(t), beta_fd, rtol=1e-5, atol=1e-8)  # g² = β = dB/dt
        assert torch.allclose(sde.g(t) ** 2, torch.sigmoid(gamma) * slope, rtol=1e-12)
        assert torch.allclose(sde.m(t) ** 2 + sde.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)
        inner = t[gamma.detach() > -8.0 + 7]  # where γ ≫ γ₀: VDM's α² = sigmoid(−γ), σ² = sigmoid(γ), r = γ′
        assert len(inner) > 50
        assert torch.allclose(sde.m(inner) ** 2, torch.sigmoid(-sde.gamma(inner)), rtol=1e-3)
        assert torch.allclose(sde.likelihood_weight(inner), sde.gamma_and_slope(inner)[1], rtol=2e-3)


@pytest.mark.parametrize("gamma_max", [10.0, 1.0])
def test_exact_score_elbo_is_log_p_for_any_interior_shape(gamma_max):
    """The continuous-time ELBO depends on the schedule only through its endpoints: with the exact score
    on Gaussian data it is log p − KL(q_T ‖ p_T) for two different interior shapes (γ_max = 1 leaves a
    prior mismatch the estimate must find)."""
    oracle = gaussian_3d()
    shapes = [learned(seed, gamma_max=gamma_max).double() for seed in (0, 1)]
    mid = torch.tensor([0.3, 0.6], dtype=torch.float64)
    with torch.no_grad():
        shapes[1].h.w3.fill_(8.0)  # the initial shape is nearly linear in t: bend the second one hard
        shapes[1].h.w2.mul_(4.0)
        assert (shapes[0].gamma(mid) - shapes[1].gamma(mid)).abs().min() > 0.5  # the shapes really differ
    with one_thread(), torch.no_grad():
        for sde in shapes:
            g = torch.Generator().manual_seed(3)
            x = oracle.sample(200_000, g)
            gap, se = mean_and_se(elbo(ExactScoreModel(sde, oracle.score(sde)), x, Debiased(), probe="exact",
                                       generator=g) - oracle.log_prob(x))
            kl = oracle.prior_kl(sde)
            assert abs(gap + kl) < 4 * se + 1e-3, (gap, kl, se)
    if gamma_max == 1.0:
        assert kl > 8 * se  # the endpoint matters: the test would see a wrong prior term


# ------------------------------------------------------------------ the ELBO loss's gradients are the bound's

FORMS = {"divergence": elbo, "denoising": dsm_elbo}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sampler", [Debiased, Uniform])
def test_the_elbo_loss_differentiates_through_y_t_into_the_data(form, sampler):
    """With the exact score of Gaussian data the ELBO is log p(x) for every x, so its gradient in x (the
    path a dequantizer trains by) is ∇ log p(x) = −Σ⁻¹(x − μ): through Y_t = m x + σ ε too, not only
    through the prior term (detaching Y_t before the divergence misses it by the whole gradient)."""
    oracle, sde = gaussian_3d(), VPSDE()
    model = ExactScoreModel(sde, oracle.score(sde))
    x0 = oracle.sample(3, torch.Generator().manual_seed(0))
    n = 100_000
    with one_thread():
        x = x0.repeat_interleave(n, 0).requires_grad_(True)
        value = FORMS[form](model, x, sampler(), generator=torch.Generator().manual_seed(1), create_graph=True)
        (grad,) = torch.autograd.grad(value.sum(), x)
    grad = grad.reshape(3, n, 3)
    exact = -torch.linalg.solve(oracle.covs[0], (x0 - oracle.mean).T).T
    se = grad.std(dim=1) / math.sqrt(n)
    assert exact.abs().max() > 50 * se.max()
    assert ((grad.mean(dim=1) - exact).abs() < 4.5 * se + 1e-3).all(), (grad.mean(dim=1) - exact, se)


@pytest.mark.parametrize("form", FORMS)
def test_the_elbo_loss_gives_the_endpoints_the_gradient_of_the_prior_mismatch(form):
    """With the exact score, E ELBO = E log p − KL(q_T ‖ p_T) for every schedule, so its gradient in the
    learned endpoints is −∇ KL, taken here by central differences of the closed-form KL (γ_max = 1 leaves a
    mismatch that depends on it)."""
    oracle = gaussian_3d()
    sde = learned(gamma_max=1.0, learn_endpoints=True, variance_interior=False).double()
    model = ExactScoreModel(sde, oracle.score(sde))

    def kl(ends) -> float:
        with torch.no_grad():
            saved = sde.ends.clone()
            sde.ends.copy_(torch.tensor(ends, dtype=torch.float64))
            value = oracle.prior_kl(sde)
            sde.ends.copy_(saved)
        return value

    h = 1e-4
    expected = [-(kl([-10.0 + h, 1.0]) - kl([-10.0 - h, 1.0])) / (2 * h),
                -(kl([-10.0, 1.0 + h]) - kl([-10.0, 1.0 - h])) / (2 * h)]
    g = torch.Generator().manual_seed(1)
    chunks = []
    with one_thread():
        for _ in range(100):
            value = FORMS[form](model, oracle.sample(1000, g), Uniform(), generator=g, create_graph=True)
            chunks.append(torch.autograd.grad(value.mean(), sde.ends)[0])
    chunks = torch.stack(chunks)
    mean, se = chunks.mean(dim=0), chunks.std(dim=0) / math.sqrt(len(chunks))
    assert abs(expected[1]) > 10 * float(se[1])  # the test can see the endpoint's gradient
    assert ((mean - torch.tensor(expected, dtype=torch.float64)).abs() < 4.5 * se).all(), (mean, expected, se)


def test_the_denoising_form_needs_an_sde_with_linear_drift(tmp_path, capsys):
    """The example plugin's SDE declares no linear_drift: κ = d log m/dt is derived from its marginals and
    checked against f, so it is accepted (with the shipped Swiss roll's combined_elbo too); an SDE whose
    drift is not affine is refused in one line naming both sections."""
    status, _, err = run_cli(capsys, "check", write_experiment(tmp_path, sde={"name": "vp_const"},
                                                               loss={"name": "elbo", "form": "denoising"},
                                                               eval={"estimator": "combined_elbo"}))
    assert status == 0, err
    status, _, err = run_cli(capsys, "check", "experiments/swissroll.yaml", "sde={name: vp_const}")
    assert status == 0, err
    from sdeflow.components.registry import build_registry

    registry = build_registry([("nonaffine", NonAffinePlugin)], entry_points=True)
    from sdeflow.assembly.build import check_experiment
    from sdeflow.experiment.config import load_experiment

    path = write_experiment(tmp_path, sde={"name": "vp_cubic"}, loss={"name": "elbo", "form": "denoising"})
    with pytest.raises(ConfigError, match=r"loss.form: .*f\(y, t\) differs from κ\(t\) y.*not affine.*vp_cubic"):
        check_experiment(load_experiment(path, registry=registry), registry)
    status, _, err = run_cli(capsys, "check", write_experiment(tmp_path, loss={"name": "elbo", "form": "denoising"}))
    assert status == 0, err
    status, _, err = run_cli(capsys, "check", write_experiment(tmp_path, loss={"name": "elbo", "form": "both"}))
    assert_one_line_error(status, err, "tiny.yaml: loss.form: expected 'divergence' | 'denoising', got 'both'")


# ------------------------------------------------------------------ the kernel


class CubicDriftVP(VPSDE):
    """f = −½ β y − y³: not affine (and so inconsistent with Gaussian marginals), declared by no one."""

    def f(self, y, t):
        return super().f(y, t) - y**3

    linear_drift = SDE.linear_drift


class NonAffinePlugin:
    @staticmethod
    @hookimpl
    def sdeflow_register_sdes(register):
        register("vp_cubic", CubicDriftVP)


def tiny_objective(sde, loss=None, time_sampler=None) -> Objective:
    torch.manual_seed(0)
    net = MLP(data_shape=(3,), hidden=16, depth=1)
    torch.nn.init.normal_(list(net.parameters())[-2], std=0.1)
    return Objective(DiffusionModel(sde, Drift(net, sde)), loss or NegativeELBO(), time_sampler or Uniform())


def test_every_trainable_parameter_of_every_registered_component_receives_a_gradient():
    registry = default_registry()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    checked = []
    for kind in ("sde", "time_sampler", "loss"):
        for component in registry.all(kind):
            built = component.factory()
            if not isinstance(built, torch.nn.Module) or not any(p.requires_grad for p in built.parameters()):
                continue
            if kind == "sde" and "learn_endpoints" in component.arguments:
                built = component.factory(learn_endpoints=True)
            objective = tiny_objective(**{kind: built} if kind != "sde" else {"sde": built})
            per_example = objective(x)
            objective.observe_loss(per_example)
            per_example.mean().backward()
            objective.observe_loss(None)
            for name, p in built.named_parameters():
                assert p.grad is not None and bool(torch.isfinite(p.grad).all()), f"{kind} {component.name}: {name}"
                assert p.grad.abs().sum() > 0, f"{kind} {component.name}: {name} got a zero gradient"
            checked.append(f"{kind}:{component.name}")
    assert "sde:learned_vp" in checked


@pytest.mark.parametrize("form, bound, t_eps", [("divergence", "paper", 1e-3), ("denoising", "paper", 0.3),
                                                 ("denoising", "truncated", 0.3), ("denoising", "discrete", 0.3)])
def test_the_variance_gradient_is_the_gradient_of_the_mean_squared_loss(form, bound, t_eps):
    """VDM §5.1: the interior shape gets ∇ mean L² (not ∇ mean L); the endpoints and the network ∇ mean L. In
    every form and bound: with t_ε = 0.3 about a third of the draws fall below t_ε (the divergence form's
    draws, or draws that count zero), and the denoising constant, the prior term and the bound's head all
    depend on the schedule."""
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for variance in (True, False):
        sde = learned(hidden=8, learn_endpoints=True, variance_interior=variance, t_eps=t_eps)
        objective = tiny_objective(sde, loss=NegativeELBO(form=form)).double()
        objective.model.bound = make_bound(bound, UnitInterval(), 4)
        torch.manual_seed(5)
        per_example = objective(x)
        objective.observe_loss(per_example)
        target = per_example.mean() if variance else None
        if variance:
            target.backward()
        else:  # the reference: mean L for everything, mean L² for the interior, by two explicit passes
            sde = objective.model.sde
            interior = list(sde.h.parameters())
            others = [p for p in objective.parameters() if all(p is not q for q in interior)]
            mean_grads = torch.autograd.grad(per_example.mean(), others, retain_graph=True)
            square_grads = torch.autograd.grad(per_example.pow(2).mean(), interior)
            for p, g in zip([*others, *interior], [*mean_grads, *square_grads]):
                p.grad = g
        grads[variance] = [p.grad.clone() for p in objective.parameters()]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-12), (a - b).abs().max()


@pytest.mark.parametrize("t", [1e-9, 1e-12])
def test_learned_vp_sigma_keeps_its_precision_down_to_t_0_in_float32(t):
    """σ² = −expm1(−B) with B = log1p(sigmoid(γ₀) expm1(γ − γ₀)) and γ − γ₀ from h(τ) − h(0) written without a
    difference of sigmoids: as t → 0, σ²/t → sigmoid(γ₀) γ′(0) (the float64 limit), in float32 too, with
    non-zero biases (at initialisation b₁ = 0 hid the cancellation)."""
    sde = learned(hidden=16)
    with torch.no_grad():
        sde.h.b1.fill_(0.7)
        sde.h.b2.add_(0.3)
    ref = copy.deepcopy(sde).double()
    g0 = ref.ends[0]
    _, slope = ref.gamma_and_slope(torch.zeros(1, dtype=torch.float64))
    limit = float((torch.sigmoid(g0) * slope).detach())
    t32 = torch.full((1,), t, dtype=torch.float32)
    sigma32 = sde.sigma(t32).detach().double()
    assert float(sigma32**2 / t) == pytest.approx(limit, rel=1e-3)
    r = sde.likelihood_weight(t32).detach()
    assert float(r * t) == pytest.approx(1.0, rel=1e-2)  # r = g²/σ² ≈ 1/t: finite, not ∞ from σ = 0


def test_a_trainable_sde_needs_a_loss_that_bounds_the_likelihood(tmp_path, capsys):
    path = write_experiment(tmp_path, sde=LEARNED, loss={"name": "dsm", "weighting": "likelihood"})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, "tiny.yaml: sde: {name: learned_vp", "loss: {name: dsm, weighting: likelihood}",
                          "not a bound on the likelihood")
    status, _, err = run_cli(capsys, "check", write_experiment(tmp_path, filename="ok.yaml", sde=LEARNED,
                                                               loss={"name": "elbo"}))
    assert status == 0, err
    status, _, err = run_cli(capsys, "check", path, "loss={name: elbo}", "train.component_lr={network: 0.1}")
    assert_one_line_error(status, err, "train.component_lr.network", "expected one of sde, parameterization")


def test_per_component_rates_and_an_ema_that_tracks_the_sde(tmp_path):
    exp = experiment(tmp_path, "train.component_lr={sde: 0.05}", "train.ema=0.5", "train.ema_warmup=false",
                     sde=LEARNED, loss={"name": "elbo"})
    run_dir = tmp_path / "run"
    probe = Trainer(build_run(exp, tmp_path / "probe"))
    groups = probe.optimizer.param_groups
    assert [g["lr"] for g in groups] == [exp.train.lr, 0.05]
    sde_params = {id(p) for p in probe.run.model.sde.parameters()}
    assert {id(p) for p in groups[1]["params"]} == sde_params
    assert not sde_params & {id(p) for p in groups[0]["params"]}
    probe.lock.release()
    train(exp, run_dir)
    state = load(run_dir / "checkpoints" / "last.pt")
    assert "sde.ends" in state["model"] and "sde.ends" in state["ema"]
    start = torch.tensor([-10.0, 10.0])
    assert not torch.equal(state["model"]["sde.ends"], start)  # the endpoints were trained
    assert not torch.equal(state["ema"]["sde.ends"], state["model"]["sde.ends"])  # and averaged apart
    train(experiment(tmp_path, "train.steps=6", "train.component_lr={sde: 0.01}", "train.ema=0.5",
                     "train.ema_warmup=false", sde=LEARNED, loss={"name": "elbo"}), run_dir)  # a new rate on resume
    assert load(run_dir / "checkpoints" / "last.pt")["optimizer"]["param_groups"][1]["lr"] == 0.01
    with pytest.raises(ConfigError, match="train.component_lr.sde: must be a positive learning rate"):
        train(experiment(tmp_path, "train.component_lr={sde: -1}", sde=LEARNED, loss={"name": "elbo"}), tmp_path / "x")


def test_a_trainable_sde_resumes_exactly(tmp_path):
    args = ("train.steps=6",)
    sections = {"sde": LEARNED, "loss": {"name": "elbo"}, "time_sampler": {"name": "debiased"}}
    train(experiment(tmp_path, *args, **sections), tmp_path / "a")
    train(experiment(tmp_path, "train.steps=3", **sections), tmp_path / "b")
    train(experiment(tmp_path, *args, **sections), tmp_path / "b")
    assert_same_state(load(tmp_path / "a" / "checkpoints" / "last.pt"),
                      load(tmp_path / "b" / "checkpoints" / "last.pt"))


def test_a_density_derived_from_trainable_parameters_is_never_stale():
    sde = learned(hidden=8)
    before = sde.likelihood_time_density
    assert sde.likelihood_time_density is before  # cached while the parameters stay
    with torch.no_grad():
        sde.h.w2.add_(1.0)
    after = sde.likelihood_time_density
    assert after is not before and after.Z != pytest.approx(before.Z, rel=1e-6)
    assert after.Z == pytest.approx(TabulatedTimeDensity(sde).Z, rel=1e-12)
    t = torch.tensor([0.2, 0.7])
    assert torch.allclose(Debiased().density(sde, t), TabulatedTimeDensity(sde).pdf(t))


# ------------------------------------------------------------------ DDP: 2 gloo ranks against one process


class FixedDraws(Loss):
    """A deterministic per-example bound-like loss (t and ε functions of x), so shards and the union see the
    same draws: −prior + r(t) ℓ, which reaches every SDE parameter."""

    trains = frozenset({"parameterization", "sde", "time_sampler", "loss"})

    def __call__(self, model, x, time_sampler, *, generator=None):
        sde = model.sde
        t = torch.sigmoid(x[:, 0]) * 0.9 + 0.05
        eps = torch.sin(3 * x + 1)
        y = sde.marginal_sample(x, t, eps)
        a = model.a(y, t)
        ell = 0.5 * flat_sum((a * (sde.sigma(t) / sde.g(t))[:, None] + eps) ** 2)
        return sde.likelihood_weight(t) * ell - prior_term(sde, x)


def _union_batch() -> torch.Tensor:
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _ddp_objective() -> Objective:
    """In float64: in float32 the r(t) ℓ terms (r ~ 1/t) leave 1e-3 relative differences between any two
    batchings of the same sum, DDP or not."""
    return tiny_objective(learned(hidden=8, learn_endpoints=True), loss=FixedDraws()).double()


def _trainable_grads(objective: Objective, x: torch.Tensor) -> list[torch.Tensor]:
    per_example = objective(x)
    objective.observe_loss(per_example)
    per_example.mean().backward()
    objective.observe_loss(None)
    return [p.grad for p in objective.parameters()]


def _ddp_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank, torch.device("cpu"))
    objective = _ddp_objective()
    wrapped = ctx.wrap(objective)
    per_example = wrapped(ctx.shard(_union_batch()))
    objective.observe_loss(per_example)
    per_example.mean().backward()
    if rank == 0:
        torch.save([p.grad for p in objective.parameters()], out)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_over_the_objective_all_reduces_the_sde_gradient_like_one_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    single = _trainable_grads(_ddp_objective(), _union_batch())
    distributed = torch.load(out, weights_only=True)
    sde_count = sum(1 for _ in learned(hidden=8, learn_endpoints=True).parameters())
    assert sde_count == 6  # ends, w1, b1, w2, b2, w3: compared below with the network's
    for a, b in zip(single, distributed, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)
    assert all(g.abs().sum() > 0 for g in distributed)
    assert math.isfinite(float(sum(g.sum() for g in distributed)))


ALL_TECHNIQUES = """
name: techniques
seed: 0
device: cpu
data: {name: gaussian, dim: 2, n: 256, n_test: 32}
sde: {name: learned_vp, hidden: 8, learn_endpoints: true}
network: {name: mlp, hidden: 16, depth: 1, fourier_features: [0, 2]}
parameterization: {name: velocity}
bound: truncated
loss: {name: elbo}
time_sampler: {name: log_snr}
sampler: {name: euler_maruyama, steps: 10}
train: {steps: 4, batch_size: 16, lr: 1.0e-2, log_every: 2, checkpoint_every: 2, component_lr: {sde: 0.05}}
eval: {batch_size: 16}
sample: {num: 8}
logging: {progress: false, tensorboard: false}
"""


def test_every_technique_at_once_trains_under_two_gloo_ranks_and_resumes(tmp_path):
    """learned_vp + velocity + Fourier features + log-SNR time + the ELBO loss, under torchrun-style DDP
    (2 gloo ranks), then resumed: the SDE's parameters agree on both ranks (one checkpoint) and moved."""
    from test_distributed import _free_port, _train_worker

    exp = tmp_path / "techniques.yaml"
    exp.write_text(ALL_TECHNIQUES)
    run_dir = tmp_path / "run"
    argv = ["train", str(exp), "--run-dir", str(run_dir)]
    mp.spawn(_train_worker, args=(_free_port(), argv), nprocs=2, join=True)
    first = load(run_dir / "checkpoints" / "last.pt")
    assert first["step"] == 4 and not torch.equal(first["model"]["sde.ends"], torch.tensor([-10.0, 10.0]))
    mp.spawn(_train_worker, args=(_free_port(), [*argv, "train.steps=6"]), nprocs=2, join=True)
    second = load(run_dir / "checkpoints" / "last.pt")
    assert second["step"] == 6 and not torch.equal(second["model"]["sde.ends"], first["model"]["sde.ends"])
    assert math.isfinite(json.loads((run_dir / "eval.json").read_text())["test"]["elbo"]["bpd"])
