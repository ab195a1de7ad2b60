"""The plugin module the ``example`` entry point names: one registration hook per kind it offers."""

from __future__ import annotations

from sdeflow.plugin import hookimpl

from .network import ResMLP
from .quality import RK4ODE, MeanDistance
from .sde import ConstantBetaVP, LearnedBetaVP


@hookimpl
def sdeflow_register_sdes(register) -> None:
    register("vp_const", ConstantBetaVP)
    register("vp_learned_beta", LearnedBetaVP)


@hookimpl
def sdeflow_register_networks(register) -> None:
    register("resmlp", ResMLP)


@hookimpl
def sdeflow_register_estimators(register) -> None:
    register("ode_rk4", RK4ODE)


@hookimpl
def sdeflow_register_metrics(register) -> None:
    register("mean_distance", MeanDistance)
