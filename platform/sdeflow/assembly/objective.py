"""What training minimises, as one module: the loss of the composed model on a batch of data, with every
component that has parameters inside it (the network, and an SDE, parameterization, loss, time sampler or
dequantizer that is an ``nn.Module``), so DDP wraps it whole, the optimizer and the EMA see all of it,
and a checkpoint saves all of it.

A component is *trainable* when it has parameters of its own that require gradients. Only a loss that
bounds the likelihood trains components other than the network: a loss says which kinds it trains in
``Loss.trains`` (the default: the network and the parameterization). A component that needs the
per-example loss before the backward pass (the learned VP's variance gradient) defines
``observe_loss(loss)``; the trainer calls it with the loss before backward and with None after.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.transforms import Identity, ModelSpace

TRAINABLE_KINDS = ("sde", "parameterization", "loss", "time_sampler", "dequantizer")


def own_parameters(component: Any, inside: tuple[Any, ...] = ()) -> list[nn.Parameter]:
    """The trainable parameters of ``component`` that are not those of the modules ``inside`` it (a
    parameterization holds the network and the SDE, which are counted on their own)."""
    if not isinstance(component, nn.Module):
        return []
    others = {id(p) for m in inside if isinstance(m, nn.Module) for p in m.parameters()}
    return [p for p in component.parameters() if p.requires_grad and id(p) not in others]


def trainable_parameters(components: dict[str, Any]) -> dict[str, list[nn.Parameter]]:
    """{kind: its own trainable parameters} for each component in ``components`` that has any; a
    parameterization's exclude those of the network and SDE it holds (``components["network"]``, ``["sde"]``)."""
    inside = {"parameterization": tuple(components.get(k) for k in ("network", "sde"))}
    found = {kind: own_parameters(components[kind], inside.get(kind, ())) for kind in TRAINABLE_KINDS
             if kind in components}
    return {kind: params for kind, params in found.items() if params}


def check_trainable(exp, components: dict[str, Any]) -> None:
    """Every component with trainable parameters is one the loss trains (``Loss.trains``), and each
    ``train.component_lr`` key names a trainable component; else a :class:`ConfigError` naming both keys."""
    loss = components["loss"]
    trains = getattr(loss, "trains", frozenset({"parameterization"}))
    trainable = set(trainable_parameters(components))
    for kind in sorted(trainable - set(trains)):
        raise ConfigError(f"{exp.source}: {kind}: {exp.describe(kind)} has trainable parameters, which loss: "
                          f"{exp.describe('loss')} does not train (it is not a bound on the likelihood); use a loss "
                          f"that is, such as "
                          f"{{name: elbo}}, or a {kind} without parameters")
    for kind, rate in exp.train.component_lr.items():
        if kind not in TRAINABLE_KINDS:
            raise ConfigError(f"{exp.source}: train.component_lr.{kind}: not a component kind with parameters of its "
                              f"own; expected one of {', '.join(TRAINABLE_KINDS)}")
        if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0):
            raise ConfigError(f"{exp.source}: train.component_lr.{kind}: must be a positive learning rate, "
                              f"got {rate!r}")


class Objective(nn.Module):
    """``objective(x)`` = the per-example training loss of ``model`` on data x, taken into model space by
    ``space`` (dequantized, then transformed), its times from ``time_sampler``.

    A trainable dequantizer is trained by the bound in data space: the loss −ELBO(z) plus
    log q(u | x) − log|det ∂z/∂x̃| (MATH.md §14); otherwise those terms have no gradient and the loss is
    the model's alone, as it is logged."""

    def __init__(self, model: nn.Module, loss: Any, time_sampler: Any, space: ModelSpace | None = None):
        super().__init__()
        self.model = model
        self.loss = loss  # registered as a submodule when it is one, else a plain attribute
        self.time_sampler = time_sampler
        self.space = space or ModelSpace(Identity())
        self.dequantizer = self.space.dequantizer  # the same object as space's: one copy under deepcopy
        self.bound_in_data_space = bool(own_parameters(self.dequantizer))
        self.memory_format = torch.contiguous_format
        """Of image batches in model space (``train.channels_last``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, log_det, log_q = self.space(x)
        if z.ndim == 4:
            z = z.contiguous(memory_format=self.memory_format)
        loss = self.loss(self.model, z, self.time_sampler)
        return loss + (log_q - log_det) if self.bound_in_data_space else loss

    def components(self) -> dict[str, Any]:
        return {"sde": self.model.sde, "parameterization": self.model.parameterization, "loss": self.loss,
                "time_sampler": self.time_sampler, "dequantizer": self.dequantizer}

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        """{kind: its own trainable parameters} for the components other than the network that have any."""
        return trainable_parameters({**self.components(), "network": self.model.network})

    def observe_loss(self, loss: torch.Tensor | None) -> None:
        """Hand the per-example loss (None: the step is over) to every component that asks for it."""
        for part in dict.fromkeys(self.components().values()):
            if hasattr(part, "observe_loss"):
                part.observe_loss(loss)

    def param_groups(self, lr: float, component_lr: dict[str, float]) -> list[dict[str, Any]]:
        """The optimizer's groups: the network (and all else) at ``lr``, then one group per trainable
        component in TRAINABLE_KINDS order at ``component_lr[kind]`` (default ``lr``). The groups depend
        on the model only, so a rate changed on resume loads the saved optimizer state as it is."""
        trainable = self.trainable()
        apart = {id(p) for params in trainable.values() for p in params}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in apart], "lr": lr}]
        groups += [{"params": params, "lr": component_lr.get(kind, lr)} for kind, params in trainable.items()]
        return groups

    def component_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """State of the loss, time sampler and dequantizer when they are modules with any (the model's is
        saved as ``model``, SDE and parameterization included)."""
        parts = (("loss", self.loss), ("time_sampler", self.time_sampler), ("dequantizer", self.dequantizer))
        return {kind: part.state_dict() for kind, part in parts if isinstance(part, nn.Module) and part.state_dict()}

    def load_component_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for kind, values in state.items():
            getattr(self, kind).load_state_dict(values)
