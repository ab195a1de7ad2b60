"""Fast samplers (issue 18): the adaptive ODE's NFE, Heun, DPM-Solver++ and the time grids, against closed forms.

For Gaussian data N(μ₀, Σ₀ = U diag(λ) Uᵀ) and a linear-drift SDE (f = κ y), the probability-flow ODE is
linear and solved exactly: with C(t) = m² λ + σ² (the marginal covariance's eigenvalues), the velocity is
v = κ x + ½ g² C⁻¹ (x − m μ₀) in the eigenbasis, and dC/dt = 2κ C + g², so z = Uᵀ(x − m μ₀) scales by
√(C(t′)/C(t)) from t to t′ (``exact_flow``). The samplers are compared with that map from the same x_T:
no Monte-Carlo error, so the error against the number of steps shows each method's order.
Run ``pytest -s`` to see the measured errors, slopes and NFE.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchdiffeq import odeint

from oracles import GaussianOracle, gaussian_3d, one_thread
from sdeflow.components.registry import default_registry
from sdeflow.core.errors import InvalidArgument
from sdeflow.core.interfaces import SDE, bcast, gaussian_log_prob, time_grid
from sdeflow.core.model import ExactScoreModel
from sdeflow.core.time_grids import karras, log_snr, make_grid, noise_to_signal, uniform_log_snr, uniform_t
from sdeflow.likelihood.ode import ode_velocity
from sdeflow_builtin.samplers import ODE, DPMSolver, EulerMaruyama, Heun, PredictorCorrector
from sdeflow_builtin.sdes import VESDE, VPSDE, SubVPSDE

N = 2000  # points per solve: every solve is deterministic, so this only widens the set of starting points


class CosineSDE(SDE):
    """A third-party-style SDE the samplers know nothing of: m = cos(a t), σ = sin(a t), f = κ y with
    κ = (log m)′ = −a tan(a t), g² = (σ²)′ − 2κσ² = 2a tan(a t) (so Y_t | x ~ N(m x, σ² I) holds)."""

    a = 1.5

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        return bcast(self.linear_drift(t), y) * y

    def linear_drift(self, t: Tensor) -> Tensor:
        return -self.a * torch.tan(self.a * t)

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(2 * self.a * torch.tan(self.a * t))

    def m(self, t: Tensor) -> Tensor:
        return torch.cos(self.a * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(self.a * t)

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y: Tensor) -> Tensor:
        return gaussian_log_prob(y)


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine": CosineSDE}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def exact_flow(oracle: GaussianOracle, sde: SDE, x: Tensor, t: float, t_end: float) -> Tensor:
    """The probability-flow ODE's exact map from t to t_end for Gaussian data (see the module docstring)."""
    both = torch.tensor([t, t_end], dtype=torch.float64)
    m, C = sde.m(both), oracle.marginal_eigvals(sde, both)
    z = (x - m[0] * oracle.mean) @ oracle.U
    return m[1] * oracle.mean + (z * (C[1] / C[0]).sqrt()) @ oracle.U.T


def setup(sde_name: str = "vp", n: int = N, seed: int = 0):
    """(oracle, sde, exact-score model, x_T, the exact x at t_ε from x_T)."""
    oracle, sde = gaussian_3d(), SDES[sde_name]()
    x_T = sde.prior_sample((n, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return oracle, sde, ExactScoreModel(sde, oracle.score(sde)), x_T, exact_flow(oracle, sde, x_T, sde.T, sde.t_eps)


def solve(sampler, model, x_T: Tensor, generator=None) -> Tensor:
    return sampler.sample(model, x_T, sampler.time_grid(model.sde), generator=generator)


def log_log_slope(steps, errors) -> float:
    """Least-squares slope of log(error) against log(steps)."""
    x, y = torch.tensor(steps, dtype=torch.float64).log(), torch.tensor(errors, dtype=torch.float64).log()
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def counting(model):
    """The model with its score function wrapped to count calls and record every time it is asked at."""
    calls = {"n": 0, "t": []}
    inner = model.score_fn

    def score_fn(y, t):
        calls["n"] += 1
        calls["t"].append(t.detach())
        return inner(y, t)

    return ExactScoreModel(model.sde, score_fn), calls


# ------------------------------------------------------------------ the adaptive ODE sampler


def test_the_exact_flow_is_the_probability_flow_ode():
    """The oracle itself: a 1000-step RK4 solve of dx/dt = v agrees with ``exact_flow`` to 1e-9 (measured 8e-11)."""
    oracle, sde, model, x_T, exact = setup(n=500)
    v = lambda t, x: ode_velocity(model, x, t.expand(x.shape[0]))  # noqa: E731
    ts = torch.tensor([sde.T, sde.t_eps], dtype=torch.float64)
    rk4 = odeint(v, x_T, ts, method="rk4", options={"step_size": (sde.T - sde.t_eps) / 1000})[-1]
    assert float((rk4 - exact).abs().max()) < 1e-9


def test_adaptive_ode_nfe_falls_as_the_tolerance_loosens_and_not_with_steps():
    """dopri5 steps only as the tolerance demands; the reported states are interpolated, so 10 and 200
    output times cost the same NFE (before the fix every output time was a step: ≥ 6 × 200 NFE).
    Accuracy: the final state within 20 tol of the exact map (measured ≤ 4.3 tol: the per-step error
    control is relative to |x| ≈ 3 and errors add up over ~15–25 steps) and every interpolated state
    within 10 tol^{4/5} (measured ≤ 3 tol^{4/5}: dopri5's dense output is of order 4 in steps that
    scale as tol^{1/5})."""
    oracle, sde, model, x_T, exact = setup()
    nfe = {}
    for tol in (1e-3, 1e-5, 1e-7):
        for steps in (10, 200):
            sampler = ODE(steps, rtol=tol, atol=tol)
            ts = sampler.time_grid(sde)
            final, states = sampler.trajectory(model, x_T, ts)
            nfe[tol, steps] = sampler.nfe
            final_error = float((final - exact).abs().max())
            state_error = max(float((states[i] - exact_flow(oracle, sde, x_T, sde.T, float(ts[i]))).abs().max())
                              for i in range(len(ts)))
            print(f"\n[fast] ode tol {tol:g}, {steps} steps: nfe {sampler.nfe}, final error {final_error:.2e}, "
                  f"worst state {state_error:.2e}")
            assert final_error < 20 * tol
            assert state_error < 10 * tol**0.8
    assert nfe[1e-3, 10] < nfe[1e-5, 10] < nfe[1e-7, 10]
    for tol in (1e-3, 1e-5, 1e-7):
        assert nfe[tol, 10] == nfe[tol, 200]
    assert nfe[1e-5, 200] < 200


def test_adaptive_ode_never_evaluates_outside_the_time_grid():
    """The last time is a step boundary: no stage beyond t_ε (VP's σ² < 0 below t = 0)."""
    _, sde, model, x_T, _ = setup()
    spy, calls = counting(model)
    sampler = ODE(50, rtol=1e-3, atol=1e-3)
    solve(sampler, spy, x_T)
    times = torch.cat(calls["t"])
    assert calls["n"] == sampler.nfe
    assert float(times.min()) >= sde.t_eps - 1e-12 and float(times.max()) <= sde.T + 1e-12


# ------------------------------------------------------------------ Heun and DPM-Solver++: order of convergence


CONVERGENCE = [
    # (label, factory(steps), steps fitted, expected slope, margin, SDEs): measured slopes in the comments
    ("heun", lambda n: Heun(n), (16, 32, 64, 128), -2, 0.1, ("vp", "ve")),  # −1.99, −2.10
    ("dpm_solver order 1", lambda n: DPMSolver(n, 1), (16, 32, 64, 128), -1, 0.1, ("vp", "subvp", "ve", "cosine")),
    ("dpm_solver order 2", lambda n: DPMSolver(n, 2), (16, 32, 64, 128), -2, 0.1, ("vp", "subvp", "ve", "cosine")),
    # order 3 on the ρ-grid: its first steps are pre-asymptotic (16 → 32 gains 2⁴), so fit from 32 on
    ("dpm_solver order 3", lambda n: DPMSolver(n, 3, grid="karras"), (32, 64, 128, 256), -3, 0.15, ("vp", "ve")),
]


@pytest.mark.parametrize(("label", "make", "steps", "slope", "margin", "sdes"), CONVERGENCE,
                         ids=[c[0] for c in CONVERGENCE])
def test_fast_samplers_converge_at_their_order(label, make, steps, slope, margin, sdes):
    """Max error over 2000 starting points against the exact map, float64: log-log slope ≈ −order."""
    for name in sdes:
        _, _, model, x_T, exact = setup(name)
        errors = [float((solve(make(n), model, x_T) - exact).abs().max()) for n in steps]
        fitted = log_log_slope(steps, errors)
        print(f"\n[fast] {label}, {name}: errors {', '.join(f'{e:.2e}' for e in errors)} at {steps} steps; "
              f"slope {fitted:.2f}")
        assert abs(fitted - slope) < margin, name


def test_third_order_dpm_solver_on_the_log_snr_grid_is_at_least_third_order_before_its_warm_up_shows():
    """On the default (equal-λ) grid order 3 converges even faster than h³ over 8–64 steps (measured
    slope −4.0 for VP): for this Gaussian the h³ term nearly cancels. Far below (≈ 1e-7, 256+ steps) the
    lower-order warm-up steps' h² error takes over, as for any multistep start; not tested here."""
    _, _, model, x_T, exact = setup()
    steps = (8, 16, 32, 64)
    errors = [float((solve(DPMSolver(n, 3), model, x_T) - exact).abs().max()) for n in steps]
    print(f"\n[fast] dpm_solver order 3, log-SNR grid, vp: errors {', '.join(f'{e:.2e}' for e in errors)}; "
          f"slope {log_log_slope(steps, errors):.2f}")
    assert log_log_slope(steps, errors) < -2.8
    order2 = float((solve(DPMSolver(32, 2), model, x_T) - exact).abs().max())
    assert errors[2] < order2 / 10


FAST = {  # factory, order, steps that bring the moments within Monte-Carlo error of q_{t_ε}
    "heun": (lambda n: Heun(n), 2, 64),
    "dpm1": (lambda n: DPMSolver(n, 1), 1, 512),  # DDIM's bias at 64 steps is still 3.2 s.e.
    "dpm2": (lambda n: DPMSolver(n, 2), 2, 64),
    "dpm3": (lambda n: DPMSolver(n, 3), 3, 64),
}


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0), torch.cov(x.T)


def diffused(oracle: GaussianOracle, sde: SDE) -> tuple[Tensor, Tensor]:
    """Mean and covariance of q_{t_ε} = N(m μ₀, m² Σ₀ + σ² I), what the samplers aim at."""
    t = torch.tensor([sde.t_eps], dtype=torch.float64)
    m, s = float(sde.m(t)), float(sde.sigma(t))
    return m * oracle.mean, m**2 * oracle.covs[0] + s**2 * torch.eye(3, dtype=torch.float64)


@pytest.mark.parametrize("name", FAST)
def test_fast_samplers_reproduce_the_data_moments(name):
    """4000 prior samples: the exact map's moments are those of q_{t_ε} within 4 Monte-Carlo s.e. (so it
    is the right target); so are each sampler's with enough steps (64, DDIM 512), and their gap to the
    exact map's shrinks from 8 to 64 steps by at least half of 8^order (measured: Heun 63, orders 1–3:
    6.2, 56, 5000)."""
    oracle, sde, model, x_T, exact = setup(n=4000, seed=1)
    mean, cov = diffused(oracle, sde)
    se_mean = (cov.diagonal() / len(x_T)).sqrt()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / len(x_T)).sqrt()

    def z_max(x, to_mean, to_cov):
        m, c = moments(x)
        return max(float(((m - to_mean) / se_mean).abs().max()), float(((c - to_cov) / se_cov).abs().max()))

    exact_mean, exact_cov = moments(exact)
    make, order, enough = FAST[name]
    coarse, fine, converged = (solve(make(steps), model, x_T) for steps in (8, 64, enough))
    gaps = [z_max(coarse, exact_mean, exact_cov), z_max(fine, exact_mean, exact_cov)]
    print(f"\n[fast] {name}: moment gap to the exact map {gaps[0]:.3f} s.e. at 8 steps, {gaps[1]:.4f} at 64; "
          f"to q_t_eps: exact map {z_max(exact, mean, cov):.2f}, sampler at {enough} steps "
          f"{z_max(converged, mean, cov):.2f} s.e.")
    assert z_max(exact, mean, cov) < 4
    assert z_max(converged, mean, cov) < 4
    assert gaps[0] / gaps[1] > 8**order / 2


def test_heun_with_churn_still_samples_the_data_gaussian():
    """Stochastic churn (S_churn = 20) moves every state to a noisier time t̂ and back, which leaves the
    marginals alone but lengthens each ODE step (t̂ → t_{i+1}): with 2·10⁵ samples the bias of Var x₁ is
    −0.034 at 32 steps (γ = √2 − 1) and −0.006 at 128 (γ = 0.16, within noise). At 128 steps the moments
    of 4000 samples are within 4 s.e. of q_{t_ε}; different from the deterministic sampler, and
    reproducible from the generator."""
    oracle, sde, model, x_T, exact = setup(n=4000, seed=2)
    mean, cov = diffused(oracle, sde)
    sampler = Heun(128, churn=20.0)
    x = solve(sampler, model, x_T, torch.Generator().manual_seed(3))
    again = solve(sampler, model, x_T, torch.Generator().manual_seed(3))
    m, c = moments(x)
    z_mean = (m - mean) / (cov.diagonal() / len(x)).sqrt()
    z_cov = (c - cov) / ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / len(x)).sqrt()
    print(f"\n[fast] heun churn 20: max |z| mean {float(z_mean.abs().max()):.2f}, cov {float(z_cov.abs().max()):.2f}")
    assert z_mean.abs().max() < 4 and z_cov.abs().max() < 4
    torch.testing.assert_close(x, again)
    assert float((x - exact).abs().mean()) > 0.01
    assert sampler.lam is None and Heun(8).lam == 1.0


@pytest.mark.parametrize("sampler", [Heun(6), Heun(6, churn=5.0), DPMSolver(6, 3)], ids=["heun", "churn", "dpm"])
def test_fast_samplers_work_on_image_shaped_tensors(sampler):
    """An elementwise exact score (data N(0, I)): (B, C, H, W) gives the (B, D) result, reshaped."""
    sde = VPSDE()
    model = ExactScoreModel(sde, lambda y, t: -y / bcast(sde.m(t) ** 2 + sde.sigma(t) ** 2, y))
    x_T = sde.prior_sample((4, 2, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    image = solve(sampler, model, x_T, torch.Generator().manual_seed(1))
    flat = solve(sampler, model, x_T.reshape(4, -1), torch.Generator().manual_seed(1))
    assert image.shape == x_T.shape
    torch.testing.assert_close(image.reshape(4, -1), flat)


# ------------------------------------------------------------------ NFE, callbacks, arguments, listing


NFE = [
    (EulerMaruyama(7), 7),
    (PredictorCorrector(7, corrector_steps=2), 21),
    (Heun(7), 14),
    (Heun(7, churn=3.0), 14),
    (DPMSolver(7, 1), 7),
    (DPMSolver(7, 3), 7),
    (ODE(7, rtol=1e-3, atol=1e-3), None),
]


@pytest.mark.parametrize(("sampler", "expected"), NFE, ids=lambda v: type(v).__name__ if not isinstance(v, int) else "")
def test_the_callback_sees_every_state_and_nfe_counts_every_evaluation(sampler, expected):
    _, sde, model, x_T, _ = setup(n=5)
    spy, calls = counting(model)
    ts = sampler.time_grid(sde)
    seen = []
    final = sampler.sample(spy, x_T, ts, generator=torch.Generator().manual_seed(1),
                           callback=lambda i, t, x: seen.append((i, float(t), x.clone())))
    assert [i for i, _, _ in seen] == list(range(sampler.steps + 1))
    assert [t for _, t, _ in seen] == pytest.approx(ts.tolist())
    torch.testing.assert_close(seen[0][2], x_T)
    torch.testing.assert_close(seen[-1][2], final)
    assert sampler.nfe == calls["n"]
    if expected is not None:
        assert sampler.nfe == expected


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: Heun(0), "steps"),
        (lambda: Heun(10, grid="cosine"), "grid"),
        (lambda: Heun(10, churn=-1.0), "churn"),
        (lambda: DPMSolver(0), "steps"),
        (lambda: DPMSolver(10, order=0), "order"),
        (lambda: DPMSolver(10, order=4), "order"),
        (lambda: DPMSolver(10, grid="linear"), "grid"),
        (lambda: uniform_log_snr(VPSDE(), 0), "steps"),
        (lambda: karras(VPSDE(), 10, rho=0.0), "rho"),
        (lambda: make_grid("edm", VPSDE(), 10), "grid"),
    ],
)
def test_bad_fast_sampler_arguments_raise_invalid_argument_naming_it(factory, argument):
    with pytest.raises(InvalidArgument) as info:
        factory()
    assert info.value.argument == argument


def test_the_registry_lists_the_new_samplers_with_their_typed_arguments():
    registry = default_registry()
    heun = registry.get("sampler", "heun").arguments
    dpm = registry.get("sampler", "dpm_solver").arguments
    assert {name: a.default for name, a in heun.items()} == {"steps": 50, "grid": "karras", "churn": 0.0}
    assert {name: a.default for name, a in dpm.items()} == {"steps": 20, "order": 2, "grid": "log_snr"}
    assert heun["grid"].describe() == "grid: 'uniform' | 'log_snr' | 'karras' = 'karras'"
    sampler = registry.get("sampler", "dpm_solver").factory(steps=5, order=3, grid="karras")
    torch.testing.assert_close(sampler.time_grid(VPSDE()), karras(VPSDE(), 5))


# ------------------------------------------------------------------ the time grids


GRIDS = {"uniform": uniform_t, "log_snr": uniform_log_snr, "karras": karras}


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("grid", GRIDS)
def test_grids_run_from_T_to_t_eps_decreasing(grid, sde_name):
    sde = SDES[sde_name]()
    ts = GRIDS[grid](sde, 12)
    assert ts.dtype == torch.float64 and ts.shape == (13,)
    assert float(ts[0]) == sde.T and float(ts[-1]) == sde.t_eps
    assert (ts.diff() < 0).all()
    torch.testing.assert_close(ts, make_grid(grid, sde, 12))


@pytest.mark.parametrize("sde_name", SDES)
def test_log_snr_grid_is_equally_spaced_in_log_snr(sde_name):
    sde = SDES[sde_name]()
    lam = 2 * (torch.log(sde.m(uniform_log_snr(sde, 20))) - torch.log(sde.sigma(uniform_log_snr(sde, 20))))
    torch.testing.assert_close(lam, log_snr(sde, uniform_log_snr(sde, 20)))
    steps = lam.diff()
    assert (steps > 0).all()
    torch.testing.assert_close(steps, torch.full_like(steps, float(steps.mean())), rtol=1e-9, atol=0)


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("rho", [1.0, 7.0])
def test_karras_grid_is_equally_spaced_in_sigma_over_m_to_the_one_over_rho(sde_name, rho):
    sde = SDES[sde_name]()
    ts = karras(sde, 20, rho)
    ramp = (sde.sigma(ts) / sde.m(ts)) ** (1 / rho)
    torch.testing.assert_close(ramp, noise_to_signal(sde, ts) ** (1 / rho))
    torch.testing.assert_close(ramp.diff(), torch.full((20,), float(ramp.diff().mean()), dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_uniform_grid_is_the_default_grid_and_ve_log_snr_is_uniform_in_t():
    """VE's λ = −2 log σ is linear in t, so its log-SNR grid is the uniform one."""
    sde = VESDE()
    torch.testing.assert_close(uniform_t(sde, 9), time_grid(sde, 9))
    torch.testing.assert_close(uniform_log_snr(sde, 9), uniform_t(sde, 9), rtol=1e-12, atol=1e-12)
    assert Heun(9, grid="uniform").time_grid(sde).tolist() == time_grid(sde, 9).tolist()
    assert math.isclose(float(DPMSolver(9).time_grid(sde, 4)[1]), float(uniform_log_snr(sde, 4)[1]))
