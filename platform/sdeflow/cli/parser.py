"""The ``sdeflow`` command line's arguments: every subcommand, every option with its help and default.

The commands themselves are in :mod:`sdeflow.cli.commands`; ``build_parser(commands)`` wires each subcommand to
the function of the same name there (``commands["train"]``, …).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence

import yaml

from ..core.errors import ConfigError
from ..core.hookspecs import KINDS
from ..experiment.files import safe_load_capped

EXIT_USER_ERROR = 2
OVERRIDES_HELP = "dotted settings over the file's, e.g. sde.beta_max=10 train.steps=500 (checked like the file)"


class Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"sdeflow: error: {message} (see '{self.prog} --help')\n")


class Help(argparse.HelpFormatter):
    """An option's help ends with its default when it has a value and the help does not name one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


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


def _experiment(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("experiment", nargs=None if required else "?", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def build_parser(commands: Mapping[str, Callable], version: str) -> argparse.ArgumentParser:
    parser = Parser(prog="sdeflow", description="sdeflow: diffusion models and score matching, by likelihood",
                    formatter_class=Help)
    parser.add_argument("--version", action="version", version=f"sdeflow {version}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, formatter_class=Help)
        p.set_defaults(func=commands[name])
        return p

    p = command("plugins", "list the installed plugins, their versions, hooks and components")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")

    p = command("components", "list registered components with their arguments and defaults")
    p.add_argument("kind", nargs="?", help=f"only this kind, one of: {', '.join(KINDS)} (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")

    p = command("check", "validate an experiment (names, arguments, values) and print the resolved config")
    _experiment(p)

    p = command("train", "train an experiment into a run folder, resuming the folder's last checkpoint")
    _experiment(p)
    p.add_argument("--run-dir", help="the run folder (default: runs/<experiment name>)")
    p.add_argument("--restart", action="store_true", help="move an existing run aside and start afresh")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even with a changed seed, batch size or component (breaks exact resume)")
    p.add_argument("--reevaluate", action="store_true", help="evaluate a finished run again")

    _eval(command("eval", "likelihood of a trained run (bpd ± s.e.), recorded in its eval.json"))
    _sample(command("sample", "draw samples from a trained run's EMA model into a PNG"))
    _sweep(command("sweep", "run an experiment's ablations and sweep grid, then summarise them side by side"))
    return parser


def component_spec(text: str):
    """A component's name, or a ``{name: ..., **args}`` mapping in YAML flow style."""
    try:
        value = safe_load_capped(text, "component")
    except (yaml.YAMLError, ConfigError):
        raise argparse.ArgumentTypeError(f"not a name or a YAML mapping: {text[:80]!r}") from None
    if not isinstance(value, (str, dict)):
        raise argparse.ArgumentTypeError(f"expected a name or a {{name: ..., ...}} mapping, got {text!r}")
    return value


def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by sdeflow train")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the examples evaluated")
    p.add_argument("--max-examples", type=positive_int, help="the first N examples (default: eval.max_examples)")
    p.add_argument("--samples-per-example", type=positive_int,
                   help="draws of (t, ε) averaged per example (default: eval.samples_per_example)")
    p.add_argument("--estimator", help="comma-separated: elbo, dsm_elbo, combined_elbo, ode, both "
                                       "(= elbo,ode) (default: eval.estimator)")
    p.add_argument("--time-sampler", help="time sampler of the ELBO, e.g. uniform, debiased "
                                          "(default: eval.time_sampler)")
    p.add_argument("--batch-size", type=positive_int, help="examples a batch (default: eval.batch_size)")
    p.add_argument("--dequantizer", type=component_spec,
                   help="evaluate discrete data under another dequantizer: a name (truncated_normal) or a YAML "
                        "spec ('{name: truncated_normal, tau: 2}'); recorded beside the headline "
                        "(default: the experiment's)")
    p.add_argument("--bound", choices=["paper", "discrete", "truncated"],
                   help="evaluate under another bound (how [0, t_eps] is paid for, MATH.md §15); recorded beside "
                        "the headline (default: the experiment's)")
    p.add_argument("--metrics", help="comma-separated sample-quality metrics, each with its floor: swd and mmd "
                                     "(floor: two halves of the split), fid and kid for images (floor: the split "
                                     "against the training images); recorded in eval.json's quality section")
    p.add_argument("--num", type=positive_int, help="samples the metrics draw (default: sample.num for swd and mmd, "
                                                    "eval.fid_samples for fid and kid)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the samples the metrics draw")


def _sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by sdeflow train")
    p.add_argument("--num", type=positive_int, help="number of samples (default: sample.num)")
    p.add_argument("--lam", type=float, help="λ of the λ-family: 0 reverse SDE … 1 ODE "
                                             "(default: sample.lam, else the sampler's lam)")
    p.add_argument("--sampler", help="another registered sampler by name, with its defaults "
                                     "(default: the experiment's)")
    p.add_argument("--steps", type=positive_int, help="sampler steps (default: sample.steps, else the sampler's)")
    p.add_argument("--trajectories", action="store_true", help="2-D data: also draw the paths for λ = 0 and λ = 1")
    p.add_argument("--out", help="the PNG to write (default: RUN_DIR/samples/sample.png)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the prior draws and the sampler's noise")


def _sweep(p: argparse.ArgumentParser) -> None:
    _experiment(p, required=False)
    p.add_argument("--runs-dir", help="folder of the variants' run folders (default: runs/<experiment name>)")
    p.add_argument("--only", help="comma-separated variant names to run (default: all)")
    p.add_argument("--summary", metavar="DIR", help="only rebuild the summary of a sweep's runs folder")
    p.add_argument("--baseline", metavar="NAME", help="the variant deltas are taken to (default: base)")
    p.add_argument("--launcher", choices=["sequential", "local", "slurm"],
                   help="where the variants run (default: the file's launcher section, else sequential)")
    p.add_argument("--jobs", type=positive_int, metavar="N",
                   help="variants at once (local, slurm) (default: the launcher section's, else 1)")
    p.add_argument("--status", metavar="DIR", help="print each variant's state in a sweep's runs folder")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train exp.yaml --run-dir d train.steps=5`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
