"""What a run writes besides checkpoints: metrics.jsonl and TensorBoard events (main process only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import write_text_atomic

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A line that is not a JSON object with an integer ``step`` (a torn
    last line after a crash or a full disk, stray bytes) is skipped, never an error."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (they belong to work a resumed run will redo)."""
    path = Path(run_dir) / METRICS
    if path.exists():
        text = "".join(json.dumps(r) + "\n" for r in read_metrics(run_dir) if r["step"] <= last_step)
        if text.encode() != path.read_bytes():  # a finished run's file is left alone
            write_text_atomic(path, text)


class RunLog:
    """Appends one JSON object per event to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / METRICS, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step)

    def log(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(_tag(key), value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer:
            self.writer.add_text(tag, text.replace("\n", "  \n"), step)

    def config(self, config: dict[str, Any]) -> None:
        self.text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def image(self, tag: str, image, step: int) -> None:
        """``image``: a (3, H, W) float tensor in [0, 1]."""
        if self.writer:
            self.writer.add_image(tag, image, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        """Idempotent: safe to call from both the normal end and an error path."""
        self.file.close()
        if self.writer:
            self.writer.close()
            self.writer = None


def _tag(key: str) -> str:
    group = "eval" if key.removeprefix("test_") in ("bpd", "bpd_se", "elbo", "exact_bpd") else "train"
    return f"{group}/{key}"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"sde": {"name": "vp"}} → {"sde.name": "vp"} (for hparams and summaries)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
