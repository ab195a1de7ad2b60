"""sdeflow: a plugin-based platform for diffusion-based generative models and score matching.

The kernel defines the kinds of components (hook specs and interfaces), the registry that finds them
through entry points, the experiment config, and the trainer, evaluation and CLI that compose them.
"""

from importlib.metadata import PackageNotFoundError, version

from .hookspecs import hookimpl
from .interfaces import (
    SDE,
    DataBundle,
    DataTransform,
    Loss,
    Parameterization,
    Sampler,
    TimeDensity,
    TimeSampler,
)
from .model import DiffusionModel

try:
    __version__ = version("sdeflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "SDE",
    "DataBundle",
    "DataTransform",
    "DiffusionModel",
    "Loss",
    "Parameterization",
    "Sampler",
    "TimeDensity",
    "TimeSampler",
    "hookimpl",
]
