"""Forward (inference) SDEs: VP (the paper's default), sub-VP, VE and the learned VP of VDM (MATH.md §1, §12)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdeflow.plugin import SDE, TimeDensity, bcast, draw_examples, gaussian_log_prob, hookimpl, require


def _check_time(T: float, t_eps: float) -> None:
    require(T > 0, "T", f"must be positive, got {T}")
    require(0 < t_eps < T, "t_eps", f"must be in (0, T={T}), got {t_eps}")


class _LinearBeta(SDE):
    """Shared by VP and sub-VP: β(t) = β_min + (β_max − β_min) t and B(t) = ∫₀ᵗ β."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_eps: float = 1e-3):
        require(beta_min > 0, "beta_min", f"must be positive, got {beta_min}")
        require(beta_max >= beta_min, "beta_max", f"must be ≥ beta_min={beta_min}, got {beta_max}")
        _check_time(T, t_eps)
        self.beta_min, self.beta_max, self.T, self.t_eps = beta_min, beta_max, T, t_eps

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = β_min + (β_max − β_min) t."""
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def B(self, t: Tensor) -> Tensor:
        """B(t) = β_min t + ½ (β_max − β_min) t²."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def B_inverse(self, B: Tensor) -> Tensor:
        """t with B(t) = B: the positive root of ½ (β_max − β_min) t² + β_min t − B."""
        slope = self.beta_max - self.beta_min
        if slope == 0:
            return B / self.beta_min
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * slope * B))  # no cancellation at small B

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        """f(y, t) = −½ β(t) y."""
        return -0.5 * bcast(self.beta(t), y) * y

    def linear_drift(self, t: Tensor) -> Tensor:
        """κ(t) = −½ β(t)."""
        return -0.5 * self.beta(t)

    def prior_std(self) -> float:
        return 1.0

    def m(self, t: Tensor) -> Tensor:
        """m(t) = exp(−½ B(t))."""
        return torch.exp(-0.5 * self.B(t))

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y: Tensor) -> Tensor:
        return gaussian_log_prob(y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class VPSDE(_LinearBeta):
    """Variance-preserving SDE: g = √β, σ² = 1 − e^{−B}, prior N(0, I) (MATH.md §1)."""

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.B(t)))

    def make_likelihood_time_density(self) -> TimeDensity:
        """Closed form (MATH.md §6)."""
        return VPLikelihoodTimeDensity(self)

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
        """t with λ(t) = log(m²/σ²) = −log(e^B − 1) = λ: B = softplus(−λ) (MATH.md §13)."""
        return self.B_inverse(torch.nn.functional.softplus(-lam))


class SubVPSDE(_LinearBeta):
    """sub-VP SDE (Song et al. 2021): g² = β (1 − e^{−2B}), σ = 1 − e^{−B} (MATH.md §1)."""

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.B(t)))

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.B(t))

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
        """t with λ(t) = log(u/(1 − u)²) = λ, u = e^{−B}: the root in (0, 1) of e^λ u² − (2e^λ + 1) u + e^λ,
        u = 2e^λ / (2e^λ + 1 + √(4e^λ + 1)) (MATH.md §13)."""
        e = torch.exp(lam)
        u = 2 * e / (2 * e + 1 + torch.sqrt(4 * e + 1))
        return self.B_inverse(-torch.log(u))


class VESDE(SDE):
    """Variance-exploding SDE: f = 0, σ(t) = σ_min (σ_max/σ_min)^t, g² = dσ²/dt (MATH.md §1).

    As in Song et al., Y_t | x is taken as N(x, σ(t)² I), i.e. the data carry σ_min noise at t = 0.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0, t_eps: float = 1e-3):
        require(sigma_min > 0, "sigma_min", f"must be positive, got {sigma_min}")
        require(sigma_max > sigma_min, "sigma_max", f"must be > sigma_min={sigma_min}, got {sigma_max}")
        _check_time(T, t_eps)
        self.sigma_min, self.sigma_max, self.T, self.t_eps = sigma_min, sigma_max, T, t_eps
        self.log_ratio = math.log(sigma_max / sigma_min)

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(y)

    def linear_drift(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def prior_std(self) -> float:
        return self.sigma_max

    def g(self, t: Tensor) -> Tensor:
        """g = σ(t) √(2 log(σ_max/σ_min) / T)."""
        return self.sigma(t) * math.sqrt(2 * self.log_ratio / self.T)

    def m(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(self.log_ratio * t / self.T)

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> Tensor:
        return self.sigma_max * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y: Tensor) -> Tensor:
        return gaussian_log_prob(y, self.sigma_max)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"


class VPLikelihoodTimeDensity(TimeDensity):
    """q(t) = r(max(t, t_ε)) / Z for VP, r = β/σ², in closed form (MATH.md §6).

    F(t) = log(e^{B(t)} − 1) has F′ = r, so the CDF and its inverse need no table.
    Computed in float64 with the SDE's own β_min, β_max, T and t_ε.
    """

    def __init__(self, sde: VPSDE):
        self.sde = sde
        eps = torch.tensor(sde.t_eps, dtype=torch.float64)
        self.r_eps = float(sde.likelihood_weight(eps))
        self.F_eps = float(self.F(eps))
        self.head = sde.t_eps * self.r_eps  # mass of the flat part on [0, t_ε]
        self.Z = self.head + float(self.F(torch.tensor(sde.T, dtype=torch.float64))) - self.F_eps

    def F(self, t: Tensor) -> Tensor:
        """F(t) = log(e^{B(t)} − 1), stable for small and large B."""
        B = self.sde.B(t)
        return B + torch.log(-torch.expm1(-B))

    def pdf(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        return (self.sde.likelihood_weight(t64.clamp(min=self.sde.t_eps)) / self.Z).to(t.dtype)

    def cdf(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64).clamp(0, self.sde.T)
        flat = t64 * self.r_eps
        tail = self.head + self.F(t64.clamp(min=self.sde.t_eps)) - self.F_eps
        return (torch.where(t64 <= self.sde.t_eps, flat, tail) / self.Z).to(t.dtype)

    def icdf(self, u: Tensor) -> Tensor:
        u64 = u.to(torch.float64)
        flat = self.Z * u64 / self.r_eps
        B_star = torch.nn.functional.softplus(self.Z * u64 - self.head + self.F_eps)
        t_tail = self._t_of_B(B_star)
        return torch.where(u64 * self.Z <= self.head, flat, t_tail).clamp(0, self.sde.T).to(u.dtype)

    def _t_of_B(self, B: Tensor) -> Tensor:
        """Solve β_min t + ½ (β_max − β_min) t² = B; written so β_max = β_min needs no special case."""
        b0, db = self.sde.beta_min, self.sde.beta_max - self.sde.beta_min
        return 2 * B / (b0 + torch.sqrt(b0**2 + 2 * db * B))


class MonotoneNetwork(nn.Module):
    """VDM's monotone network (Kingma et al. 2021, App. H): h(τ) = l₁(τ) + l₃(sigmoid(l₂(l₁(τ)))), every
    weight positive (softplus of a free one), so h increases in τ; ``derivative`` is dh/dτ in closed form.
    l₃ has no bias: the schedule normalises h between its ends, which would cancel it."""

    def __init__(self, hidden: int = 1024):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.randn(hidden))
        self.b2 = nn.Parameter(torch.randn(hidden))
        self.w3 = nn.Parameter(torch.randn(hidden) - 3.0)

    def _parts(self, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        w1, w2, w3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3) / len(self.w3)
        l1 = w1 * tau + self.b1
        s = torch.sigmoid(l1[:, None] * w2 + self.b2)
        return l1, s, w1, w2, w3

    def forward(self, tau: Tensor) -> Tensor:
        l1, s, _, _, w3 = self._parts(tau)
        return l1 + s @ w3

    def rise(self, tau: Tensor) -> Tensor:
        """h(τ) − h(0) without cancellation at small τ: w₁ τ + Σⱼ w₃ⱼ (sⱼ(τ) − sⱼ(0)), each difference of sigmoids
        written σ(a) − σ(b) = −expm1(−(a − b)) σ(a) σ(−b) with a − b = w₁ τ w₂ exactly."""
        _, s, w1, w2, w3 = self._parts(tau)
        d = (w1 * tau)[:, None] * w2
        below = torch.sigmoid(-(self.b1 * w2 + self.b2))
        return w1 * tau + (-torch.expm1(-d) * s * below) @ w3

    def derivative(self, tau: Tensor) -> Tensor:
        """dh/dτ = w₁ (1 + Σⱼ w₃ⱼ w₂ⱼ sⱼ (1 − sⱼ)) > 0."""
        _, s, w1, w2, w3 = self._parts(tau)
        return w1 * (1 + (s * (1 - s)) @ (w2 * w3))


class _VarianceGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient of example i by 2 L_i (``box``, filled by
    ``observe_loss`` before backward), turning ∇ mean L into ∇ mean L² (VDM §5.1, eq. 21). Which example a
    time belongs to is what the ELBO declared (:func:`sdeflow.interfaces.draws_of`): one time per example
    (the default), an index per time, or a value shared alike by every example's loss (its gradient is then
    scaled by 2 mean L, which is exact when each L_i depends on it with the same coefficient)."""

    @staticmethod
    def forward(ctx, x: Tensor, box: dict, examples) -> Tensor:
        ctx.box, ctx.examples = box, examples
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        loss = ctx.box.get("loss")
        if loss is None:
            return grad, None, None
        loss = loss.to(grad.dtype)
        if isinstance(ctx.examples, str):
            return grad * 2 * loss.mean(), None, None
        per_time = loss if ctx.examples is None else loss[ctx.examples.to(loss.device)]
        if per_time.shape != grad.shape:
            return grad, None, None
        return grad * 2 * per_time, None, None


class LearnedVPSDE(nn.Module, SDE):
    """VP with a learned schedule (VDM): γ(t) = γ₀ + (γ₁ − γ₀) (h(τ) − h(0)) / (h(1) − h(0)), τ = t/T, h
    monotone, so the log-SNR −γ falls from −γ₀ to −γ₁. From Y₀ = x (MATH.md §12):
    B(t) = softplus(γ(t)) − softplus(γ₀), m = e^{−B/2}, σ² = 1 − e^{−B}, g² = β = sigmoid(γ) γ′;
    for γ₀ ≪ 0 that is α² = sigmoid(−γ), σ² = sigmoid(γ) and r = g²/σ² ≈ γ′.

    The endpoints are fixed unless ``learn_endpoints`` (then trained by the bound). The interior shape
    h is trained to minimise the variance of the per-example loss (``variance_interior``, VDM §5.1), or
    by the bound like everything else. The network is conditioned on φ, the normalised γ
    (``network_time``), as VDM's is on γ.
    """

    def __init__(self, gamma_min: float = -10.0, gamma_max: float = 10.0, learn_endpoints: bool = False,
                 hidden: int = 1024, variance_interior: bool = True, T: float = 1.0, t_eps: float = 1e-3):
        require(gamma_max > gamma_min, "gamma_max", f"must be > gamma_min={gamma_min}, got {gamma_max}")
        require(hidden >= 1, "hidden", f"must be at least 1, got {hidden}")
        _check_time(T, t_eps)
        super().__init__()
        self.T, self.t_eps, self.variance_interior = T, t_eps, variance_interior
        ends = torch.tensor([float(gamma_min), float(gamma_max)])
        if learn_endpoints:
            self.ends = nn.Parameter(ends)
        else:
            self.register_buffer("ends", ends)
        self.h = MonotoneNetwork(hidden)
        self.box: dict = {}

    def _shape(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        """(φ(τ), φ′(τ)) with φ = (h − h(0)) / (h(1) − h(0)) ∈ [0, 1], through the variance gradient."""
        span = self.h.rise(torch.ones(1, device=tau.device, dtype=tau.dtype))[0]
        phi, dphi = self.h.rise(tau) / span, self.h.derivative(tau) / span
        if self.variance_interior and torch.is_grad_enabled():
            examples = draw_examples()
            phi = _VarianceGradient.apply(phi, self.box, examples)
            dphi = _VarianceGradient.apply(dphi, self.box, examples)
        return phi, dphi

    def rise_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(γ(t) − γ₀, γ′(t)), computed in the parameters' dtype and device; the first without cancellation."""
        ref = self.h.w2
        tau = (t / self.T).to(device=ref.device, dtype=ref.dtype)
        phi, dphi = self._shape(tau)
        g0, g1 = self.ends[0], self.ends[1]
        return (g1 - g0) * phi, (g1 - g0) * dphi / self.T

    def gamma_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(γ(t), γ′(t)), computed in the parameters' dtype and device."""
        rise, slope = self.rise_and_slope(t)
        return self.ends[0] + rise, slope

    def gamma(self, t: Tensor) -> Tensor:
        return self.gamma_and_slope(t)[0].to(device=t.device, dtype=t.dtype)

    def network_time(self, t: Tensor) -> Tensor:
        """τ = (γ(t) − γ₀)/(γ₁ − γ₀) = φ(t/T): the network sees the noise level, not the clock (VDM), so
        the interior shape changes only where the noise levels are visited, not what the model is."""
        tau = (t / self.T).to(device=self.h.w2.device, dtype=self.h.w2.dtype)
        return self._shape(tau)[0].to(device=t.device, dtype=t.dtype)

    def B(self, t: Tensor) -> Tensor:
        """B(t) = ∫₀ᵗ β = softplus(γ(t)) − softplus(γ₀) = log1p(sigmoid(γ₀) expm1(γ(t) − γ₀)): no cancellation as
        t → 0, so σ² = −expm1(−B) keeps its relative precision down to t = 0 in float32 (MATH.md §12)."""
        rise, _ = self.rise_and_slope(t)
        g0 = self.ends[0]
        small = torch.log1p(torch.sigmoid(g0) * torch.expm1(rise.clamp(max=30.0)))
        large = F.softplus(g0 + rise) - F.softplus(g0)
        return torch.where(rise < 30.0, small, large).to(device=t.device, dtype=t.dtype)

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = sigmoid(γ(t)) γ′(t)."""
        gamma, slope = self.gamma_and_slope(t)
        return (torch.sigmoid(gamma) * slope).to(device=t.device, dtype=t.dtype)

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        return -0.5 * bcast(self.beta(t), y) * y

    def linear_drift(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def m(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.B(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.B(t)))

    def prior_std(self) -> float:
        return 1.0

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y: Tensor) -> Tensor:
        return gaussian_log_prob(y)

    def observe_loss(self, loss: Tensor | None) -> None:
        """The per-example loss of this step before backward (None after it): the variance gradient's 2 L."""
        if loss is None:
            self.box.pop("loss", None)
        else:
            self.box["loss"] = loss.detach()

    def __repr__(self) -> str:
        g0, g1 = self.ends.tolist()
        return f"LearnedVPSDE(gamma_min={g0:.3g}, gamma_max={g1:.3g}, T={self.T})"


@hookimpl
def sdeflow_register_sdes(register):
    register("vp", VPSDE)
    register("subvp", SubVPSDE)
    register("ve", VESDE)
    register("learned_vp", LearnedVPSDE)
