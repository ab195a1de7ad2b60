"""Ablations and sweeps: expand one experiment into named variants, run them, compare them in a table.

Precedence of settings, lowest first: the YAML file, the variant's ablation ``set``, its ``sweep``
grid values, and the command line's ``key=value`` overrides (the user's last word wins).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..assembly.build import check_experiment
from ..assembly.run import resolve_device
from ..components.registry import Registry, default_registry
from ..core.distributed import DistContext, init_from_env, shutdown
from ..core.errors import ConfigError, SdeflowError
from ..experiment.config import Experiment, apply_overrides, parse_override, read_yaml, structure
from ..rundir.folder import OUTSIDE_RESULTS, changes_since
from ..rundir.log import METRICS
from ..training.preemption import Stopped
from .jobstate import is_locked
from .summary import BASE, finished, is_variant_name, own_settings_variant, write_plan, write_summary


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
        if not is_variant_name(item["name"]):
            raise ConfigError(f"{source}: ablations[{i}].name: {item['name']!r} becomes a folder of the runs folder; "
                              "expected letters, digits, '.', '_' or '-' (no '/', no '..')")
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
    base = {k: v for k, v in data.items() if k not in ("ablations", "sweep", "launcher")}
    for v in variants:
        source = f"{path} [variant '{v.name}']"
        config = apply_overrides(base, {**v.changes, **cli}, source)
        config["name"] = f"{data.get('name', Path(path).stem)}/{v.name}"
        v.exp = structure(config, source, registry)
        check_experiment(v.exp, registry)
    return variants


def run_sweep(path: str | Path, runs_dir: str | Path | None = None, overrides: Sequence[str] = (),
              only: Sequence[str] | None = None, launcher: str | None = None, jobs: int | None = None) -> Path:
    """Check every variant, run the unfinished ones with the launcher (the YAML's ``launcher:`` section,
    or ``launcher``/``jobs``), then write the summary. Under torchrun the sequential launcher runs each
    variant distributed. A failed variant does not stop the others (:class:`VariantsFailed` at the end);
    a stop signal does (:class:`SweepStopped`, after every running variant saved)."""
    from .launchers import read_launcher

    data = read_yaml(path)
    cfg = read_launcher(data, str(path), launcher, jobs)
    variants = prepare(path, overrides, only)
    runs_dir = Path(runs_dir or Path("runs") / data.get("name", Path(path).stem))
    ctx = init_from_env(resolve_device(variants[0].exp.device, variants[0].exp.source))
    if ctx.active and cfg.name != "sequential":
        shutdown(ctx)
        raise ConfigError(f"{path}: launcher.name: the {cfg.name} launcher starts the distributed jobs itself; "
                          "run the sweep in one process, not under torchrun")
    try:
        return _run_variants(data, str(path), variants, runs_dir, cfg, ctx)
    finally:
        shutdown(ctx)


def refuse_stale(variant: Variant, run_dir: Path) -> None:
    """A finished variant whose definition changed since it ran (an edited ``set:``, grid or base file)
    is never reported under the new one: one line naming the settings and what to do."""
    _, _, changes = changes_since(run_dir, variant.exp, default_registry())
    stale = {k: v for k, v in changes.items() if not k.startswith(OUTSIDE_RESULTS)}
    if stale:
        shown = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in list(stale.items())[:3])
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise ConfigError(f"{run_dir}: variant '{variant.name}' finished under other settings ({shown}{more}); "
                          "its results would be summarised under the new definition: move the folder aside "
                          "to rerun it, or undo the change")


WAIT_POLL_S = 1.0


def _wait_for_elsewhere(outcome: dict[str, Any], runs_dir: Path, steps: int) -> dict[str, Any]:
    """A variant another controller was running (two sweeps on one folder): wait for it to let go,
    then count it done if it finished, else failed (run the sweep again to resume it)."""
    if outcome["state"] != "elsewhere":
        return outcome
    run_dir = runs_dir / outcome["variant"]
    print(f"sdeflow: variant '{outcome['variant']}' is being run by another process; waiting for it", flush=True)
    while is_locked(run_dir):
        time.sleep(WAIT_POLL_S)
    if finished(run_dir, steps):
        return {"variant": outcome["variant"], "state": "done"}
    return {"variant": outcome["variant"], "state": "failed",
            "message": "the other process running it stopped before it finished; run the sweep again to resume it"}


class SweepStopped(Stopped):
    """A stop signal ended the sweep; every variant it was running saved a checkpoint."""


class VariantsFailed(SdeflowError):
    """Some variants failed; the others ran and are summarised."""

    exit_code = 1


def _run_variants(data, source: str, variants: list[Variant], runs_dir: Path, cfg, ctx: DistContext) -> Path:
    from .launchers import VariantJob, launch

    if ctx.is_main:
        write_plan(runs_dir, variants, own_settings_variant(data, expand(data, source)))
    jobs = []
    steps = {v.name: v.exp.train.steps for v in variants}
    for v in variants:
        run_dir = runs_dir / v.name
        if finished(run_dir, v.exp.train.steps):
            refuse_stale(v, run_dir)
            if ctx.is_main:
                print(f"sdeflow: variant '{v.name}' already finished in {run_dir}; skipping")
            continue
        jobs.append(VariantJob(v.name, v.exp.to_dict(), v.exp.source, str(run_dir)))
    outcomes = launch(cfg, jobs, runs_dir, ctx)
    if ctx.is_main:
        outcomes = [_wait_for_elsewhere(o, runs_dir, steps[o["variant"]]) for o in outcomes]
    if not ctx.is_main or any(o["state"] == "submitted" for o in outcomes):
        return runs_dir
    if any((runs_dir / v.name / METRICS).exists() for v in variants):
        write_summary(runs_dir)
    failed = [o for o in outcomes if o["state"] == "failed"]
    stopped = [o["variant"] for o in outcomes if o["state"] == "stopped"]
    if stopped:
        raise SweepStopped(f"sweep stopped by a signal; saved mid-run: {', '.join(stopped)}; run the same "
                           f"command again to resume (sdeflow sweep --status {runs_dir})")
    if failed:
        raise VariantsFailed(f"{len(failed)} variant(s) failed: " + "; ".join(
            f"{o['variant']}: {o.get('message', '')}" for o in failed) + f" (the others are in {runs_dir})")
    return runs_dir
