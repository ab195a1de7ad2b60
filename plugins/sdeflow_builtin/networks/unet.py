"""The modified U-net of Ho et al. (2020, DDPM) used by Huang et al. (2021) for images.

Residual blocks (GroupNorm, SiLU, 3×3 convs, a per-block projection of the time embedding), single-head
self-attention at chosen resolutions and in the middle, strided-conv downsampling, nearest-neighbour
upsampling back to the skip connection's size (so odd sizes such as 28 → 14 → 7 → 14 → 28 work). As in
DDPM, every residual branch's last convolution and the attention's output projection start at zero, so
each block starts as the identity, and so does the output convolution: the network outputs exactly 0
at initialisation.

Speed notes (measured on a 2-core CPU, see benchmarks/train_step.py): SiLU of the time embedding is
computed once per forward, not per block; the 1×1 shortcuts run as one batched matmul in NCHW; the
time-embedding and residual additions happen in place; attention uses one fused q/k/v projection on
(B, HW, C) tokens, a free view in channels_last memory; a ×2 upsampling and the 3×3 conv after it run
as one transposed conv (4/9 of the arithmetic); in channels_last on the CPU, GroupNorm and SiLU run as
one fused kernel (``group_norm_silu``), which makes channels_last the fastest layout there. Works in
NCHW and channels_last, under autocast and ``torch.compile`` (dynamic batch sizes included), and is
twice differentiable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdeflow.plugin import require

from .embedding import FourierFeatures, TimeEmbedding
from .group_norm_silu import group_norm_silu, is_channels_last

PRESETS: dict[str, dict[str, object]] = {
    # sdeflow-light's train_img.py configurations (1,539,329 and 35,746,307 parameters).
    "mnist": {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,)},
    "cifar10": {"ch": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,)},
}

_NORM_EPS = 1e-6  # DDPM's GroupNorm epsilon


def variance_scaling_(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """DDPM's initialisation: weights U(±√(3·scale/fan_avg)), zero biases; scale 0 gives exact zeros."""
    weight = module.weight
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    fan_avg = 0.5 * (weight.shape[0] + weight.shape[1]) * receptive
    bound = math.sqrt(3.0 * scale / max(1.0, fan_avg))
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if module.bias is not None:
            module.bias.zero_()
    return module


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, scale: float = 1.0) -> nn.Conv2d:
    return variance_scaling_(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), scale)


def linear(in_features: int, out_features: int, scale: float = 1.0) -> nn.Linear:
    return variance_scaling_(nn.Linear(in_features, out_features), scale)


def fused_linear(in_features: int, out_features: int, parts: int) -> nn.Linear:
    """``parts`` Linear(in, out) layers stacked into one Linear(in, parts·out), each part initialised as
    the separate layer would be (its own fan, not the stacked one's)."""
    fused = nn.Linear(in_features, parts * out_features)
    for i, rows in enumerate(fused.weight.split(out_features)):
        part = variance_scaling_(nn.Linear(in_features, out_features))
        with torch.no_grad():
            rows.copy_(part.weight)
            fused.bias[i * out_features:(i + 1) * out_features].zero_()
    return fused


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_NORM_EPS)


class PointwiseConv(nn.Conv2d):
    """A 1×1 convolution (the "nin" shortcut). On NCHW-contiguous input it runs as one batched matmul,
    W @ x[b] over (C, H·W): on CPU, forward + backward measured 1.2–3× faster than oneDNN's NCHW 1×1
    convolution. In channels_last the convolution already is a plain GEMM and is used as is."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 1)
        variance_scaling_(self)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_contiguous():
            return super().forward(x)
        B, C, H, W = x.shape
        # An expanded (not copied) weight keeps this one bmm; matmul would transpose-copy x instead.
        weight = self.weight.view(1, self.out_channels, C).expand(B, -1, -1)
        out = torch.baddbmm(self.bias[:, None], weight, x.view(B, C, H * W))
        return out.view(B, self.out_channels, H, W)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x))) + W·temb))), with a 1×1 (nin) shortcut when channels change."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.temb_proj = linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch, scale=0.0)  # the branch starts at 0: the block is the identity
        self.shortcut = PointwiseConv(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        # In-place adds on fresh convolution outputs: large CPU allocations are not free.
        h = self.conv1(group_norm_silu(x, self.norm1))
        h += self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(group_norm_silu(h, self.norm2)))
        return h.add_(self.shortcut(x))


class SelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions, residual; q, k, v, out are 1×1 convolutions.

    Written out (bmm, softmax, bmm) rather than with ``F.scaled_dot_product_attention``: its fused
    kernels have no double backward, which training on the ELBO (a Hutchinson divergence with
    ``create_graph=True``) needs; at 49–256 positions attention is a negligible share of the cost.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        # A 1×1 convolution is a Linear on (B, HW, C) tokens; one fused q/k/v matmul instead of three,
        # initialised as the three would be. The output projection starts at 0: the block is the identity.
        self.qkv = fused_linear(channels, channels, 3)
        self.proj_out = linear(channels, channels, scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view in channels_last
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * C**-0.5, dim=-1)
        out = self.proj_out(torch.bmm(weights, v))
        return x + out.reshape(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Halve the size (rounding up for the conv, down for pooling): 28 → 14 → 7 → 4."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


def _merge_taps(weight: Tensor, dim: int) -> Tensor:
    """The 3 taps (w₀, w₁, w₂) of a 3×3 conv along ``dim`` as the 4 taps of a stride-2 transposed conv
    on the half-size input: (w₂, w₁+w₂, w₀+w₁, w₀). An even output pixel 2i reads the ×2-upsampled
    rows 2i−1, 2i, 2i+1 = input rows i−1, i, i (so w₀·x[i−1] + (w₁+w₂)·x[i]); an odd one 2i+1 reads
    i, i, i+1 (so (w₀+w₁)·x[i] + w₂·x[i+1])."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack((w2, w1 + w2, w0 + w1, w0), dim)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a given size (the skip's, not a fixed ×2), then a 3×3 conv.

    For an exact ×2 (every even size) both run as one stride-2 transposed convolution with a 4×4
    kernel built from the same 3×3 weights (``_merge_taps``): the same function with 4/9 of the
    multiply-adds and no upsampled intermediate. Other sizes (7 → 4 → 7) interpolate, then convolve.
    """

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else None

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        if self.conv is None:
            return F.interpolate(x, size=size, mode="nearest")
        if tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, size=size, mode="nearest"))
        # conv_transpose2d wants (in, out, kH, kW); keep the input's memory format for oneDNN.
        kernel = _merge_taps(_merge_taps(self.conv.weight, 2), 3).transpose(0, 1)
        layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return F.conv_transpose2d(x, kernel.contiguous(memory_format=layout), self.conv.bias, stride=2,
                                  padding=1)


class Level(nn.Module):
    """One resolution of one path: residual blocks, each followed by attention or nothing."""

    def __init__(self, blocks: list[ResBlock], attention: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList(attention)


def _resolve_preset(preset: str | None, given: dict[str, object], defaults: dict[str, object]) -> dict:
    """A preset's values for the architecture arguments, except those set to a non-default value."""
    if preset is None:
        return given
    require(preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)} or null, got {preset!r}")
    return {k: (PRESETS[preset][k] if given[k] == defaults[k] else given[k]) for k in given}


def _spatial_sizes(height: int, levels: int, with_conv: bool) -> list[int]:
    sizes = [height]
    for _ in range(levels - 1):
        sizes.append((sizes[-1] + 1) // 2 if with_conv else sizes[-1] // 2)
    return sizes


class UNet(nn.Module):
    """DDPM's U-net (Ho et al. 2020) for images of shape (C, H, W); outputs 0 at initialisation.

    ``preset`` ("mnist" or "cifar10") fills ``ch``, ``ch_mult``, ``num_res_blocks`` and
    ``attn_resolutions`` with sdeflow-light's configurations; any of those you also set to a value
    other than its default wins. Attention is added after every residual block whose feature map has
    a height in ``attn_resolutions``, and always in the middle. Time enters as a sinusoidal embedding
    of ``time_scale · τ`` followed by an MLP to 4·ch features. ``fourier_features: [min_exp, max_exp]``
    adds VDM's Fourier features of the input (``FourierFeatures``) before the first convolution.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_groups: int = 32,
        time_scale: float = 999.0,
        preset: Literal["mnist", "cifar10"] | None = None,
        fourier_features: tuple[int, int] | None = None,
    ):
        super().__init__()
        arch = _resolve_preset(
            preset,
            dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions),
            dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)),
        )
        ch, ch_mult = arch["ch"], tuple(arch["ch_mult"])
        num_res_blocks, attn_resolutions = arch["num_res_blocks"], tuple(arch["attn_resolutions"])
        in_channels = data_shape[0] if in_channels is None else in_channels
        out_channels = in_channels if out_channels is None else out_channels
        _validate(data_shape, ch, ch_mult, num_res_blocks, dropout, in_channels, out_channels, num_groups,
                  time_scale)
        self.data_shape = tuple(data_shape)
        self.ch_mult = ch_mult
        self.num_res_blocks = num_res_blocks
        self.time_embedding = TimeEmbedding(ch, 4 * ch, 4 * ch, time_scale)
        for layer in (self.time_embedding.fc1, self.time_embedding.fc2):
            variance_scaling_(layer)
        self.features = FourierFeatures(fourier_features) if fourier_features is not None else nn.Identity()
        self.conv_in = conv3x3(self.features.channels(in_channels) if fourier_features else in_channels, ch)
        sizes = _spatial_sizes(data_shape[1], len(ch_mult), resamp_with_conv)
        skip_channels = self._build_down(ch, sizes, attn_resolutions, dropout, num_groups, resamp_with_conv)
        mid = ch * ch_mult[-1]
        self.mid_block1 = ResBlock(mid, mid, 4 * ch, dropout, num_groups)
        self.mid_attention = SelfAttention(mid, num_groups)
        self.mid_block2 = ResBlock(mid, mid, 4 * ch, dropout, num_groups)
        self._build_up(ch, sizes, attn_resolutions, dropout, num_groups, resamp_with_conv, skip_channels)
        self.norm_out = group_norm(ch, num_groups)
        # Zero output layer: the drift (or score, or noise) is exactly 0 before training.
        self.conv_out = conv3x3(ch, out_channels, scale=0.0)

    def _build_down(self, ch, sizes, attn_resolutions, dropout, groups, with_conv) -> list[int]:
        temb_ch, channels, skips = 4 * ch, ch, [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, mult in enumerate(self.ch_mult):
            blocks, attention = [], []
            for _ in range(self.num_res_blocks):
                blocks.append(ResBlock(channels, ch * mult, temb_ch, dropout, groups))
                channels = ch * mult
                attention.append(_attention_or_identity(channels, groups, sizes[level] in attn_resolutions))
                skips.append(channels)
            self.down.append(Level(blocks, attention))
            if level < len(self.ch_mult) - 1:
                self.downsample.append(Downsample(channels, with_conv))
                skips.append(channels)
        return skips

    def _build_up(self, ch, sizes, attn_resolutions, dropout, groups, with_conv, skips) -> None:
        temb_ch, channels = 4 * ch, ch * self.ch_mult[-1]
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(self.ch_mult))):
            blocks, attention = [], []
            for _ in range(self.num_res_blocks + 1):
                out_ch = ch * self.ch_mult[level]
                blocks.append(ResBlock(channels + skips.pop(), out_ch, temb_ch, dropout, groups))
                channels = out_ch
                attention.append(_attention_or_identity(channels, groups, sizes[level] in attn_resolutions))
            self.up.append(Level(blocks, attention))
            if level > 0:
                self.upsample.append(Upsample(channels, with_conv))

    def forward(self, y: Tensor, tau: Tensor) -> Tensor:
        # SiLU(temb) is what every block projects; compute it once.
        temb_act = F.silu(self.time_embedding(tau, y.shape[0]))
        h = self.conv_in(self.features(y))
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attention in zip(level.blocks, level.attention, strict=True):
                h = attention(block(h, temb_act))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, temb_act)), temb_act)
        for i, level in enumerate(self.up):
            for block, attention in zip(level.blocks, level.attention, strict=True):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), temb_act))
            if i < len(self.upsample):
                h = self.upsample[i](h, skips[-1].shape[-2:])
        return self.conv_out(group_norm_silu(h, self.norm_out))


def _attention_or_identity(channels: int, groups: int, wanted: bool) -> nn.Module:
    return SelfAttention(channels, groups) if wanted else nn.Identity()


def _validate(data_shape, ch, ch_mult, num_res_blocks, dropout, in_channels, out_channels, num_groups,
              time_scale) -> None:
    require(len(data_shape) == 3, "data_shape", f"must be (channels, height, width), got {data_shape}")
    require(num_groups >= 1, "num_groups", f"must be positive, got {num_groups}")
    require(ch >= 1 and ch % num_groups == 0, "ch",
            f"must be a positive multiple of num_groups={num_groups} (GroupNorm), got {ch}")
    require(len(ch_mult) >= 1 and all(m >= 1 for m in ch_mult), "ch_mult",
            f"must be a non-empty tuple of positive integers, got {ch_mult}")
    require(num_res_blocks >= 1, "num_res_blocks", f"must be at least 1, got {num_res_blocks}")
    require(0.0 <= dropout < 1.0, "dropout", f"must be in [0, 1), got {dropout}")
    require(in_channels >= 1, "in_channels", f"must be positive, got {in_channels}")
    require(out_channels >= 1, "out_channels", f"must be positive, got {out_channels}")
    require(time_scale > 0, "time_scale", f"must be positive, got {time_scale}")
