"""A sweep's folder read back: its plan (sweep.json: the variants in the experiment's order and the
baseline), each variant's state, and the summary (summary.csv/summary.md/bpd.png) with paired and
independent standard errors of every difference to the baseline (MATH.md §10)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import SdeflowError
from ..core.statistics import mean_and_se
from ..experiment.config import read_yaml
from ..experiment.files import read_json
from ..rundir.checkpoint import write_text_atomic
from ..rundir.folder import CONFIG_FILE, LAST
from ..rundir.log import METRICS, read_metrics
from ..rundir.results import per_example, read_eval
from .jobstate import variant_state

BASE = "base"


def finished(run_dir: Path, steps: int) -> bool:
    """Trained to ``steps`` and evaluated on the test split at that step (eval.json's headline)."""
    if not (run_dir / LAST).exists():
        return False
    try:
        entries = read_eval(run_dir).get("test", {})
    except SdeflowError:  # a damaged eval.json: not finished; the variant's own job says why
        return False
    return bool(entries) and min(e.get("step", 0) for e in entries.values()) >= steps


PLAN_FILE = "sweep.json"
"""The sweep's variants in the experiment's order, with their changes: the summary's source of truth."""
VARIANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def is_variant_name(name: object) -> bool:
    """Whether ``name`` can be a variant's name, which becomes its run folder's inside the runs folder."""
    return isinstance(name, str) and bool(VARIANT_NAME.fullmatch(name)) and name not in (".", "..")

COLUMNS = ["variant", "changes", "steps", "wall_s", "it_per_s", "final_loss",
           "val_bpd", "val_bpd_se", "val_delta", "val_delta_se_paired", "val_delta_se_indep", "val_rank",
           "test_bpd", "test_bpd_se", "test_delta", "test_delta_se_paired", "test_delta_se_indep", "paired_n",
           "dequantizer", "bound", "val_tail_k", "test_tail_k", "se_warning"]
"""Each bpd column names its split; deltas are to the baseline on the same examples; ``*_se_paired`` is
std(bpd_variant,i − bpd_base,i)/√n over common examples and random streams (MATH.md §10),
``*_se_indep`` √(se² + se_base²) as if the two evaluations were independent; ``val_rank`` ranks by
validation bpd (1 = best), so a variant is chosen on val and reported on test; ``dequantizer`` and
``bound`` are those the test bpd was measured with ("none" for continuous data); ``*_tail_k`` is the Pareto
shape of the per-example values' upper tail (sdeflow.core.statistics), and ``se_warning`` names the splits whose s.e.
cannot be trusted (k ≥ 0.5)."""


def own_settings_variant(data: Mapping[str, Any], variants: Sequence[Any]) -> str:
    """The baseline: ``base`` when the experiment has one, else the variant whose grid point repeats the
    file's own settings (``drift-vp`` for a file saying drift and vp), else the first variant."""
    names = [v.name for v in variants]
    if BASE in names:
        return BASE
    missing = object()

    def lookup(dotted: str) -> Any:
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part, missing) if isinstance(node, Mapping) else missing
        return node

    own = [v.name for v in variants if v.changes and all(lookup(k) == value for k, value in v.changes.items())]
    return own[0] if own else names[0]


def write_plan(runs_dir: Path, variants: Sequence[Any], baseline: str = BASE) -> Path:
    plan = {"baseline": baseline, "variants": [{"name": v.name, "changes": v.changes} for v in variants]}
    path = Path(runs_dir) / PLAN_FILE
    if path.exists():  # a rerun with --only keeps the full plan's order, adding what is new
        old = _read_plan_file(path)
        known = {v["name"] for v in old["variants"]}
        plan["variants"] = old["variants"] + [v for v in plan["variants"] if v["name"] not in known]
    write_text_atomic(path, json.dumps(plan, indent=2, default=str) + "\n")
    return path


def read_plan(runs_dir: Path) -> dict[str, Any]:
    """sweep.json, or for a folder without one, the variants found (``base`` first, then by name) with
    the changes recovered from their config.yaml files."""
    path = runs_dir / PLAN_FILE
    if path.exists():
        return _read_plan_file(path)
    changes = _changes_from_configs(runs_dir)
    names = sorted(changes, key=lambda n: (n != BASE, n))
    return {"baseline": BASE if BASE in changes else None,
            "variants": [{"name": n, "changes": changes[n]} for n in names]}


PLAN_ADVICE = "delete it to summarise from the runs' configs"


def _read_plan_file(path: Path) -> dict[str, Any]:
    """sweep.json, checked: {"baseline": name or null, "variants": [{"name": folder name, "changes": {...}}]}."""
    plan = read_json(path, "sweep plan", PLAN_ADVICE)
    variants = plan.get("variants") if isinstance(plan, dict) else None
    if not isinstance(variants, list) or not all(
            isinstance(v, dict) and is_variant_name(v.get("name")) and isinstance(v.get("changes", {}), dict)
            for v in variants):
        raise SdeflowError(f"{path}: variants: expected a list of {{name: folder name, changes: mapping}}; "
                           f"{PLAN_ADVICE}")
    if not isinstance(plan.get("baseline"), (str, type(None))):
        raise SdeflowError(f"{path}: baseline: expected a variant name or null; {PLAN_ADVICE}")
    return plan


def _row(run_dir: Path, changes: Mapping[str, Any]) -> dict[str, Any]:
    train_records = [r for r in read_metrics(run_dir) if "loss" in r]
    last = train_records[-1] if train_records else {}
    wall = last.get("elapsed_s")
    row = {"variant": run_dir.name, "changes": " ".join(f"{k}={v}" for k, v in changes.items()) or "-",
           "steps": last.get("step"), "wall_s": wall,
           "it_per_s": (last.get("step") / wall) if wall else None, "final_loss": last.get("loss")}
    try:
        evaluations = read_eval(run_dir)
    except SdeflowError as e:  # one damaged run must not hide the others: its row is blank, and says why
        warn(f"{e}; variant {run_dir.name} is summarised without results")
        evaluations = {}
    for split in ("val", "test"):
        entry = _main(evaluations.get(split, {}))
        row[f"{split}_bpd"], row[f"{split}_bpd_se"] = entry.get("bpd"), entry.get("bpd_se")
        row[f"_{split}_entry"] = entry
    protocol = row["_test_entry"].get("protocol", {})
    row["dequantizer"] = protocol.get("dequantizer", {}).get("name", "none" if protocol else None)
    row["bound"] = protocol.get("bound", "paper" if protocol else None)
    untrusted = []
    for split in ("val", "test"):
        tail = row[f"_{split}_entry"].get("tail") or {}
        row[f"{split}_tail_k"] = tail.get("pareto_k")
        if tail.get("se_trusted") is False:
            untrusted.append(f"{split} s.e. untrusted")
    row["se_warning"] = "; ".join(untrusted) or None
    return row


def warn(message: str) -> None:
    print(f"sdeflow: warning: {message}", file=sys.stderr)


def _main(entries: Mapping[str, Any]) -> dict[str, Any]:
    """The entry a summary reports: the ELBO, else the first bpd estimate (never the data's exact one)."""
    if "elbo" in entries:
        return entries["elbo"]
    return next((e for name, e in entries.items() if name != "exact" and "bpd" in e), {})


def paired_difference(run_a: Path, entry_a: Mapping[str, Any], run_b: Path, entry_b: Mapping[str, Any]
                      ) -> tuple[float, float, int] | None:
    """(mean of bpd_a,i − bpd_b,i, its paired s.e., n) over the examples both evaluated; None when
    either has no per-example record or they share no example. A damaged record is said in one line
    (which file, why) and gives None."""
    if "per_example" not in entry_a or "per_example" not in entry_b:
        return None
    try:
        a, b = per_example(run_a, entry=entry_a), per_example(run_b, entry=entry_b)
    except SdeflowError as e:
        warn(f"{e}; no paired s.e. for {run_a.name} against {run_b.name}")
        return None
    common, ia, ib = _intersect(a["index"], b["index"])
    if common == 0:
        return None
    mean, se = mean_and_se(a["bpd"][ia] - b["bpd"][ib])
    return mean, se, common


def _intersect(x, y):
    import torch

    shared = torch.tensor(sorted(set(x.tolist()) & set(y.tolist())), dtype=torch.long)
    if shared.numel() == 0:
        return 0, None, None
    return shared.numel(), torch.searchsorted(x, shared), torch.searchsorted(y, shared)


def summary_rows(runs_dir: Path, baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per variant of the plan that has a run folder, in the plan's order; differences to the
    baseline (``base``, or ``baseline``) with paired and independent standard errors."""
    plan = read_plan(runs_dir)
    rows = [_row(runs_dir / v["name"], v["changes"]) for v in plan["variants"]
            if (runs_dir / v["name"] / METRICS).exists()]
    if not rows:
        raise SdeflowError(f"{runs_dir}: no variant runs found (no */metrics.jsonl)")
    names = [r["variant"] for r in rows]
    baseline = baseline or plan.get("baseline")
    if baseline not in names:
        given = f"'{baseline}' is not among them" if baseline else "none is named 'base'"
        raise SdeflowError(f"{runs_dir}: no baseline run ({given}); name one with --baseline NAME "
                           f"(variants: {', '.join(names)})")
    base = rows[names.index(baseline)]
    for r in rows:
        for split in ("val", "test"):
            _deltas(runs_dir, r, base, split)
    ranked = sorted((r for r in rows if r["val_bpd"] is not None), key=lambda r: r["val_bpd"])
    for r in rows:
        r["val_rank"] = ranked.index(r) + 1 if r in ranked else None
    for r in rows:
        r.pop("_val_entry"), r.pop("_test_entry")
    return rows


def _deltas(runs_dir: Path, row: dict[str, Any], base: dict[str, Any], split: str) -> None:
    keys = [f"{split}_delta", f"{split}_delta_se_paired", f"{split}_delta_se_indep"]
    row.update(dict.fromkeys(keys))
    if row[f"{split}_bpd"] is None or base[f"{split}_bpd"] is None:
        return
    row[keys[0]] = row[f"{split}_bpd"] - base[f"{split}_bpd"]
    ses = (row[f"{split}_bpd_se"], base[f"{split}_bpd_se"])
    row[keys[2]] = None if None in ses else math.sqrt(ses[0] ** 2 + ses[1] ** 2)
    if row is base:
        row[keys[0]], row[keys[1]], row[keys[2]] = 0.0, 0.0, 0.0
        if split == "test":
            row["paired_n"] = row[f"_{split}_entry"].get("n")
        return
    paired = paired_difference(runs_dir / row["variant"], row[f"_{split}_entry"],
                               runs_dir / base["variant"], base[f"_{split}_entry"])
    if paired is not None:
        row[keys[0]], row[keys[1]] = paired[0], paired[1]
        if split == "test":
            row["paired_n"] = paired[2]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(runs_dir: str | Path, baseline: str | None = None) -> list[dict]:
    """summary.csv, summary.md and bpd.png in ``runs_dir``, from sweep.json and the runs' eval.json files;
    the same runs always give the same bytes."""
    runs_dir = Path(runs_dir)
    rows = summary_rows(runs_dir, baseline)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    write_text_atomic(runs_dir / "summary.csv", table.getvalue())
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    base = baseline or read_plan(runs_dir).get("baseline")
    note = (f"\nDeltas are to '{base}' on the same examples with the same random streams; paired s.e. = "
            "std of per-example differences / √n, indep. = √(se² + se_base²). val_rank ranks by "
            "validation bpd; report the test columns of the variant chosen on val.\n")
    unfinished = [f"{name} ({state})" for name, state in status_rows(runs_dir) if state != "done"]
    if unfinished:
        note += f"\nNot finished (their rows, if any, are partial): {', '.join(unfinished)}.\n"
    write_text_atomic(runs_dir / "summary.md", "\n".join(lines) + "\n" + note)
    plot_bpd(runs_dir, rows)
    print("\n".join(lines))
    if unfinished:
        print(f"not finished: {', '.join(unfinished)}")
    return rows


def _changes_from_configs(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """What each variant changed relative to base, recovered from the runs' config.yaml files."""
    from ..rundir.log import flatten

    configs = {p.name: flatten(read_yaml(p / CONFIG_FILE)) for p in runs_dir.iterdir()
               if (p / CONFIG_FILE).exists()}
    base = configs.get(BASE, {})
    skip = ("name", "sdeflow.", "plugins.", "history")
    return {name: {k: v for k, v in cfg.items() if base.get(k) != v and not k.startswith(skip)}
            for name, cfg in configs.items()}


def plot_bpd(runs_dir: Path, rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """Left: periodic bpd vs step (±1 s.e. bands), one line per variant. Right: each variant's final
    test Δbpd to the baseline with ±2 paired s.e. (dark) and ±2 independent s.e. (light)."""
    from ..evaluation.figures import new_figure, save_figure

    fig, (curves, deltas) = new_figure(2, size=5.5)
    drawn = False
    for row in rows:
        evals = [r for r in read_metrics(runs_dir / row["variant"]) if "bpd" in r]
        if not evals:
            continue
        steps = [r["step"] for r in evals]
        bpd = [r["bpd"] for r in evals]
        se = [r.get("bpd_se") or 0.0 for r in evals]
        curves.plot(steps, bpd, marker="o", label=row["variant"])
        curves.fill_between(steps, [b - s for b, s in zip(bpd, se)], [b + s for b, s in zip(bpd, se)], alpha=0.2)
        drawn = True
    with_delta = [r for r in rows if r.get("test_delta") is not None]
    if not drawn and not with_delta:
        return None
    split = {r.get("split", "val") for row in rows for r in read_metrics(runs_dir / row["variant"]) if "bpd" in r}
    curves.set_xlabel("step")
    curves.set_ylabel(f"{'/'.join(sorted(split)) or 'val'} bits per dimension (±1 s.e.)")
    if drawn:
        curves.legend(fontsize="small")
    for y, row in enumerate(with_delta):
        indep, paired = row["test_delta_se_indep"] or 0.0, row["test_delta_se_paired"]
        deltas.errorbar(row["test_delta"], y, xerr=2 * indep, fmt="none", ecolor="0.75", elinewidth=6)
        if paired is not None:
            deltas.errorbar(row["test_delta"], y, xerr=2 * paired, fmt="o", color="C0", capsize=3)
    deltas.axvline(0.0, color="k", lw=0.5)
    deltas.set_yticks(range(len(with_delta)), [r["variant"] for r in with_delta], fontsize="small")
    deltas.set_xlabel("test Δbpd to baseline (±2 s.e.: paired dark, independent light)")
    return save_figure(fig, runs_dir / "bpd.png")


def status_rows(runs_dir: Path) -> list[tuple[str, str]]:
    """(variant, state) for every variant of the sweep's plan, in its order."""
    rows = []
    for v in read_plan(runs_dir)["variants"]:
        run_dir = runs_dir / v["name"]
        steps = None
        if (run_dir / CONFIG_FILE).exists():
            with contextlib.suppress(SdeflowError):
                steps = (read_yaml(run_dir / CONFIG_FILE).get("train") or {}).get("steps")
        rows.append((v["name"], variant_state(run_dir, steps, bool(steps) and finished(run_dir, steps))))
    return rows
