"""A run folder and what can be done with it: its lock, its config and the history of its settings,
its checkpoints (last, previous), and rebuilding the experiment to evaluate or sample from it."""

from __future__ import annotations

import copy
import fcntl
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml

from . import hookspecs
from .build import Parts, build_data, build_model, check_experiment, require_lambda_sampler
from .checkpoint import UnreadableCheckpoint, load, write_error
from .config import Experiment, build_component, check_component, read_yaml, structure
from .distributed import DistContext
from .errors import ConfigError, InvalidArgument, SdeflowError
from .estimators import make_estimators
from .evaluate import evaluate
from .figures import save_samples, save_trajectories
from .interfaces import DataBundle
from .model import DiffusionModel
from .registry import Registry, default_registry
from .runlog import flatten

CONFIG_FILE = "config.yaml"
LAST = Path("checkpoints") / "last.pt"
PREVIOUS = Path("checkpoints") / "previous.pt"
LOCK_FILE = ".lock"
RECORDS = ("plugins", "history")
"""Keys of config.yaml that record the run rather than configure it."""


class RunBusy(SdeflowError):
    """Another process is writing this run folder."""


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class RunLock:
    """An exclusive OS lock (``flock``) on ``RUN/.lock``, held by the one process that writes the run.

    The OS drops it when that process exits or is killed, so a dead run never leaves a stale lock.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(self.path.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunBusy(f"{self.path.parent}: in use by {holder}; wait for it to finish or use "
                          "another --run-dir") from None
        if os.fstat(fd).st_ino != _inode(self.path):  # the folder was moved aside (--restart) meanwhile
            os.close(fd)
            return self.acquire()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"sdeflow PID {os.getpid()} on host {socket.gethostname()} (since {stamp})\n".encode())
        except OSError as e:
            os.close(fd)
            raise write_error(self.path.parent, e) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def resolve_device(name: str, source: str = "config") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: device: 'cuda' requested but CUDA is not available here")
    return torch.device(name)


@attrs.define
class Run:
    """An experiment built in a run folder: components, data, the model and its EMA copy."""

    exp: Experiment
    run_dir: Path
    parts: Parts
    data: DataBundle
    model: DiffusionModel
    ema: DiffusionModel
    device: torch.device
    registry: Registry
    ctx: DistContext = attrs.field(factory=DistContext)
    step: int = 0
    """Training steps behind the loaded weights."""

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / LAST

    def evaluate(self, *, split: str = "test", max_examples: int | None = None, samples: int | None = None,
                 estimator: str | None = None, time_sampler: str | None = None,
                 batch_size: int | None = None) -> dict[str, Any]:
        """Every named estimator on ``split``: summaries, per-example values and the settings that
        (with the seed) fix the result."""
        cfg = self.exp.eval
        estimators = self.estimators(estimator or cfg.estimator, time_sampler, samples)
        batch_size = cfg.batch_size if batch_size is None else batch_size
        max_examples = max_examples if max_examples is not None else cfg.max_examples
        self.ema.eval()
        results = evaluate(self.ema, self.data, estimators, batch_size=batch_size, seed=self.exp.seed,
                           device=self.device, ctx=self.ctx, split=split, max_examples=max_examples,
                           pilot_examples=cfg.pilot_examples)
        # The headline is the experiment's own evaluation (its eval settings: examples, K, time sampler,
        # batches); a result with other settings (--max-examples 200) is kept beside it, never in its place.
        own = (max_examples == cfg.max_examples and batch_size == cfg.batch_size
               and samples in (None, cfg.samples_per_example) and time_sampler in (None, cfg.time_sampler))
        for name, result in results.items():
            result["full"] = own
            result["protocol"] = {"weights": "ema", **self.data.transform.protocol(),
                                  "se": "std of per-example bpd / sqrt(n)"}
            estimate = estimators.get(name)
            result["settings"] = {**getattr(estimate, "settings", {}), "batch_size": batch_size,
                                  "max_examples": max_examples}
            if getattr(estimate, "nfe", None):  # ODE solves: report their cost
                result["nfe"] = sum(estimate.nfe) / len(estimate.nfe)
            if getattr(estimate, "fitted", None):  # what the pilot pass fitted (weights, proposal)
                result["fitted"] = estimate.fitted
        return results

    def estimators(self, which: str, time_sampler: str | None = None, samples: int | None = None) -> dict:
        """The estimators named in ``which`` (comma-separated), each with its ``settings``."""
        cfg = self.exp.eval
        ts = self.parts.eval_time_sampler
        if time_sampler:
            ts = self.registry.get("time_sampler", time_sampler, where="--time-sampler").factory()
        try:
            return make_estimators(which, cfg, ts, samples=samples, time_sampler_name=time_sampler or cfg.time_sampler,
                                   sde=self.ema.sde)
        except InvalidArgument as e:
            key = "--estimator" if e.argument == "estimator" else f"eval.{e.argument}"
            raise ConfigError(f"{self.exp.source}: {key}: {e.message}") from None

    def sampler(self, lam: float | None = None, name: str | None = None):
        """The experiment's sampler (or the registered sampler ``name`` with its defaults), with λ
        replaced when given (the sampler must take ``lam``)."""
        spec = dict(self.exp.components["sampler"]) if name is None else {"name": name}
        if lam is not None:
            if name is None:
                require_lambda_sampler(self.registry, self.exp, "--lam")
            spec["lam"] = lam
        checked = check_component(self.registry, "sampler", spec, f"{self.run_dir}/{CONFIG_FILE}"
                                  if name is None else "sampler")
        exp = attrs.evolve(self.exp, components={**self.exp.components, "sampler": checked})
        return build_component(self.registry, exp, "sampler")

    @torch.no_grad()
    def draw(self, sampler, num: int, *, steps: int | None = None, seed: int = 0, trajectory: bool = False):
        """Samples in data space (and, with ``trajectory``, every state of the sampler in model space)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        x_T = self.ema.prior_sample((num, *self.data.shape), generator=generator, device=self.device)
        ts = sampler.time_grid(self.ema.sde, steps)
        self.ema.eval()
        if trajectory:
            z, states = sampler.trajectory(self.ema, x_T, ts, generator=generator)
            return self.data.transform.inverse(z), states
        return self.data.transform.inverse(sampler.sample(self.ema, x_T, ts, generator=generator)), None

    def save_samples(self, path: Path, *, num: int, lam: float | None = None, steps: int | None = None,
                     seed: int = 0) -> Path:
        sampler = self.sampler(lam)
        x, _ = self.draw(sampler, num, steps=steps, seed=seed)
        used = getattr(sampler, "lam", None)
        return save_samples(x, self.data.kind, path, title="samples" if used is None else f"samples (λ = {used:g})")

    def save_trajectories(self, path: Path, *, num: int, steps: int | None = None, seed: int = 0) -> Path:
        paths = {}
        for lam in (0.0, 1.0):
            _, states = self.draw(self.sampler(lam), num, steps=steps, seed=seed, trajectory=True)
            paths[f"λ = {lam:g}" + (" (reverse SDE)" if lam == 0 else " (probability-flow ODE)")] = states
        return save_trajectories(paths, path)


def build_run(exp: Experiment, run_dir: str | Path, *, registry: Registry | None = None,
              ctx: DistContext | None = None) -> Run:
    """Check, load data and build the model (seeded), without touching the run folder."""
    registry = registry or default_registry()
    parts = check_experiment(exp, registry)
    device = ctx.device if ctx else resolve_device(exp.device, exp.source)
    data = build_data(exp, registry)
    torch.manual_seed(exp.seed)  # identical initial weights on every rank and every restart
    model = build_model(exp, parts.sde, data.shape, registry).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    return Run(exp, Path(run_dir), parts, data, model, ema, device, registry, ctx or DistContext(device=device))


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """config.yaml of a run, without its records (plugins, history)."""
    data = read_run_records(run_dir)
    return {k: v for k, v in data.items() if k not in RECORDS}


def read_run_records(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise SdeflowError(f"{run_dir}: not a run folder (no {CONFIG_FILE})")
    return read_yaml(path)


def recorded_plugins(run_dir: str | Path) -> dict[str, str]:
    """{kind: plugin} that supplied each component of an existing run (empty if there is no run)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}
    plugins = read_yaml(path).get("plugins") or {}
    return {kind: p["plugin"] for kind, p in plugins.items() if isinstance(p, dict) and "plugin" in p}


def open_run(run_dir: str | Path, registry: Registry | None = None, notice: Callable[[str], None] | None = None
             ) -> Run:
    """A trained run, rebuilt from its config.yaml, with weights (EMA) from its newest usable checkpoint."""
    registry = registry or default_registry()
    source = str(Path(run_dir) / CONFIG_FILE)
    exp = structure(read_run_config(run_dir), source, registry, prefer=recorded_plugins(run_dir))
    run = build_run(exp, run_dir, registry=registry)

    def apply(state: dict[str, Any]) -> None:
        run.model.load_state_dict(state["model"])
        run.ema.load_state_dict(state["ema"])
        run.step = int(state["step"])

    if restore(run.run_dir, apply, notice or say) is None:
        raise UnreadableCheckpoint(f"{run.run_dir / LAST}: no checkpoint there (has the run saved one yet?)")
    return run


def say(message: str) -> None:
    import sys

    print(f"sdeflow: {message}", file=sys.stderr)


def restore(run_dir: Path, apply: Callable[[dict[str, Any]], None], notice: Callable[[str], None], *,
            set_aside: bool = False) -> dict[str, Any] | None:
    """Load the newest usable checkpoint (last.pt, else previous.pt) through ``apply``; None if the run
    has none. An unusable one is reported in one line and, with ``set_aside`` (the run's writer only),
    renamed ``*.unreadable-STAMP.pt`` so the next save cannot push the good previous one out."""
    problems = []
    for rel in (LAST, PREVIOUS):
        path = run_dir / rel
        if not path.exists():
            continue
        try:
            state = load(path, map_location="cpu")
            apply(state)
        except UnreadableCheckpoint as e:
            problems.append((path, str(e)))
            continue
        except (RuntimeError, KeyError, ValueError, TypeError) as e:  # load_state_dict: not this model
            reason = " ".join(str(e).split())[:160]
            problems.append((path, f"{path}: does not fit this run's model ({type(e).__name__}: {reason})"))
            continue
        if problems:
            notice(f"{problems[0][1]}; resuming from {path} (step {int(state['step'])}) instead")
            if set_aside:
                for bad, _ in problems:
                    os.replace(bad, bad.with_name(f"{bad.stem}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.pt"))
        return state
    if problems:
        raise UnreadableCheckpoint(f"{'; '.join(text for _, text in problems)}; no usable checkpoint is left: "
                                   "--restart moves this run aside and starts afresh")
    return None


# ---------------------------------------------------------------- resuming honestly

REFUSED = ("seed", "train.batch_size")
"""Settings whose change on resume breaks exact resume (besides any component's), refused unless allowed."""
HARMLESS = ("sampler.", "data.root", "data.download")
"""Component settings that do not touch training: how samples are drawn, where the data lies."""


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every setting that differs (ablations and sweep grids excluded)."""
    skip = ("ablations", "sweep", "launcher")
    a = flatten({k: v for k, v in old.items() if k not in skip})
    b = flatten({k: v for k, v in new.items() if k not in skip})
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def qualified_components(config: Mapping[str, Any], registry: Registry, prefer: Mapping[str, str]
                         ) -> dict[str, Any]:
    """``config`` with each component's name written ``plugin:name``, so ``vp`` and ``builtin-sdes:vp``
    compare equal (a name no installed plugin registers is left as it is)."""
    out = dict(config)
    for kind in hookspecs.KINDS:
        spec = out.get(kind)
        if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
            try:
                component = registry.get(kind, spec["name"], prefer=prefer.get(kind))
            except ConfigError:
                continue
            out[kind] = {**spec, "name": component.qualified_name}
    return out


def breaks_exact_resume(key: str, components: Mapping[str, Any]) -> bool:
    if key.startswith(HARMLESS):
        return False
    return key in REFUSED or key.split(".", 1)[0] in components


def history_entry(changes: Mapping[str, tuple[Any, Any]], from_step: int, to_step: int) -> dict[str, Any]:
    """One step range of config.yaml's ``history``: the values the changed settings had then."""
    return {"from_step": from_step, "to_step": to_step, "settings": {k: old for k, (old, _) in changes.items()}}


def dump_config(exp: Experiment, plugins: dict[str, Any], history: list[dict[str, Any]] | None = None) -> str:
    records: dict[str, Any] = {"plugins": plugins}
    if history:
        records["history"] = history
    return yaml.safe_dump({**exp.to_dict(), **records}, sort_keys=False, allow_unicode=True)
