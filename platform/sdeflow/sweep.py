"""Ablations and sweeps: expand one experiment into named variants, run them, compare them in a table.

Precedence of settings, lowest first: the YAML file, the variant's ablation ``set``, its ``sweep``
grid values, and the command line's ``key=value`` overrides (the user's last word wins).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .build import check_experiment
from .checkpoint import write_text_atomic
from .config import Experiment, apply_overrides, parse_override, read_yaml, structure
from .distributed import DistContext, init_from_env, shutdown
from .errors import ConfigError, SdeflowError
from .registry import Registry, default_registry
from .runlog import read_metrics
from .runs import LAST, resolve_device

BASE = "base"


@attrs.define
class Variant:
    name: str
    changes: dict[str, Any]
    exp: Experiment | None = None


def _label(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def expand(data: Mapping[str, Any], source: str) -> list[Variant]:
    """The base run plus one variant per ablation, each crossed with every point of the sweep grid."""
    ablations = [Variant(BASE, {})]
    for i, item in enumerate(data.get("ablations") or []):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{source}: ablations[{i}]: expected {{name: ..., set: {{key: value}}}}, got {item!r}")
        changes = item.get("set") or {}
        if not isinstance(changes, Mapping):
            raise ConfigError(f"{source}: ablations[{i}].set: expected a mapping of dotted keys, got {changes!r}")
        ablations.append(Variant(item["name"], dict(changes)))
    grid = data.get("sweep") or {}
    if not isinstance(grid, Mapping) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{source}: sweep: expected a mapping of dotted keys to non-empty lists, got {grid!r}")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    variants = []
    for ablation, point in itertools.product(ablations, points):
        suffix = "-".join(_label(v) for v in point.values())
        name = ablation.name if not suffix else (suffix if ablation.name == BASE else f"{ablation.name}-{suffix}")
        variants.append(Variant(name, {**ablation.changes, **point}))
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: ablations: duplicate variant name(s) {', '.join(duplicates)}")
    return variants


def prepare(path: str | Path, overrides: Sequence[str] = (), only: Sequence[str] | None = None,
            registry: Registry | None = None) -> list[Variant]:
    """Expand and check every variant before any runs; an error names the variant and the key."""
    registry = registry or default_registry()
    data = read_yaml(path)
    cli = dict(parse_override(o, str(path)) for o in overrides)
    variants = expand(data, str(path))
    if only:
        unknown = set(only) - {v.name for v in variants}
        if unknown:
            raise ConfigError(f"--only: unknown variant(s) {', '.join(sorted(unknown))}; "
                              f"variants: {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in only]
    base = {k: v for k, v in data.items() if k not in ("ablations", "sweep")}
    for v in variants:
        source = f"{path} [variant '{v.name}']"
        config = apply_overrides(base, {**v.changes, **cli}, source)
        config["name"] = f"{data.get('name', Path(path).stem)}/{v.name}"
        v.exp = structure(config, source, registry)
        check_experiment(v.exp, registry)
    return variants


def finished(run_dir: Path, steps: int) -> bool:
    """Trained to ``steps`` and evaluated (eval.json records the step of its weights)."""
    path = run_dir / "eval.json"
    if not (run_dir / LAST).exists() or not path.exists():
        return False
    steps_evaluated = [e.get("step", 0) for e in json.loads(path.read_text()).values() if isinstance(e, dict)]
    return bool(steps_evaluated) and max(steps_evaluated) >= steps


def run_sweep(path: str | Path, runs_dir: str | Path | None = None, overrides: Sequence[str] = (),
              only: Sequence[str] | None = None) -> Path:
    """Check every variant, then run them in turn (under torchrun each one is distributed), then
    write the summary."""
    variants = prepare(path, overrides, only)
    ctx = init_from_env(resolve_device(variants[0].exp.device, variants[0].exp.source))
    try:
        return _run_variants(path, variants, runs_dir, ctx)
    finally:
        shutdown(ctx)


def _run_variants(path, variants: list[Variant], runs_dir, ctx: DistContext) -> Path:
    from .trainer import train

    runs_dir = Path(runs_dir or Path("runs") / read_yaml(path).get("name", Path(path).stem))
    for v in variants:
        run_dir = runs_dir / v.name
        if finished(run_dir, v.exp.train.steps):
            if ctx.is_main:
                print(f"sdeflow: variant '{v.name}' already finished in {run_dir}; skipping")
            continue
        if ctx.is_main:
            print(f"sdeflow: variant '{v.name}' → {run_dir}")
        train(v.exp, run_dir, ctx=ctx)
    if ctx.is_main:
        write_summary(runs_dir, {v.name: v.changes for v in variants})
    return runs_dir


# ---------------------------------------------------------------- summary

COLUMNS = ["variant", "changes", "steps", "wall_s", "it_per_s", "final_loss", "bpd", "bpd_se",
           "delta_bpd", "delta_se"]


def _row(run_dir: Path, changes: Mapping[str, Any]) -> dict[str, Any]:
    metrics = read_metrics(run_dir)
    train_records = [r for r in metrics if "loss" in r]
    result = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
    main = result.get("elbo") or next((v for v in result.values() if isinstance(v, dict) and "bpd" in v), {})
    last = train_records[-1] if train_records else {}
    wall = last.get("elapsed_s")
    return {"variant": run_dir.name, "changes": " ".join(f"{k}={v}" for k, v in changes.items()) or "-",
            "steps": last.get("step"), "wall_s": wall,
            "it_per_s": (last.get("step") / wall) if wall else None, "final_loss": last.get("loss"),
            "bpd": main.get("bpd"), "bpd_se": main.get("bpd_se")}


def summary_rows(runs_dir: Path, changes: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per variant folder; differences to the base run (``base``, else the first variant)
    with s.e. √(se² + se_base²), treating the two test-set means as independent (conservative)."""
    folders = sorted(p for p in runs_dir.iterdir() if (p / "metrics.jsonl").exists())
    if not folders:
        raise SdeflowError(f"{runs_dir}: no variant runs found (no */metrics.jsonl)")
    changes = changes or {}
    rows = [_row(p, changes.get(p.name, {})) for p in folders]
    order = list(changes)
    rows.sort(key=lambda r: (r["variant"] != BASE, order.index(r["variant"]) if r["variant"] in order else len(order),
                             r["variant"]))
    base = next((r for r in rows if r["variant"] == BASE), rows[0])
    for r in rows:
        if r is base:
            r["delta_bpd"], r["delta_se"] = (0.0, 0.0) if r["bpd"] is not None else (None, None)
        elif r["bpd"] is not None and base["bpd"] is not None:
            r["delta_bpd"] = r["bpd"] - base["bpd"]
            r["delta_se"] = math.sqrt(r["bpd_se"] ** 2 + base["bpd_se"] ** 2)
        else:
            r["delta_bpd"] = r["delta_se"] = None
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(runs_dir: str | Path, changes: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """summary.csv, summary.md and bpd.png in ``runs_dir``; changes are read from config if not given."""
    runs_dir = Path(runs_dir)
    if changes is None:
        changes = _changes_from_configs(runs_dir)
    rows = summary_rows(runs_dir, changes)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(runs_dir / "summary.csv", table.getvalue())
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    write_text_atomic(runs_dir / "summary.md", "\n".join(lines) + "\n")
    plot_bpd(runs_dir, [r["variant"] for r in rows])
    print("\n".join(lines))
    return rows


def _changes_from_configs(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """What each variant changed relative to base, recovered from the runs' config.yaml files."""
    from .runlog import flatten

    configs = {p.name: flatten(read_yaml(p / "config.yaml")) for p in runs_dir.iterdir()
               if (p / "config.yaml").exists()}
    base = configs.get(BASE, {})
    skip = ("name", "plugins.")
    return {name: {k: v for k, v in cfg.items() if base.get(k) != v and not k.startswith(skip)}
            for name, cfg in configs.items()}


def plot_bpd(runs_dir: Path, variants: Sequence[str]) -> Path | None:
    """bpd vs step with ±1 s.e. bands, one line per variant."""
    from .figures import pyplot_agg

    plt = pyplot_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for name in variants:
        evals = [r for r in read_metrics(runs_dir / name) if "bpd" in r]
        if not evals:
            continue
        steps = [r["step"] for r in evals]
        bpd = [r["bpd"] for r in evals]
        se = [r.get("bpd_se", 0.0) for r in evals]
        ax.plot(steps, bpd, marker="o", label=name)
        ax.fill_between(steps, [b - s for b, s in zip(bpd, se)], [b + s for b, s in zip(bpd, se)], alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("bits per dimension (±1 s.e.)")
    ax.legend()
    fig.tight_layout()
    path = runs_dir / "bpd.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_from_cli(args) -> int:
    if args.summary:
        if not Path(args.summary).is_dir():
            raise SdeflowError(f"--summary: {args.summary} is not a folder of sweep runs")
        write_summary(args.summary)
        return 0
    if not args.experiment:
        raise ConfigError("sweep: give an experiment file, or --summary DIR")
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    run_sweep(args.experiment, args.runs_dir, args.overrides, only)
    return 0
