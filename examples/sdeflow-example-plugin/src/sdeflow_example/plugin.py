"""The plugin module the ``example`` entry point names: one registration hook per kind it offers."""

from __future__ import annotations

from sdeflow.hookspecs import hookimpl

from .network import ResMLP
from .sde import ConstantBetaVP


@hookimpl
def sdeflow_register_sdes(register) -> None:
    register("vp_const", ConstantBetaVP)


@hookimpl
def sdeflow_register_networks(register) -> None:
    register("resmlp", ResMLP)
