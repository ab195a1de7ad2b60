"""A run folder and what can be done with it: rebuild the experiment, load weights, evaluate, sample."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml

from .build import Parts, build_data, build_model, check_experiment, require_lambda_sampler
from .checkpoint import load
from .config import Experiment, build_component, check_component, read_yaml, structure
from .distributed import DistContext
from .errors import ConfigError, SdeflowError
from .evaluate import elbo_estimator, evaluate
from .figures import save_samples, save_trajectories
from .interfaces import DataBundle
from .likelihood import ode_estimator
from .model import DiffusionModel
from .registry import Registry, default_registry

CONFIG_FILE = "config.yaml"
LAST = Path("checkpoints") / "last.pt"


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
        cfg = self.exp.eval
        estimators = self.estimators(estimator or cfg.estimator, time_sampler, samples)
        self.ema.eval()
        results = evaluate(self.ema, self.data, estimators,
                           batch_size=cfg.batch_size if batch_size is None else batch_size,
                           seed=self.exp.seed, device=self.device, ctx=self.ctx, split=split,
                           max_examples=max_examples if max_examples is not None else cfg.max_examples)
        for name, estimate in estimators.items():
            if getattr(estimate, "nfe", None):  # ODE solves: report their cost
                results[name]["nfe"] = sum(estimate.nfe) / len(estimate.nfe)
        return results

    def estimators(self, which: str, time_sampler: str | None = None, samples: int | None = None) -> dict:
        cfg = self.exp.eval
        ts = self.parts.eval_time_sampler
        if time_sampler:
            ts = self.registry.get("time_sampler", time_sampler, where="--time-sampler").factory()
        out = {}
        if which in ("elbo", "both"):
            out["elbo"] = elbo_estimator(cfg, ts, samples)
        if which in ("ode", "both"):
            out["ode"] = ode_estimator(cfg)
        return out

    def sampler(self, lam: float | None = None):
        """The experiment's sampler, with λ replaced when given (the sampler must take ``lam``)."""
        spec = dict(self.exp.components["sampler"])
        if lam is not None:
            require_lambda_sampler(self.registry, self.exp, "--lam")
            spec["lam"] = lam
        checked = check_component(self.registry, "sampler", spec, f"{self.run_dir}/{CONFIG_FILE}")
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
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise SdeflowError(f"{run_dir}: not a run folder (no {CONFIG_FILE})")
    data = read_yaml(path)
    data.pop("plugins", None)
    return data


def open_run(run_dir: str | Path, registry: Registry | None = None) -> Run:
    """A trained run, rebuilt from its config.yaml, with weights (EMA) from checkpoints/last.pt."""
    registry = registry or default_registry()
    exp = structure(read_run_config(run_dir), str(Path(run_dir) / CONFIG_FILE), registry)
    run = build_run(exp, run_dir, registry=registry)
    state = load(run.checkpoint_path, map_location="cpu")
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.step = int(state["step"])
    return run


def dump_config(exp: Experiment, plugins: dict[str, Any]) -> str:
    return yaml.safe_dump({**exp.to_dict(), "plugins": plugins}, sort_keys=False, allow_unicode=True)
