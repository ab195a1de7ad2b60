"""How a training step runs on the device: ``train.compile`` (the network under ``torch.compile``,
falling back to eager with one notice when compiling is impossible here, whether that shows when
wrapping or only at the first step, and running eagerly where a loss differentiates it twice) and
``precision: bf16`` (autocast on CUDA)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .seeding import rng_state, set_rng_state

_twice = 0  # > 0 inside differentiated_twice(): compiled networks run their eager module


@contextlib.contextmanager
def differentiated_twice(active: bool = True):
    """Inside: the network's outputs are differentiated twice (a divergence that training backpropagates
    through, MATH.md §5), which a compiled graph cannot be (aot_autograd has no double backward), so a
    network under ``train.compile`` runs eagerly there, on the same parameters."""
    global _twice
    _twice += int(active)
    try:
        yield
    finally:
        _twice -= int(active)


class EagerWhenTwice(nn.Module):
    """``torch.compile(network)`` outside :func:`differentiated_twice`, the network itself inside it; says
    so once, the first time it runs eagerly."""

    def __init__(self, network: nn.Module, notice: Callable[[str], None]):
        super().__init__()
        self.eager, self.notice = network, notice
        self.__dict__["compiled"] = torch.compile(network)  # not a submodule: one copy of the parameters
        self.told = False

    def forward(self, *args, **kwargs):
        if not _twice:
            return self.compiled(*args, **kwargs)
        if not self.told:
            self.told = True
            self.notice("train.compile: the network runs eagerly for draws whose loss is differentiated twice "
                        "(the ELBO's divergence; with loss.form: denoising only the draws below t_eps), "
                        "as compiled graphs have no double backward")
        return self.eager(*args, **kwargs)


class CompiledNetwork:
    """Puts the compiled network (:class:`EagerWhenTwice`) into ``parameterization.network`` (when
    ``enabled``) and owns the fallback: on failure the eager network goes back in and the step is redone
    from the same RNG state, so it draws the same noise the compiled step would have."""

    def __init__(self, parameterization, network: torch.nn.Module, enabled: bool, notice: Callable[[str], None]):
        self.parameterization, self.eager, self.notice = parameterization, network, notice
        self.enabled = enabled
        parameterization.network = network
        if enabled:
            try:
                parameterization.network = EagerWhenTwice(network, notice)
            except Exception as e:  # no compiler backend at all
                self.failed(e)

    def failed(self, error: Exception) -> None:
        self.enabled = False
        self.parameterization.network = self.eager
        self.notice(f"train.compile unavailable here ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                    "running eagerly")

    def first_step(self, step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The first step compiles; if compiling fails (no compiler, unsupported op), it runs eagerly."""
        if not self.enabled:
            return step(x)
        before = rng_state()
        try:
            return step(x)
        except Exception as e:
            self.failed(e)
            set_rng_state(before)
            return step(x)


def autocast_for(precision: str, device: torch.device, notice: Callable[[str], None]) -> Callable:
    """A context factory: bf16 autocast on a CUDA device that supports it, else nothing (with a notice
    when bf16 was asked for)."""
    if precision == "bf16":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        notice("precision bf16 needs a CUDA device with bf16 support; training in fp32")
    return contextlib.nullcontext
