"""Likelihood: the ELBO integrands in both forms under the model's bound, the ELBO estimators, the
registered estimators by name, time proposals, and the probability-flow ODE."""
