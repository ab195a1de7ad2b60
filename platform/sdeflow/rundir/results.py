"""A run's evaluation results: ``eval.json`` and the per-example records beside it.

Format (``eval.json``, format 2)::

    {
      "format": 2,
      "test": {"elbo": ENTRY, "exact": ENTRY, ...},   # the headline of each split: per estimator,
      "val":  {...},                                  #   its latest full-split result
      "results": {KEY: ENTRY, ...}                    # every evaluation ever recorded, side by side
    }

An ENTRY holds bpd, bpd_se, nats, nats_se, n, split, estimator, step, seed, the estimator's
``settings``, ``full`` (whether it is the experiment's own evaluation: its ``eval`` settings, on the
whole split or the first ``eval.max_examples`` the experiment itself sets), ``key`` and ``per_example``: the path,
relative to the run folder, of a CSV file ``evals/KEY.csv`` with one row per example and the columns
``index`` (position in the split), ``nats`` (the bound on −log P(x) of the data, bpd·D·ln 2) and ``bpd``.
A notebook reads it with ``numpy.loadtxt(path, delimiter=",", skiprows=1)``
or ``pandas.read_csv(path)``, or with :func:`per_example` here.

KEY is ``SPLIT.ESTIMATOR.SETTINGS.stepSTEP``, SETTINGS a short hash of everything that fixes the
result besides the weights (estimator settings, seed, batch size, number of examples): a different
evaluation never replaces another one, and repeating one replaces only itself. Merges happen under a
lock on the run folder's ``.eval.lock``, so an evaluation finishing beside a training run loses
nothing.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import SdeflowError
from ..experiment.files import read_json, read_utf8
from .checkpoint import write_text_atomic

EVAL_FILE = "eval.json"
EXAMPLES_DIR = "evals"
FORMAT = 2
SPLITS = ("train", "val", "test")


@contextlib.contextmanager
def merge_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``RUN/.eval.lock`` exclusively (waiting for another merge to finish)."""
    path = Path(run_dir) / ".eval.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def settings_id(settings: Mapping[str, Any]) -> str:
    """8 hex digits naming a set of settings (stable across runs and machines)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def result_key(split: str, estimator: str, settings: Mapping[str, Any], step: int) -> str:
    return f"{split}.{estimator}.{settings_id(settings)}.step{step}"


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    """eval.json as a checked format-2 mapping (empty if absent; an older flat file is read as legacy
    entries). A file that is damaged (bad JSON, wrong types, a format-2 file without its ``format``) is
    a one-line error naming the file and the key: never read as something else, never overwritten."""
    path = Path(run_dir) / EVAL_FILE
    if not path.exists():
        return {"format": FORMAT, "results": {}}
    data = read_json(path, "eval.json", ADVICE)
    if not isinstance(data, dict):
        raise SdeflowError(f"{path}: expected a JSON object, got {type(data).__name__}; {ADVICE}")
    if "format" not in data:
        if any(key in data for key in ("results", "quality", *SPLITS)):
            raise SdeflowError(f"{path}: format: missing from a format-{FORMAT} file (it has 'results' or a "
                               f"split section); {ADVICE}")
        return _from_legacy(data)
    if not isinstance(data["format"], int) or isinstance(data["format"], bool):
        raise SdeflowError(f"{path}: format: expected an integer, got {type(data['format']).__name__} "
                           f"{str(data['format'])[:20]!r}; {ADVICE}")
    if data["format"] != FORMAT:
        raise SdeflowError(f"{path}: eval.json format {data['format']!r}, but this sdeflow reads format "
                           f"{FORMAT}; upgrade sdeflow or move the file aside")
    check_eval(data, path)
    return data


ADVICE = "move it aside to re-evaluate"

_NUMBER = (int, float)
_ENTRY_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "bpd": (_NUMBER, "a finite number"), "nats": (_NUMBER, "a finite number"),
    "bpd_se": (_NUMBER + (type(None),), "a number or null"), "nats_se": (_NUMBER + (type(None),), "a number or null"),
    "n": ((int,), "an integer"), "step": ((int,), "an integer"), "split": ((str,), "a split name"),
    "estimator": ((str,), "a string"), "key": ((str,), "a string"), "settings": ((dict,), "a mapping"),
}
_OPTIONAL_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "per_example": ((str,), "a path relative to the run folder"), "protocol": ((dict,), "a mapping"),
    "tail": ((dict,), "a mapping"), "full": ((bool,), "true or false"),
}


def check_eval(data: Mapping[str, Any], path: Path) -> None:
    """Raise a one-line SdeflowError naming the first key of a format-2 eval.json with a wrong type."""
    def fail(where: str, expected: str, value: Any) -> None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"
        raise SdeflowError(f"{path}: {where}: expected {expected}, got {type(value).__name__} {shown}; {ADVICE}")

    if not isinstance(data.get("results"), dict):
        fail("results", "a mapping of evaluations", data.get("results"))
    for key, entry in data["results"].items():
        _check_entry(entry, f"results.{key}", fail)
    for split in SPLITS:
        section = data.get(split, {})
        if not isinstance(section, dict):
            fail(split, "a mapping of estimator → result", section)
        for estimator, entry in section.items():
            _check_entry(entry, f"{split}.{estimator}", fail)
    quality = data.get("quality", {})
    if not isinstance(quality, dict) or not all(isinstance(q, dict) for q in quality.values()):
        fail("quality", "a mapping of split → metric → value", quality)


def _check_entry(entry: Any, where: str, fail: Callable[[str, str, Any], None]) -> None:
    if not isinstance(entry, dict):
        fail(where, "a result (a mapping with bpd, n, step, ...)", entry)
    for fields, required in ((_ENTRY_FIELDS, True), (_OPTIONAL_FIELDS, False)):
        for name, (types, expected) in fields.items():
            if name not in entry:
                if required:
                    fail(f"{where}.{name}", expected, None)
                continue
            value = entry[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                fail(f"{where}.{name}", expected, value)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"{where}.{name}", expected, value)
    if entry["split"] not in SPLITS:
        fail(f"{where}.split", f"one of {', '.join(SPLITS)}", entry["split"])


def _from_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """The flat eval.json of sdeflow ≤ 0.1 ({estimator: entry}) as format 2."""
    out: dict[str, Any] = {"format": FORMAT, "results": {}}
    for name, entry in data.items():
        if isinstance(entry, dict) and "bpd" in entry:
            split, step = entry.get("split", "test"), entry.get("step")
            step = step if isinstance(step, int) and not isinstance(step, bool) else 0
            if split not in SPLITS:
                continue
            key = f"{split}.{name}.legacy.step{step}"
            out["results"][key] = {**entry, "estimator": name, "split": split, "step": step, "key": key,
                                   "full": True, "settings": {}}
            out.setdefault(split, {})[name] = out["results"][key]
    return out


def headline(run_dir: str | Path, split: str = "test") -> dict[str, dict[str, Any]]:
    """{estimator: entry}: the latest full-split result of each estimator on ``split``."""
    return read_eval(run_dir).get(split, {})


def record(run_dir: str | Path, results: Mapping[str, Mapping[str, Any]], *, step: int,
           seed: int) -> dict[str, dict[str, Any]]:
    """Merge one evaluation (``evaluate``'s output for one split) into eval.json; write its
    per-example CSV files first. Returns the entries written, by estimator."""
    run_dir = Path(run_dir)
    entries = {}
    for estimator, result in results.items():
        result = dict(result)
        examples = result.pop("examples", None)
        for name in ("bpd", "bpd_se", "nats", "nats_se"):
            if result[name] is not None and not math.isfinite(result[name]):  # an s.e. of one example: None
                raise SdeflowError(f"{run_dir}: {estimator} on {result['split']} gave {name} = {result[name]}; "
                                   "nothing was recorded")
        settings = {**result.pop("settings", {}), "seed": seed}
        key = result_key(result["split"], estimator, settings, step)
        entry = {**result, "estimator": estimator, "step": step, "seed": seed, "settings": settings, "key": key}
        if examples is not None:
            entry["per_example"] = f"{EXAMPLES_DIR}/{key}.csv"
            write_text_atomic(run_dir / entry["per_example"], examples_csv(examples))
        entries[estimator] = entry
    with merged(run_dir) as data:
        for estimator, entry in entries.items():
            data["results"][entry["key"]] = entry
            best = data.setdefault(entry["split"], {}).get(estimator)
            if entry.get("full") and (best is None or entry["step"] >= best.get("step", 0)):
                data[entry["split"]][estimator] = entry
    return entries


@contextlib.contextmanager
def merged(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """eval.json, read under the merge lock, to change in place; written back atomically on exit."""
    with merge_lock(run_dir):
        data = read_eval(run_dir)
        yield data
        write_text_atomic(Path(run_dir) / EVAL_FILE, json.dumps(_ordered(data), indent=2) + "\n")


def record_quality(run_dir: str | Path, split: str, quality: Mapping[str, Mapping[str, Any]], *, step: int,
                   seed: int, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge sample-quality metrics ({metric: {value, floor, n}}) into eval.json's ``quality`` section,
    by split and metric, with the step, seed and sampler settings that produced them."""
    entries = {name: {**q, "split": split, "step": step, "seed": seed, "settings": dict(settings)}
               for name, q in quality.items()}
    for name, entry in entries.items():
        if not all(math.isfinite(entry[k]) for k in ("value", "floor")):
            raise SdeflowError(f"{run_dir}: {name} on {split} is not finite; nothing was recorded")
    with merged(run_dir) as data:
        data.setdefault("quality", {}).setdefault(split, {}).update(entries)
    return entries


def _ordered(data: dict[str, Any]) -> dict[str, Any]:
    """format, then the headline splits in a fixed order, then sample quality, then results (the easy
    reading order)."""
    out = {"format": FORMAT}
    out.update({split: data[split] for split in SPLITS if split in data})
    if "quality" in data:
        out["quality"] = data["quality"]
    out["results"] = data["results"]
    return out


def examples_csv(examples: Mapping[str, Tensor]) -> str:
    """``index,nats,bpd`` rows, full float64 precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "nats", "bpd"])
    index = examples["index"].tolist()
    nats, bpd = examples["nats"].tolist(), examples["bpd"].tolist()
    writer.writerows(zip(index, (repr(v) for v in nats), (repr(v) for v in bpd)))
    return buffer.getvalue()


def per_example(run_dir: str | Path, split: str = "test", estimator: str = "elbo",
                entry: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """{"index", "nats", "bpd"} of one recorded evaluation (default: the headline of ``split``)."""
    run_dir = Path(run_dir)
    if entry is None:
        entry = headline(run_dir, split).get(estimator)
        if entry is None:
            raise SdeflowError(f"{run_dir}: no full {split} result for estimator '{estimator}' in {EVAL_FILE}")
    if "per_example" not in entry:
        raise SdeflowError(f"{run_dir}: the {entry.get('key')} result has no per-example record")
    return read_examples(run_dir / entry["per_example"], entry.get("n"))


def read_examples(path: Path, n: int | None = None) -> dict[str, Tensor]:
    """{"index", "nats", "bpd"} of a per-example CSV; a damaged file (a missing, truncated or extra
    row, a value that is not a finite number, ``n`` rows expected and another count found) is a
    one-line error naming the file, the line and why."""
    text = read_utf8(path, "per-example record", SdeflowError)
    rows = list(csv.reader(text.splitlines()))
    if not rows or rows[0] != ["index", "nats", "bpd"]:
        found = ",".join(rows[0])[:40] if rows else "an empty file"
        raise SdeflowError(f"{path}: expected the header index,nats,bpd, got {found}")
    columns: tuple[list[int], list[float], list[float]] = ([], [], [])
    for line, row in enumerate(rows[1:], start=2):
        columns[0].append(_cell(path, line, row, 0, int))
        columns[1].append(_cell(path, line, row, 1, float))
        columns[2].append(_cell(path, line, row, 2, float))
    if n is not None and len(columns[0]) != n:
        raise SdeflowError(f"{path}: {len(columns[0])} rows, but its eval.json entry has n = {n} (truncated?)")
    return {"index": torch.tensor(columns[0], dtype=torch.long),
            "nats": torch.tensor(columns[1], dtype=torch.float64),
            "bpd": torch.tensor(columns[2], dtype=torch.float64)}


def _cell(path: Path, line: int, row: list[str], column: int, kind: type) -> Any:
    """One value of a per-example row, checked: there, of its type, finite."""
    name = ("index", "nats", "bpd")[column]
    if len(row) != 3:
        raise SdeflowError(f"{path}: line {line}: expected 3 values (index,nats,bpd), got {len(row)} (truncated?)")
    try:
        value = kind(row[column])
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)):
        raise SdeflowError(f"{path}: line {line}: {name} is {row[column][:30]!r}, expected a finite number")
    return value
