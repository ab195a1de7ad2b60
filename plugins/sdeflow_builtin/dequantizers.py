"""Built-in dequantizers (MATH.md §14): where inside its bin each value of discrete data lies, u ∈ [0, 1]^D,
and the log-density log q(u | x) that every bpd counts.

- ``uniform``: u ~ U[0, 1)^D, log q = 0 — the classic choice, and the default;
- ``truncated_normal``: u ~ N(½, (1/2τ)²) truncated to the bin (i-DODE), no parameters;
- ``variational``: a conditional flow q(u | x) trained with the model by the bound (Flow++, ScoreFlow).

The kernel places u in the bin (x̃ = (x (L−1) + u)/L) and adds log q to the bound, so each of these is a
valid upper bound on −log₂ P(x); they differ in how tight it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdeflow.plugin import Dequantizer, flat_sum, hookimpl, require, truncated_normal_draw, truncated_normal_log_q


def inside_unit_bin(u: Tensor) -> Tensor:
    """Per example: every coordinate of u in [0, 1]."""
    return ((u >= 0) & (u <= 1)).flatten(1).all(dim=1)


class Uniform(Dequantizer):
    """u ~ U[0, 1)^D: q(u | x) = 1 on the bin, log q = 0."""

    def __init__(self, data_shape: tuple[int, ...] | None = None):
        """No settings; the data's shape is not needed."""

    def sample(self, x: Tensor, levels: int, *, generator=None) -> tuple[Tensor, Tensor]:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return u, x.new_zeros(x.shape[0])

    def log_prob(self, u: Tensor, x: Tensor, levels: int) -> Tensor:
        return torch.where(inside_unit_bin(u), 0.0, -math.inf).to(u.dtype)

    def protocol(self) -> str:
        return "uniform: u ~ U[0,1)^D, log q = 0, one draw per example"


class TruncatedNormal(Dequantizer):
    """u = ½ + w/(2τ), w ~ N(0, 1) truncated to [−τ, τ] (i-DODE, Zheng et al. 2023): τ is the bin's
    half-width in standard deviations. log q(u | x) = Σ_d [log φ(w_d) + log 2τ − log Z], Z = Φ(τ) − Φ(−τ).

    i-DODE sets τ from the forward process at t_ε (the bin's half-width in model space over σ(t_ε)/m(t_ε)),
    so dequantized data look like the noisy data the model was trained on near t_ε; train with the
    same dequantizer for that to hold. Draws by inverting the CDF in float64.
    """

    def __init__(self, data_shape: tuple[int, ...] | None = None, tau: float = 3.0):
        require(tau > 0, "tau", f"must be positive (the bin's half-width in standard deviations), got {tau}")
        self.tau = float(tau)

    def _log_q(self, w: Tensor) -> Tensor:
        return truncated_normal_log_q(w, self.tau)

    def sample(self, x: Tensor, levels: int, *, generator=None) -> tuple[Tensor, Tensor]:
        w = truncated_normal_draw(x.shape, self.tau, generator=generator, device=x.device)
        return (0.5 + w / (2 * self.tau)).to(x.dtype), self._log_q(w).to(x.dtype)

    def log_prob(self, u: Tensor, x: Tensor, levels: int) -> Tensor:
        log_q = self._log_q((u.double() - 0.5) * 2 * self.tau)
        return torch.where(inside_unit_bin(u), log_q, -math.inf).to(u.dtype)

    def protocol(self) -> str:
        tau = f"{self.tau:g}"
        return f"truncated normal: u = 1/2 + w/(2*{tau}), w ~ N(0,1) on [-{tau}, {tau}], exact log q"


def _as_planes(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of an image shape; a vector of D values is D channels of one pixel."""
    if len(shape) == 3:
        return shape
    return (math.prod(shape), 1, 1)


class Coupling(nn.Module):
    """ε → m ε + (1 − m)(ε e^s + t), (s, t) a small conv net of (m ε, h(x)); s = tanh(·) keeps scales in
    [1/e, e]. Its last layer starts at zero, so the coupling starts as the identity."""

    def __init__(self, channels: int, hidden: int, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(nn.Conv2d(channels + hidden, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, 2 * channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def scale_shift(self, eps: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(torch.cat([eps * self.mask, h], dim=1)).chunk(2, dim=1)
        free = 1 - self.mask
        return torch.tanh(s) * free, t * free

    def forward(self, eps: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.scale_shift(eps, h)
        return eps * torch.exp(s) + t, flat_sum(s)

    def inverse(self, eps: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.scale_shift(eps, h)  # the masked half is unchanged, so (s, t) are those of the forward pass
        return (eps - t) * torch.exp(-s), flat_sum(s)


def logistic_log_prob(eps: Tensor) -> Tensor:
    """log of the standard logistic density, log σ(ε) + log σ(−ε), per example."""
    return flat_sum(F.logsigmoid(eps) + F.logsigmoid(-eps))


class Variational(nn.Module, Dequantizer):
    """A conditional flow (Flow++ / ScoreFlow's variational dequantization): ε₀ = logit(r), r ~ U(0, 1)^D
    (standard logistic), ``couplings`` affine couplings on alternating checkerboards conditioned on
    features h(x), then u = σ(ε_K). log q(u | x) = log p(ε₀) − Σ_k Σ s_k − Σ log σ′(ε_K).

    Its couplings start as the identity, so it starts as ``uniform``; trained with the model by the
    bound (a loss that trains the dequantizer: ``elbo``), it learns where inside their bins the data's
    density puts its mass. Runs in its parameters' dtype whatever the autocast.
    """

    def __init__(self, data_shape: tuple[int, ...], hidden: int = 32, couplings: int = 4):
        super().__init__()
        require(hidden >= 1, "hidden", f"must be at least 1, got {hidden}")
        require(couplings >= 1, "couplings", f"must be at least 1, got {couplings}")
        C, H, W = self.planes = _as_planes(tuple(data_shape))
        self.features = nn.Sequential(nn.Conv2d(C, hidden, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())
        c, i, j = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
        parity = ((c + i + j) % 2).float()
        self.couplings = nn.ModuleList(Coupling(C, hidden, parity if k % 2 == 0 else 1 - parity)
                                       for k in range(couplings))

    def _features(self, x: Tensor) -> Tensor:
        return self.features(2 * x.reshape(-1, *self.planes) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].weight.dtype

    def sample(self, x: Tensor, levels: int, *, generator=None) -> tuple[Tensor, Tensor]:
        r = torch.rand((x.shape[0], *self.planes), generator=generator, device=x.device, dtype=self.dtype)
        return self.flow(r, x)

    def flow(self, r: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(u, log q(u | x)) for the uniform draws r ∈ (0, 1), shaped (B, C, H, W) of :attr:`planes`."""
        with torch.autocast(x.device.type, enabled=False):
            eps = torch.logit(r.to(self.dtype), eps=1e-6)
            log_q = logistic_log_prob(eps)
            h = self._features(x.to(self.dtype))
            for coupling in self.couplings:
                eps, log_scale = coupling(eps, h)
                log_q = log_q - log_scale
            log_q = log_q - logistic_log_prob(eps)
        return torch.sigmoid(eps).reshape(x.shape).to(x.dtype), log_q.to(x.dtype)

    def log_prob(self, u: Tensor, x: Tensor, levels: int) -> Tensor:
        eps = torch.logit(u.to(self.dtype).reshape(-1, *self.planes))
        return (self.log_prob_logit(eps, x) - logistic_log_prob(eps)).to(u.dtype)

    def log_prob_logit(self, eps: Tensor, x: Tensor) -> Tensor:
        """log density of ε_K = logit(u) per example: log p(ε₀) − Σ_k Σ s_k, inverting the couplings."""
        with torch.autocast(x.device.type, enabled=False):
            eps = eps.to(self.dtype).reshape(-1, *self.planes)
            h = self._features(x.to(self.dtype))
            log_scales = torch.zeros(eps.shape[0], dtype=self.dtype, device=eps.device)
            for coupling in reversed(self.couplings):
                eps, log_scale = coupling.inverse(eps, h)
                log_scales = log_scales + log_scale
            return logistic_log_prob(eps) - log_scales

    def protocol(self) -> str:
        return (f"variational: conditional flow ({len(self.couplings)} affine couplings on logistic noise), "
                "trained with the model, exact log q")


@hookimpl
def sdeflow_register_dequantizers(register) -> None:
    register("uniform", Uniform)
    register("truncated_normal", TruncatedNormal)
    register("variational", Variational)
