"""An example third-party sdeflow plugin: the SDE ``vp_const`` and the network ``resmlp``.

sdeflow finds it through the ``example`` entry point (group ``sdeflow``) that points at
:mod:`sdeflow_example.plugin`; nothing in sdeflow imports this package by name.
"""

from .network import ResMLP
from .sde import ConstantBetaVP

__version__ = "0.1.0"

__all__ = ["ConstantBetaVP", "ResMLP"]
