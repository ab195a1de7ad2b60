"""The ``sdeflow`` command line: plugins, components, check, train, eval, sample, sweep.

User errors print one line to stderr and exit with status 2 (``--debug`` shows the traceback); a run
stopped by a signal after saving its checkpoint exits with status 75 (``preemption.EXIT_PREEMPTED``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml

from .. import __version__
from ..api import SdeflowAdvice, experiment, open_run
from ..assembly.build import require_lambda_sampler
from ..assembly.run import resolve_device
from ..components.registry import default_registry, plugin_components
from ..core.distributed import init_from_env, shutdown
from ..core.errors import ConfigError, InvalidArgument, SdeflowError, blame_overrides, did_you_mean
from ..core.hookspecs import KINDS
from ..evaluation.quality import parse_metrics
from ..experiment.config import load_experiment, parse_override, read_experiment_data
from ..rundir.folder import recorded_plugins
from ..sweeps.summary import status_rows, write_summary
from ..sweeps.sweep import run_sweep
from ..training.allocator import keep_freed_memory
from ..training.memory import bytes_per_example, check_batch_fits
from ..training.preemption import Stopped
from ..training.trainer import default_run_dir, train
from . import parser as cliparser
from .parser import EXIT_USER_ERROR

EXIT_INTERNAL_ERROR = 1
"""A bug of sdeflow or of a plugin (exit status 1); bad input exits with EXIT_USER_ERROR (2)."""


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = default_registry()
    items = []
    for p in registry.plugins:
        names = [f"{c.kind}:{c.name}" for c in plugin_components(registry, p.name)]
        items.append({"name": p.name, "distribution": p.distribution, "version": p.version,
                      "hooks": list(p.hooks), "components": names})
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    rows = [[i["name"], f"{i['distribution']} {i['version']}", ", ".join(h.removeprefix("sdeflow_register_")
             for h in i["hooks"]), ", ".join(i["components"])] for i in items]
    print(format_table(rows, ["plugin", "distribution", "hooks", "components"]))
    for name, reason in registry.failures.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    registry = default_registry()
    if args.kind and args.kind not in KINDS:
        raise ConfigError(f"unknown kind '{args.kind}'{did_you_mean(args.kind, KINDS)}; "
                          f"kinds: {', '.join(KINDS)}")
    components = registry.all(args.kind)
    if args.json:
        items = [{"kind": c.kind, "name": c.name, "plugin": c.plugin.name, "version": c.plugin.version,
                  "description": c.description, "arguments": [a.to_json() for a in c.arguments.values()]}
                 for c in components]
        print(json.dumps(items, indent=2))
        return 0
    rows = [[c.kind, c.name, c.plugin.name, ", ".join(a.describe() for a in c.arguments.values()) or "-"]
            for c in components]
    print(format_table(rows, ["kind", "name", "plugin", "arguments"]))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as advised:  # the advice experiment() gives, said once here
        warnings.simplefilter("always", SdeflowAdvice)
        exp = experiment(args.experiment, overrides_of(args), where=COMMAND_LINE)
    print(yaml.safe_dump(exp.to_dict(), sort_keys=False), end="")
    for w in advised:
        if issubclass(w.category, SdeflowAdvice):
            print(f"sdeflow: warning: {w.message}", file=sys.stderr)
    return 0


COMMAND_LINE = "command line"


def overrides_of(args: argparse.Namespace) -> dict:
    return dict(parse_override(o, COMMAND_LINE) for o in args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = overrides_of(args)
    data = read_experiment_data(args.experiment, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(str(data.get("name", Path(args.experiment).stem)))
    # A name that two plugins now register resolves as this run recorded it.
    prefer = {} if args.restart else recorded_plugins(run_dir)
    try:
        exp = load_experiment(args.experiment, overrides, prefer=prefer)
        ctx = init_from_env(resolve_device(exp.device, exp.source))
        try:
            train(exp, run_dir, restart=args.restart, ctx=ctx, allow_changes=args.allow_changes,
                  reevaluate=args.reevaluate)
        finally:
            shutdown(ctx)
    except ConfigError as e:
        raise blame_overrides(e, str(args.experiment), overrides, COMMAND_LINE) from None
    if ctx.is_main:
        print(f"run folder: {run_dir} (eval.json, samples/, metrics.jsonl; tensorboard --logdir {run_dir.parent})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        parse_metrics(args.metrics or "")  # before the evaluation, not after it
    except InvalidArgument as e:
        raise ConfigError(f"--metrics: {e.message}") from None
    run = open_run(args.run_dir)
    results = run.evaluate(args.split, estimator=args.estimator, max_examples=args.max_examples,
                           samples=args.samples_per_example, time_sampler=args.time_sampler,
                           batch_size=args.batch_size, dequantizer=args.dequantizer, bound=args.bound)
    if args.metrics:
        run.quality(args.metrics, split=args.split, n=args.num, seed=args.seed)
    partial = [name for name, e in results.items() if not e["full"]]
    if partial:
        n = results[partial[0]]["n"]
        print(f"sdeflow: {', '.join(partial)}: not the experiment's own evaluation settings ({n} {args.split} "
              "examples): recorded beside the headline results in eval.json, not as its headline", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    run = open_run(args.run_dir)
    built = run.built
    if args.trajectories and not run.data.planar:
        raise SdeflowError(f"--trajectories: needs 2-D data; {run.path} holds {run.data.kind} data "
                           f"of shape {tuple(run.data.shape)}")
    if args.trajectories:
        require_lambda_sampler(built.registry, run.exp, "--trajectories")
    cfg = run.exp.sample
    num = args.num if args.num is not None else cfg.num
    steps = args.steps if args.steps is not None else cfg.steps
    lam = args.lam if args.lam is not None or args.sampler else cfg.lam
    per_example = bytes_per_example(run.ema, tuple(run.data.shape), built.device)
    check_batch_fits("--num", num, per_example, built.device, str(run.path), factor=1.5)
    out = Path(args.out) if args.out else None  # None: the run's samples/, where the folder is once drawn
    trajectories = None if out is None else out.with_name(f"{out.stem}_trajectories.png")
    for path in (out, trajectories) if out is not None else ():
        outside_records(run.path, path)
    print(built.save_samples(out, num=num, lam=lam, sampler=args.sampler, steps=steps, seed=args.seed))
    if args.trajectories:
        print(built.save_trajectories(trajectories, num=num, steps=steps, seed=args.seed))
    return 0


def outside_records(run_dir: Path, path: Path) -> None:
    """A path the user names may lie inside a run folder only under its samples/ (nothing of the run's own
    records, config.yaml, eval.json, checkpoints, metrics, evals/, is ever replaced by a picture)."""
    run_dir, target = run_dir.resolve(), path.resolve()
    if target.is_relative_to(run_dir) and not target.is_relative_to(run_dir / "samples"):
        raise SdeflowError(f"--out: {path} lies inside the run folder {run_dir} but outside its samples/ folder, "
                           "where the run's own records are; write it under samples/ or outside the run")


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.status:
        if not Path(args.status).is_dir():
            raise SdeflowError(f"--status: {args.status} is not a folder of sweep runs")
        rows = status_rows(Path(args.status))
        if not rows:
            raise SdeflowError(f"--status: {args.status} holds no sweep (no sweep.json and no run folders with a "
                               "config.yaml)")
        width = max(len(n) for n, _ in rows)
        print("\n".join(f"{name:<{width}}  {state}" for name, state in rows))
        return 0
    if args.summary:
        if not Path(args.summary).is_dir():
            raise SdeflowError(f"--summary: {args.summary} is not a folder of sweep runs")
        write_summary(args.summary, args.baseline)
        return 0
    if not args.experiment:
        raise ConfigError("sweep: give an experiment file, or --summary DIR")
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    run_sweep(args.experiment, args.runs_dir, args.overrides, only, launcher=args.launcher, jobs=args.jobs)
    return 0


COMMANDS = {"plugins": cmd_plugins, "components": cmd_components, "check": cmd_check, "train": cmd_train,
            "eval": cmd_eval, "sample": cmd_sample, "sweep": cmd_sweep}


def build_parser() -> argparse.ArgumentParser:
    return cliparser.build_parser(COMMANDS, __version__)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = cliparser.parse(build_parser(), argv)
    except SystemExit as e:  # usage errors (status 2), --help and --version (status 0)
        return e.code if isinstance(e.code, int) else 0
    keep_freed_memory()
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore", UserWarning)  # skipped plugins are reported by `plugins`
            return args.func(args)
    except Stopped as e:  # not an error: the work is saved and resumes when run again
        print(f"sdeflow: {e}", file=sys.stderr)
        return e.exit_code
    except SdeflowError as e:
        if args.debug:
            raise
        print(f"sdeflow: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USER_ERROR)
    except OSError as e:  # a full disk, a read-only folder: the environment's, not a bug
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"sdeflow: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sdeflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of sdeflow or a plugin, never the input's: still one line
        if args.debug:
            raise
        message = " ".join(str(e).split())[:200]
        print(f"sdeflow: error: internal error ({type(e).__name__}: {message}); rerun with --debug for the "
              "traceback, and please report it", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
