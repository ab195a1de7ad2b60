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

import yaml

from . import __version__
from .allocator import keep_freed_memory
from .errors import ConfigError, SdeflowError, did_you_mean
from .hookspecs import KINDS
from .preemption import Stopped
from .registry import default_registry, plugin_components

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"sdeflow: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


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
    from .build import check_experiment
    from .config import load_experiment

    exp = load_experiment(args.experiment, args.overrides)
    check_experiment(exp)
    print(yaml.safe_dump(exp.to_dict(), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train_from_cli

    return train_from_cli(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import eval_from_cli

    return eval_from_cli(args)


def cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import sample_from_cli

    return sample_from_cli(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep_from_cli

    return sweep_from_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdeflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sdeflow {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("components", help="list registered components and their arguments")
    p.add_argument("kind", nargs="?", help=f"one of: {', '.join(KINDS)}")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("check", help="validate an experiment and print the resolved config")
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train an experiment (resumes an existing run folder)")
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--run-dir", help="run folder (default runs/<name>)")
    p.add_argument("--restart", action="store_true", help="start afresh even if the run folder has a checkpoint")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even with a changed seed, batch size or component (breaks exact resume)")
    p.add_argument("--reevaluate", action="store_true", help="evaluate a finished run again")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test bpd / ELBO of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--max-examples", type=positive_int)
    p.add_argument("--samples-per-example", type=positive_int)
    p.add_argument("--estimator", help="comma-separated estimators (elbo, ode, both, ...; see README)")
    p.add_argument("--time-sampler", help="time sampler for the ELBO (e.g. uniform, debiased)")
    p.add_argument("--batch-size", type=positive_int)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="draw samples (PNG grid or scatter plot)")
    p.add_argument("run_dir")
    p.add_argument("--num", type=positive_int)
    p.add_argument("--lam", type=float)
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--trajectories", action="store_true", help="2-D data: draw the paths for λ = 0 and λ = 1")
    p.add_argument("--out")
    p.add_argument("--seed", type=seed_value, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("sweep", help="run an experiment's ablations and sweep grid, then summarise")
    p.add_argument("experiment", nargs="?")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--runs-dir")
    p.add_argument("--only", help="comma-separated variant names")
    p.add_argument("--summary", metavar="DIR", help="only rebuild the summary of a runs folder")
    p.add_argument("--baseline", metavar="NAME", help="the variant deltas are taken to (default: base)")
    p.add_argument("--launcher", choices=["sequential", "local", "slurm"],
                   help="where the variants run (default: the file's launcher section, else sequential)")
    p.add_argument("--jobs", type=positive_int, metavar="N", help="variants at once (local, slurm)")
    p.add_argument("--status", metavar="DIR", help="print each variant's state in a sweep's runs folder")
    p.set_defaults(func=cmd_sweep)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train exp.yaml --run-dir d train.steps=5`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(build_parser(), argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
