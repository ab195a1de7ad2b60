"""Tiny experiments for tests of configs, training and the run commands: a YAML writer, a CLI runner,
and helpers that read a run folder back (losses per step, checkpoint bytes, file snapshots)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from sdeflow.cli.commands import main
from sdeflow.rundir.log import read_metrics

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "gaussian", "dim": 2, "n": 256, "n_test": 64},
    "sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0},
    "network": {"name": "mlp", "hidden": 16, "depth": 1},
    "sampler": {"name": "euler_maruyama", "steps": 8},
    "train": {"steps": 4, "batch_size": 32, "lr": 1.0e-3, "log_every": 1, "checkpoint_every": 2},
    "eval": {"batch_size": 64, "max_examples": 16},
    "sample": {"num": 16},
    "logging": {"progress": False, "tensorboard": False},
}
"""A 2-D Gaussian, a 16-unit MLP, 4 steps: a whole run takes well under a second on a CPU."""


def tiny_config(**sections: dict[str, Any] | Any) -> dict[str, Any]:
    """TINY with each given section merged in (a mapping updates the section, anything else replaces it)."""
    config = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict) and "name" not in value:
            config[key].update(value)
        else:
            config[key] = value
    return config


def write_experiment(folder: Path, config: dict[str, Any] | None = None, filename: str = "tiny.yaml",
                     **sections: Any) -> Path:
    """Write ``config`` (default: :func:`tiny_config` of ``sections``) as YAML into ``folder``."""
    path = Path(folder) / filename
    path.write_text(yaml.safe_dump(config if config is not None else tiny_config(**sections), sort_keys=False))
    return path


def run_cli(capsys, *argv: Any) -> tuple[int, str, str]:
    """``sdeflow ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str, notices: bool = False) -> None:
    """Exit status 2, exactly one line on stderr, no traceback, and every fragment in that line.

    With ``notices``, earlier ``sdeflow: ...`` progress notices (e.g. "resuming ...") are allowed.
    """
    assert status == 2, err
    lines = err.strip().splitlines()
    if notices:
        lines = [line for line in lines if not line.startswith("sdeflow: ") or line.startswith("sdeflow: error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("sdeflow: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in metrics.jsonl, in order."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


LOCKS = (".lock", ".eval.lock")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes (the run's lock files, which say
    who holds the run, aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in LOCKS}


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Killed(BaseException):
    """Stands for the process being killed (a kill, a crash in a kernel, an out-of-memory): no handler
    catches it, not even the CLI's last-resort one."""


def die_at_step(monkeypatch, step: int) -> None:
    """Make training die (:class:`Killed`) as it would take step ``step`` (1-based), before any of its work."""
    from sdeflow.training.trainer import Trainer

    honest_step = Trainer.train_step

    def dies(self, x):
        if self.step == step - 1:
            raise Killed
        return honest_step(self, x)

    monkeypatch.setattr(Trainer, "train_step", dies)


def finished_run(tmp_path: Path, capsys) -> tuple[Path, Path]:
    """A finished tiny run (4 steps, checkpoints at 2 and 4) trained by the CLI: (experiment file, run folder)."""
    path = write_experiment(tmp_path)
    run = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    return path, run
