"""Exact oracles for the math tests: Gaussian and Gaussian-mixture data diffused by an SDE.

Also small helpers several test files share: an untrained time-conditioned MLP (a network whose
output is not zero, so a ≠ 0), a time sampler pinned to one t, and ``one_thread``.

For data x ~ Σ_k w_k N(μ_k, Σ_k) and Y_t | x ~ N(m x, σ² I), the marginal is
q_t = Σ_k w_k N(m μ_k, m² Σ_k + σ² I) (MATH.md §5). Covariances are handled through their
eigendecompositions Σ_k = U_k diag(λ_k) U_kᵀ, so m² Σ_k + σ² I = U_k diag(m² λ_k + σ²) U_kᵀ for
every t at once. Everything is float64.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from sdeflow.core.interfaces import SDE, TimeSampler

LOG_2PI = math.log(2 * math.pi)


class GaussianMixtureOracle:
    """Data Σ_k w_k N(μ_k, Σ_k): samples, exact log-density, and the exact diffused score by autograd."""

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)
        self.dim = self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scaled = self.eigvecs[k] @ (self.eigvals[k].sqrt() * z).unsqueeze(-1)
        return self.means[k] + scaled.squeeze(-1)

    def log_marginal(self, y: Tensor, m: Tensor, sigma: Tensor) -> Tensor:
        """log q(y) for q = Σ_k w_k N(m μ_k, m² Σ_k + σ² I); m, σ of shape (B,) or scalars."""
        m = torch.as_tensor(m, dtype=y.dtype).reshape(-1, 1, 1)
        var = m**2 * self.eigvals + torch.as_tensor(sigma, dtype=y.dtype).reshape(-1, 1, 1) ** 2
        diff = y.unsqueeze(1) - m * self.means  # (B, K, D)
        rotated = torch.einsum("kdj,bkd->bkj", self.eigvecs, diff)
        log_n = -0.5 * (rotated**2 / var).sum(-1) - 0.5 * var.log().sum(-1) - 0.5 * self.dim * LOG_2PI
        return torch.logsumexp(self.weights.log() + log_n, dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact data log-density log p(x)."""
        return self.log_marginal(x, torch.ones(()), torch.zeros(()))

    def score(self, sde: SDE):
        """s*(y, t) = ∇_y log q_t(y), by autograd; differentiable in y when y requires grad."""

        def score_fn(y: Tensor, t: Tensor) -> Tensor:
            t64 = t.to(torch.float64)
            with torch.enable_grad():
                leaf = y if y.requires_grad else y.detach().requires_grad_(True)
                log_q = self.log_marginal(leaf, sde.m(t64), sde.sigma(t64)).sum()
                (grad,) = torch.autograd.grad(log_q, leaf, create_graph=y.requires_grad)
            return grad

        return score_fn

    def prior_kl_bound(self, sde: SDE, prior_std: float = 1.0) -> float:
        """Σ_k w_k KL(N_k,T ‖ N(0, s² I)) ≥ KL(q_T ‖ p_T) (KL is jointly convex)."""
        T = torch.tensor([sde.T], dtype=torch.float64)
        m, sigma = float(sde.m(T)), float(sde.sigma(T))
        kls = [
            gaussian_kl_to_isotropic(m * mu, m**2 * lam + sigma**2, prior_std)
            for mu, lam in zip(self.means, self.eigvals, strict=True)
        ]
        return float(sum(w * kl for w, kl in zip(self.weights, kls, strict=True)))


class GaussianOracle(GaussianMixtureOracle):
    """Data N(μ₀, Σ₀), with the marginal score in closed form: s*(y, t) = −(m² Σ₀ + σ² I)⁻¹ (y − m μ₀)."""

    def __init__(self, mean, cov):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        super().__init__([1.0], mean[None], torch.as_tensor(cov, dtype=torch.float64)[None])
        self.mean, self.lam, self.U = self.means[0], self.eigvals[0], self.eigvecs[0]

    def marginal_eigvals(self, sde: SDE, t: Tensor) -> Tensor:
        """Eigenvalues m² λ + σ² of the marginal covariance, shape (B, D)."""
        t64 = t.to(torch.float64)
        return sde.m(t64)[:, None] ** 2 * self.lam + sde.sigma(t64)[:, None] ** 2

    def score(self, sde: SDE):
        def score_fn(y: Tensor, t: Tensor) -> Tensor:
            t64 = t.to(torch.float64)
            diff = y - sde.m(t64)[:, None] * self.mean
            return -((diff @ self.U) / self.marginal_eigvals(sde, t64)) @ self.U.T

        return score_fn

    def dsm_minimum(self, sde: SDE, t: Tensor) -> Tensor:
        """E ℓ(x, t) for the exact score: ½ [D − σ² tr((m² Σ₀ + σ² I)⁻¹)].

        With z = y − m μ₀ = m(x − μ₀) + σε: Cov z = C, Cov(z, ε) = σ I and s* = −C⁻¹ z, so
        E‖σ s* + ε‖² = σ² tr(C⁻¹ C C⁻¹) − 2σ² tr(C⁻¹) + D = D − σ² tr(C⁻¹).
        """
        sigma2 = sde.sigma(t.to(torch.float64)) ** 2
        return 0.5 * (self.dim - sigma2 * (1 / self.marginal_eigvals(sde, t)).sum(-1))

    def prior_kl(self, sde: SDE, prior_std: float = 1.0) -> float:
        """KL(q_T ‖ N(0, s² I)) exactly: the expected gap between log p(x) and the exact-score ELBO."""
        return self.prior_kl_bound(sde, prior_std)


def gaussian_kl_to_isotropic(mean: Tensor, eigvals: Tensor, std: float) -> float:
    """KL(N(mean, C) ‖ N(0, s² I)) for C with eigenvalues ``eigvals``."""
    s2 = std**2
    D = mean.numel()
    return float(0.5 * ((eigvals / s2).sum() + (mean**2).sum() / s2 - D - (eigvals / s2).log().sum()))


def random_cov(dim: int, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    """A well-conditioned, non-isotropic SPD matrix A Aᵀ / dim + 0.1 I (times ``scale``)."""
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return scale * (a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64))


def gaussian_3d() -> GaussianOracle:
    """The D = 3 test Gaussian: non-zero mean, correlated, eigenvalues spread over a decade."""
    cov = torch.tensor([[1.5, 0.6, -0.3], [0.6, 0.8, 0.2], [-0.3, 0.2, 0.3]], dtype=torch.float64)
    return GaussianOracle([0.5, -1.0, 0.25], cov)


def mixture_2d() -> GaussianMixtureOracle:
    """The 2-D test mixture: three unequal, anisotropic, well-separated components."""
    covs = [
        [[0.30, 0.10], [0.10, 0.20]],
        [[0.10, -0.05], [-0.05, 0.40]],
        [[0.25, 0.00], [0.00, 0.05]],
    ]
    return GaussianMixtureOracle([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.5, 1.0], [0.5, -1.5]], covs)


class RandomTimeMLP(nn.Module):
    """An untrained network n(y, τ) = MLP(concat(y, τ)); its last layer is NOT zeroed, so n ≠ 0."""

    def __init__(self, dim: int, hidden: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():  # a seeded init that leaves the global RNG alone
            torch.manual_seed(seed)
            layers = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.layers = layers.double()

    def forward(self, y: Tensor, tau: Tensor) -> Tensor:
        return self.layers(torch.cat([y, tau.to(y.dtype)[:, None]], dim=1))


class FixedTime(TimeSampler):
    """t ≡ t₀ with q ≡ 1, so a loss returns its per-time value w(t₀) ℓ(x, t₀)."""

    def __init__(self, t0: float):
        self.t0 = t0

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        t = torch.full((n,), self.t0, dtype=torch.float64, device=device)
        return t, self.density(sde, t)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: the Monte-Carlo tests use many small ops, which intra-op threads only
    slow down (several-fold on a shared, busy machine). The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
