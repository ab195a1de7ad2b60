"""sdeflow: a plugin-based platform for diffusion-based generative models and score matching.

The kernel defines the kinds of components (hook specs and interfaces), the registry that finds them
through entry points, the experiment config, and the trainer, evaluation and CLI that compose them.

From Python (a notebook, a script), the API is :func:`experiment`, :func:`component`, :func:`train`,
:func:`open_run` and the :class:`Run` they give (see README, "Python").
"""

from .api import Run, component, experiment, open_run, train
from .core.hookspecs import hookimpl
from .core.interfaces import (
    SDE,
    DataBundle,
    DataTransform,
    Loss,
    Parameterization,
    Sampler,
    TimeDensity,
    TimeSampler,
)
from .core.model import DiffusionModel
from .rundir.folder import installed_version

__version__ = installed_version()

__all__ = [
    "SDE",
    "DataBundle",
    "DataTransform",
    "DiffusionModel",
    "Loss",
    "Parameterization",
    "Run",
    "Sampler",
    "TimeDensity",
    "TimeSampler",
    "component",
    "experiment",
    "hookimpl",
    "open_run",
    "train",
]
