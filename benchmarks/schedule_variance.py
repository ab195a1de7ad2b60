"""The variance of the ELBO estimate that training sees, run by run: one draw of the run's own loss (its
form and time sampler; for a DSM run, the divergence form with t ~ U) per example, repeated, on the same
test examples. VDM (Kingma et al. 2021, §5.1) learns the interior of the noise schedule to lower exactly
this variance, so comparing a learned-schedule run with a fixed-schedule run on the same loss shows what
learning it bought:

    sdeflow sweep experiments/ablations/likelihood_techniques.yaml --launcher local --jobs 2
    python benchmarks/schedule_variance.py runs/likelihood_techniques/elbo_loss runs/likelihood_techniques/learned_vp

Prints a table: the mean ELBO in bits/dim (its s.e. over examples) and the variance of one draw
(bits/dim)², the sample variance across ``--draws`` draws averaged over examples, and its median over
examples (the mean is dominated by a few examples' draws at small t). ``--initial-sde`` adds, for a run
with a trainable SDE, the same draws with the SDE's parameters as at step 0 and the trained network: with
fixed endpoints and a parameterization that is a function of the noise level (velocity, noise) the bound
is the same (MATH.md §12), so the mean must agree and only the variance moves.
"""

from __future__ import annotations

import argparse
import math

import torch

import sdeflow
from sdeflow.assembly.build import build_parts
from sdeflow.likelihood.elbo import elbo
from sdeflow_builtin.time_samplers import Uniform


def draws(run, examples: int, repeats: int, seed: int) -> torch.Tensor:
    """(repeats, examples) single-draw ELBO estimates of the test examples, in bits/dim (log-det included):
    the run's own loss and time sampler when its loss is a bound (it trains the SDE), else the paper's
    divergence form with uniform t."""
    built = run.built
    x = run.examples("test", examples).to(built.device)
    generator = torch.Generator(device=built.device).manual_seed(seed)
    space, _ = built.space()
    z, log_det, log_q = space(x, generator=generator)
    dim = z[0].numel()
    loss, time_sampler = built.ema_objective.loss, built.ema_objective.time_sampler
    model = run.ema
    if "sde" in getattr(loss, "trains", ()):
        def estimate():
            return -loss(model, z, time_sampler, generator=generator)
    else:
        def estimate():
            return elbo(model, z, Uniform(), probe="rademacher", generator=generator)
    rows = []
    with torch.no_grad():
        for _ in range(repeats):
            nats = estimate().detach() + log_det - log_q
            rows.append(-nats / (dim * math.log(2)) + space.bits_offset)
    return torch.stack(rows)


def mean_se(values: torch.Tensor, sign: str = "") -> str:
    """'mean (s.e.)' over examples; ``sign="+"`` for a change."""
    return f"{float(values.mean()):{sign}.4f} ({float(values.std() / math.sqrt(len(values))):.4f})"


def row(label: str, run, values: torch.Tensor, sde_state: str, trained: torch.Tensor | None = None) -> str:
    """One table row: the mean bpd with its s.e. over examples, the mean and median over examples of the
    variance of one draw, and (for the step-0 SDE) the mean's change from the trained SDE's on the same
    draws, with its paired s.e."""
    exp, per_example = run.exp, values.mean(dim=0)
    variance = values.var(dim=0)
    change = "" if trained is None else mean_se(per_example - trained.mean(dim=0), "+")
    return (f"| {label} | {exp.describe('sde')} ({sde_state}) | {exp.describe('loss')} | "
            f"{exp.describe('time_sampler')} | {mean_se(per_example)} | {change} | "
            f"{float(variance.mean()):.2f} | {float(variance.median()):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--initial-sde", action="store_true",
                        help="also evaluate each run whose SDE has parameters with them as they were at step 0, "
                             "the network as trained: the variance before and after the schedule was learned")
    args = parser.parse_args()
    print("| run | SDE (its parameters) | loss | time sampler | mean bpd (s.e.) | change (paired s.e.) | "
          "variance of one draw, mean over examples (bpd²) | median over examples (bpd²) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.runs:
        run = sdeflow.open_run(path)
        trained = draws(run, args.examples, args.draws, args.seed)
        print(row(path, run, trained, "trained"), flush=True)
        sde = run.ema.sde
        if args.initial_sde and any(True for _ in sde.parameters()):
            state = {k: v.clone() for k, v in sde.state_dict().items()}
            sde.load_state_dict(build_parts(run.exp, run.built.registry).sde.state_dict())
            initial = draws(run, args.examples, args.draws, args.seed)  # the same seed: the same draws
            print(row(path, run, initial, "as at step 0", trained), flush=True)
            sde.load_state_dict(state)


if __name__ == "__main__":
    main()
