"""The built-in likelihood estimators (``eval.estimator``), registered like any plugin's. Their maths lives in
the kernel (:mod:`sdeflow.elbo`, :mod:`sdeflow.elbo_estimators`, :mod:`sdeflow.likelihood`), which the
training loss and the bounds share:

    elbo           the ELBO in divergence form, Hutchinson probe (MATH.md §5): the reference
    dsm_elbo       the same ELBO in denoising form (MATH.md §9): no divergence above t_ε
    combined_elbo  both forms on the same draws, combined per log-t bin (weights fitted on a pilot pass)
    ode            log p(x) through the probability-flow ODE (MATH.md §7)
"""

from __future__ import annotations

from sdeflow.plugin import ODE, CombinedELBO, DenoisingELBO, HutchinsonELBO, hookimpl


@hookimpl
def sdeflow_register_estimators(register) -> None:
    register("elbo", HutchinsonELBO)
    register("dsm_elbo", DenoisingELBO)
    register("combined_elbo", CombinedELBO)
    register("ode", ODE)
