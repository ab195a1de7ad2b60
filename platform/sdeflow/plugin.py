"""Everything a plugin needs from sdeflow, in one import: ``from sdeflow.plugin import hookimpl, SDE, require``.

This is the only kernel module the built-in plugins (``plugins/sdeflow_builtin``) and the example
third-party plugin import (``tests/test_structure.py`` enforces it), so a plugin written against it keeps
working when the kernel moves a function between its modules. Grouped by what a plugin does:

- **registering**: ``hookimpl`` marks the ``sdeflow_register_<kind>s(register)`` hooks (sdeflow.core.hookspecs);
- **interfaces** a component implements: ``SDE``, ``Parameterization``, ``Loss``, ``TimeSampler``,
  ``Sampler``, ``Dequantizer``, ``DataBundle``, ``DataTransform`` (``Identity``, ``Logit``, ``UnitInterval``,
  ``Affine``), ``TimeDensity``, ``Metric``, ``LRSchedule``, and the model they act on, ``DiffusionModel``;
- **errors**: ``require(condition, argument, message)`` raises the one-line ``InvalidArgument`` the kernel
  re-addresses to the dotted key (``sde.beta_max: ...``); ``DataError`` for a missing or unreadable data
  set; ``did_you_mean`` for a suggestion;
- **seeding**: ``derive_seed(seed, *labels)``, a seed that depends only on its arguments;
- **tensor helpers**: ``bcast``, ``flat_sum``, ``randn_like``, ``gaussian_log_prob``, ``draw_examples``,
  ``derived``, ``TabulatedTimeDensity``, ``differentiated_twice`` (a context under which the network is run
  eagerly, for losses that differentiate through it twice);
- **likelihood** building blocks, for estimators and losses: ``elbo``, ``dsm_elbo``, ``check_probe``,
  ``require_linear_drift``, ``HutchinsonELBO``, ``DenoisingELBO``, ``CombinedELBO``, ``ODEEstimator``,
  ``ODE``, ``check_method``, ``ode_sample``, ``truncated_normal_draw``, ``truncated_normal_log_q``;
- **time samplers**: ``LikelihoodDensity`` (t from the SDE's likelihood-weighted density, the base of
  ``debiased``), ``uniform_u`` (u ~ U(0, 1] in float64, for ``sample_u``);
- **samplers'** time grids: ``make_grid``, ``check_grid``, ``log_snr``, ``t_of_log_snr``,
  ``noise_to_signal``, and ``check_lambda`` for a λ-sampler's λ;
- **metrics**: ``Metric``, ``Statistics`` (Inception feature statistics), ``frechet_distance``,
  ``kernel_inception_distance``, ``mmd``, ``sliced_wasserstein``;
- **optimizers**: ``fused_where_possible`` (PyTorch's fused update where the parameters allow it).
"""

from __future__ import annotations

from .core.compiling import differentiated_twice
from .core.errors import DataError, InvalidArgument, did_you_mean, require
from .core.hookspecs import hookimpl
from .core.interfaces import (
    SDE,
    DataBundle,
    DataTransform,
    Dequantizer,
    Loss,
    LRSchedule,
    Parameterization,
    Sampler,
    TabulatedTimeDensity,
    TimeDensity,
    TimeSampler,
    bcast,
    derived,
    draw_examples,
    flat_sum,
    gaussian_log_prob,
    randn_like,
)
from .core.model import DiffusionModel, check_lambda
from .core.seeding import derive_seed
from .core.time_grids import check_grid, log_snr, make_grid, noise_to_signal, t_of_log_snr
from .core.transforms import Affine, Identity, Logit, UnitInterval, truncated_normal_draw, truncated_normal_log_q
from .evaluation.inception import Statistics
from .evaluation.quality import Metric, frechet_distance, kernel_inception_distance, mmd, sliced_wasserstein
from .likelihood.elbo import check_probe, dsm_elbo, elbo, require_linear_drift
from .likelihood.elbo_estimators import CombinedELBO, DenoisingELBO, HutchinsonELBO
from .likelihood.estimators import ODE
from .likelihood.ode import ODEEstimator, check_method, ode_sample
from .likelihood.time_proposals import LikelihoodDensity, uniform_u
from .training.optim import fused_where_possible

__all__ = [
    "ODE",
    "SDE",
    "Affine",
    "CombinedELBO",
    "DataBundle",
    "DataError",
    "DataTransform",
    "DenoisingELBO",
    "Dequantizer",
    "DiffusionModel",
    "HutchinsonELBO",
    "Identity",
    "LikelihoodDensity",
    "InvalidArgument",
    "LRSchedule",
    "Logit",
    "Loss",
    "Metric",
    "ODEEstimator",
    "Parameterization",
    "Sampler",
    "Statistics",
    "TabulatedTimeDensity",
    "TimeDensity",
    "TimeSampler",
    "UnitInterval",
    "bcast",
    "check_grid",
    "check_lambda",
    "check_method",
    "check_probe",
    "derive_seed",
    "derived",
    "did_you_mean",
    "differentiated_twice",
    "draw_examples",
    "dsm_elbo",
    "elbo",
    "flat_sum",
    "frechet_distance",
    "fused_where_possible",
    "gaussian_log_prob",
    "hookimpl",
    "kernel_inception_distance",
    "log_snr",
    "make_grid",
    "mmd",
    "noise_to_signal",
    "ode_sample",
    "randn_like",
    "require",
    "require_linear_drift",
    "sliced_wasserstein",
    "t_of_log_snr",
    "uniform_u",
    "truncated_normal_draw",
    "truncated_normal_log_q",
]
