"""Built-in networks: DDPM's U-net for images (``unet``) and a residual MLP for vectors (``mlp``).

Networks map (y, τ) with τ = t/T ∈ [0, 1] to a tensor shaped like y and know nothing about SDEs;
the kernel passes ``data_shape`` and the experiment's keyword arguments to the constructor.
"""

from __future__ import annotations

from sdeflow.plugin import hookimpl

from .mlp import MLP
from .unet import PRESETS, UNet


@hookimpl
def sdeflow_register_networks(register) -> None:
    register("unet", UNet)
    register("mlp", MLP)


__all__ = ["MLP", "PRESETS", "UNet", "sdeflow_register_networks"]
