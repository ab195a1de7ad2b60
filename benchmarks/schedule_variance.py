"""The variance of the ELBO estimate that training sees, run by run: one draw of (t ~ U, ε, probe) per
example, repeated, on the same test examples. VDM (Kingma et al. 2021, §5.1) learns the interior of the
noise schedule to lower exactly this variance, so comparing a learned-schedule run with a fixed-schedule
run on the same loss shows what learning it bought:

    sdeflow sweep experiments/ablations/likelihood_techniques.yaml --launcher local --jobs 2
    python benchmarks/schedule_variance.py runs/likelihood_techniques/elbo_loss runs/likelihood_techniques/learned_vp

Prints a table: the mean ELBO in bits/dim and the per-example variance of one draw (bits/dim)², the
mean over examples of the sample variance across ``--draws`` draws.
"""

from __future__ import annotations

import argparse
import math

import torch

import sdeflow
from sdeflow.elbo import elbo
from sdeflow_builtin.time_samplers import Uniform


def draws(run, examples: int, repeats: int, seed: int) -> torch.Tensor:
    """(repeats, examples) single-draw ELBO estimates of the test examples, in bits/dim (log-det included)."""
    built = run.built
    x = run.examples("test", examples).to(built.device)
    generator = torch.Generator(device=built.device).manual_seed(seed)
    space, _ = built.space()
    z, log_det, log_q = space(x, generator=generator)
    dim = z[0].numel()
    rows = []
    model = run.ema
    for _ in range(repeats):
        nats = elbo(model, z, Uniform(), probe="rademacher", generator=generator) + log_det - log_q
        rows.append(-nats.detach() / (dim * math.log(2)) + space.bits_offset)
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| run | SDE | mean bpd (one draw, uniform t) | per-example variance of one draw (bpd²) |")
    print("|---|---|---|---|")
    for path in args.runs:
        run = sdeflow.open_run(path)
        values = draws(run, args.examples, args.draws, args.seed)
        variance = values.var(dim=0).mean()
        print(f"| {path} | {run.exp.components['sde']['name']} | {float(values.mean()):.4f} | {float(variance):.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
