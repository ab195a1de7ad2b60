"""The Python API, for notebooks and scripts: what the CLI does, as functions and a :class:`Run`.

    import sdeflow
    exp = sdeflow.experiment("experiments/swissroll.yaml", {"train.steps": 500})
    run = sdeflow.train(exp)                 # a temporary run folder; run.train(steps=500) goes on
    run.bpd(run.data.test[:256])             # per-example bits/dim of a batch in data space
    run.sample(1000, lam=1.0)                # probability-flow ODE samples

Errors are the CLI's, raised as :class:`sdeflow.core.errors.SdeflowError` (a :class:`ConfigError` for bad
settings) with the same one-line text.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from torch import Tensor

from .assembly import run as runs
from .assembly.build import advice, check_experiment
from .components.registry import INJECTED, default_registry
from .core import hookspecs
from .core.batches import num_examples, take
from .core.errors import ConfigError, InvalidArgument, SdeflowError, blame_overrides
from .evaluation.evaluate import batch_nll, format_results, prepare_on_pilot, summarize
from .evaluation.figures import image_grid, new_figure, samples_figure, trajectories_figure
from .evaluation.quality import format_quality, parse_metrics, run_quality
from .experiment.config import Experiment, apply_overrides, check_component, load_experiment, structure
from .rundir import folder as runfolder
from .rundir.log import read_metrics
from .rundir.results import headline, record, record_quality
from .training import trainer

MAPPING_SOURCE = "<mapping>"


def experiment(source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None, /, *,
               where: str = "overrides", **sections: Any) -> Experiment:
    """A checked experiment from a YAML file or a mapping, with dotted ``overrides``
    (``{"train.steps": 500}``) and whole sections as keywords (``sde={"name": "subvp"}``, ``seed=1``).

    Keywords are applied first, then ``overrides``; a section given as a mapping sets only the keys it
    names, as the dotted form would. Nothing is built and no data is loaded. An error about a value an
    override set names ``where`` instead of the file.
    """
    dotted = dict(_dotted(sections))
    dotted.update(overrides or {})
    source_name = MAPPING_SOURCE if isinstance(source, Mapping) else str(source)
    try:
        if isinstance(source, Mapping):
            data = apply_overrides(dict(source), dotted, MAPPING_SOURCE)
            exp = structure(data, MAPPING_SOURCE, default_registry(),
                            default_name=str(source.get("name", "experiment")))
        else:
            exp = load_experiment(source, dotted)
        parts = check_experiment(exp)  # every check of `sdeflow check`: values, combinations, run settings
    except ConfigError as e:
        raise blame_overrides(e, source_name, dotted, where) from None
    for line in advice(exp, parts):
        warnings.warn(line, SdeflowAdvice, stacklevel=2)
    return exp


class SdeflowAdvice(UserWarning):
    """Settings that are valid but almost surely not what was meant (``sdeflow check`` prints them)."""


def _dotted(sections: Mapping[str, Any], prefix: str = ""):
    for key, value in sections.items():
        if isinstance(value, Mapping) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def component(kind: str, name: str, /, **args: Any):
    """One built component, its arguments checked as YAML's are: ``component("sde", "vp", beta_max=10)``.

    Components the kernel normally wires pass their inputs here too: a network takes ``data_shape``,
    a parameterization ``network`` and ``sde``.
    """
    registry = default_registry()
    if kind not in hookspecs.KINDS:
        raise ConfigError(f"component: unknown kind {kind!r}; kinds: {', '.join(hookspecs.KINDS)}")
    injected = {k: args.pop(k) for k in INJECTED.get(kind, ()) if k in args}
    missing = [k for k in INJECTED.get(kind, ()) if k not in injected]
    if missing:
        raise ConfigError(f"component: {kind} '{name}' needs {', '.join(missing)} (the kernel's inputs to a {kind})")
    checked = check_component(registry, kind, {"name": name, **args}, "component")
    try:
        return registry.get(kind, name).factory(**injected, **{k: v for k, v in checked.items() if k != "name"})
    except InvalidArgument as e:
        raise ConfigError(f"component: {kind}.{e.argument}: {e.message}") from None


def train(exp: Experiment, run_dir: str | Path | None = None, *, steps: int | None = None, progress: bool = True,
          restart: bool = False) -> Run:
    """Train ``exp`` in ``run_dir`` (default: a new temporary folder), resuming what is there, and
    return the :class:`Run`. With ``steps``, train that many steps beyond the folder's checkpoint (so a
    notebook trains in chunks); each call ends, like ``sdeflow train``, by evaluating and sampling."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"sdeflow-{exp.name}-")) if run_dir is None else Path(run_dir)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"train: steps: must be at least 1, got {steps}")
        done = 0 if restart else trained_steps(run_dir)
        exp = attrs.evolve(exp, train=attrs.evolve(exp.train, steps=done + steps))
    exp = attrs.evolve(exp, logging=attrs.evolve(exp.logging, progress=progress))
    trainer.train(exp, run_dir, restart=restart)
    return open_run(run_dir)


def trained_steps(run_dir: str | Path) -> int:
    """Training steps behind a run folder's newest usable checkpoint (0 when it has none)."""
    steps: list[int] = []
    if (Path(run_dir) / runfolder.CONFIG_FILE).exists():
        runfolder.restore(Path(run_dir), lambda state: steps.append(int(state["step"])), runfolder.say)
    return steps[0] if steps else 0


def open_run(path: str | Path) -> Run:
    """A trained run folder, with its EMA weights loaded: the :class:`Run` to evaluate and sample."""
    return Run(runs.open_run(path))


class Run:
    """A trained run folder in Python: its experiment, data, model and EMA model, its records, and the
    evaluations, samples and figures the CLI writes (here returned, and written only when asked)."""

    def __init__(self, built: runs.Run):
        self._run = built

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, step={self.step})"

    # ------------------------------------------------------------------ what it holds

    @property
    def path(self) -> Path:
        """The run folder: where its records are written (followed if ``train --restart`` moves it aside)."""
        return self._run.records_dir()

    @property
    def exp(self) -> Experiment:
        return self._run.exp

    @property
    def step(self) -> int:
        return self._run.step

    @property
    def data(self):
        """The :class:`~sdeflow.DataBundle`: ``train``, ``val``, ``test`` (data space), ``transform``."""
        return self._run.data

    @property
    def model(self):
        """The trained weights' :class:`~sdeflow.DiffusionModel` (in eval mode)."""
        return self._run.model.eval()

    @property
    def ema(self):
        """The EMA weights' model: the one evaluations and samples use."""
        return self._run.ema.eval()

    @property
    def built(self) -> runs.Run:
        """The kernel's view of the run (registry, device, parts), for code that extends sdeflow."""
        return self._run

    @property
    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The headline results of eval.json by split and estimator (``run.results["test"]["elbo"]["bpd"]``)."""
        return {split: headline(self.path, split) for split in ("val", "test")}

    def examples(self, split: str = "test", n: int | None = None) -> Tensor:
        """The first ``n`` examples of ``split`` (default: all) as one tensor in data space: the batch
        the evaluation sees first."""
        examples = getattr(self.data, split, None)
        if examples is None:
            raise SdeflowError(f"{self.path}: the data set has no {split} split")
        return take(examples, range(min(n, num_examples(examples)) if n is not None else num_examples(examples)))

    def train(self, steps: int | None = None, *, progress: bool = True) -> Run:
        """Train further in this folder (``steps`` more; default: to the experiment's train.steps)."""
        self._run = train(self.exp, self.path, steps=steps, progress=progress)._run
        return self

    # ------------------------------------------------------------------ likelihood of a batch

    def elbo(self, x: Tensor, *, estimator: str = "elbo", samples: int | None = None, seed: int = 0) -> Tensor:
        """Per-example lower bound on log P(x) of the data in nats (bpd·D·ln 2 with the sign turned), for a batch
        ``x`` in data space (the data set's transform, dequantization and bin offset included, as in
        evaluation; MATH.md §5, §9, §15)."""
        return -self._per_example(x, estimator, samples, seed)["nats"]

    def bpd(self, x: Tensor, *, estimator: str = "elbo", samples: int | None = None, seed: int = 0) -> Tensor:
        """Per-example bits per dimension (the upper bound the ELBO gives) of a batch in data space."""
        return self._per_example(x, estimator, samples, seed)["bpd"]

    def _per_example(self, x: Tensor, estimator: str, samples: int | None, seed: int) -> dict[str, Tensor]:
        run = self._run
        estimators = run.estimators(estimator, samples=samples)
        if len(estimators) != 1:
            raise SdeflowError(f"estimator: one name, got {estimator!r} (Run.evaluate takes several)")
        space, _, _ = run.space()
        prepare_on_pilot(estimators, self.ema, run.data, pilot_examples=run.exp.eval.pilot_examples, seed=seed,
                         device=run.device, space=space)
        nll, log_det, log_q = batch_nll(self.ema, space, estimators, x.to(run.device), batch=0, seed=seed,
                                        device=run.device)
        (values,) = nll.values()
        return summarize(values, log_det, math.prod(run.data.shape), space.bits_offset, log_q=log_q)["examples"]

    def evaluate(self, split: str = "test", *, estimator: str | None = None, max_examples: int | None = None,
                 samples: int | None = None, time_sampler: str | None = None, batch_size: int | None = None,
                 dequantizer: str | Mapping[str, Any] | None = None, bound: str | None = None, save: bool = True,
                 show: bool = True) -> dict[str, dict[str, Any]]:
        """``sdeflow eval``: every named estimator (default: the experiment's) over ``split``, each result
        with its bpd, s.e., settings and ``examples`` (per-example index, nats, bpd). ``dequantizer`` (a
        name or a ``{name, **args}`` spec) evaluates discrete data under another one than the
        experiment's; ``bound`` (paper, discrete, truncated) evaluates the model under another bound (MATH.md
        §15). With ``save`` it is recorded in eval.json beside the others."""
        results = self._run.evaluate(split=split, estimator=estimator, max_examples=max_examples, samples=samples,
                                     time_sampler=time_sampler, batch_size=batch_size, dequantizer=dequantizer,
                                     bound=bound)
        if show:
            print(format_results(results, self.data.kind))
        if save:
            record(self.path, results, step=self.step, seed=self.exp.seed)
        return results

    def quality(self, metrics: str = "swd,mmd", *, split: str = "test", n: int | None = None, seed: int = 0,
                save: bool = True, show: bool = True) -> dict[str, dict[str, float]]:
        """Sample quality (``sdeflow eval --metrics``): {metric: {value, floor, n}} of ``n`` samples
        against ``split``. swd and mmd (default n: ``sample.num``) have two held-out halves as floor; fid
        and kid (images; default n: ``eval.fid_samples``) compare Inception features with the training
        images' cached statistics, the floor being ``split`` itself. Recorded in eval.json's
        ``quality`` section with ``save``."""
        try:
            values, settings = run_quality(self._run, parse_metrics(metrics), split=split, n=n, seed=seed)
        except InvalidArgument as e:
            raise ConfigError(f"{e.argument}: {e.message}") from None
        if show:
            print(format_quality(values, split))
        if save:
            record_quality(self.path, split, values, step=self.step, seed=seed, settings=settings)
        return values

    # ------------------------------------------------------------------ samples

    def sample(self, n: int, *, lam: float | None = None, sampler: str | None = None, steps: int | None = None,
               seed: int = 0) -> Tensor:
        """``n`` samples in data space from the EMA model, with the experiment's sampler (or ``sampler``,
        by name), λ and step count unless given; the same ``seed`` gives the same samples."""
        x, _ = self._run.draw(self._run.sampler(lam, sampler), n, steps=steps, seed=seed)
        return x.cpu()

    def trajectories(self, n: int, *, lam: float = 1.0, steps: int | None = None, seed: int = 0) -> Tensor:
        """Every state of the λ-sampler's paths in model space: shape (len(ts), n, *data shape)."""
        _, states = self._run.draw(self._run.sampler(lam), n, steps=steps, seed=seed, trajectory=True)
        return states

    # ------------------------------------------------------------------ records and figures

    def metrics(self):
        """The records of metrics.jsonl (loss, lr, periodic bpd, …): a pandas DataFrame when pandas is
        installed, else a list of dicts."""
        records = read_metrics(self.path)
        try:
            import pandas
        except ImportError:
            return records
        return pandas.DataFrame.from_records(records)

    def figure(self, kind: str = "samples", *, n: int = 1000, lam: float | tuple[float, ...] | None = None,
               steps: int | None = None, seed: int = 0):
        """A matplotlib Figure: ``samples`` (scatter or image grid), ``trajectories`` (the λ-family's
        paths side by side, Figure 5: λ = 0 and 1 unless ``lam`` lists others) or ``curves`` (training
        loss and periodic bpd against step)."""
        if kind == "samples":
            x = self.sample(n, lam=lam, steps=steps, seed=seed)
            if self.data.kind == "image":
                fig, (ax,) = new_figure()
                ax.imshow(image_grid(x).permute(1, 2, 0).squeeze(-1), cmap="gray")
                ax.axis("off")
                return fig
            return samples_figure(x, "samples" if lam is None else f"samples (λ = {lam:g})")
        if kind == "trajectories":
            lams = (0.0, 1.0) if lam is None else tuple(lam) if isinstance(lam, (tuple, list)) else (lam,)
            paths = {f"λ = {v:g}": self.trajectories(n, lam=v, steps=steps, seed=seed) for v in lams}
            return trajectories_figure(paths)
        if kind == "curves":
            return self._curves()
        raise SdeflowError(f"figure: kind: expected samples, trajectories or curves, got {kind!r}")

    def _curves(self):
        records = read_metrics(self.path)
        fig, (loss, bpd) = new_figure(2)
        points = [(r["step"], r["loss"]) for r in records if "loss" in r]
        loss.plot(*zip(*points)) if points else None
        loss.set_xlabel("step")
        loss.set_ylabel("training loss")
        evals = [r for r in records if "bpd" in r]
        if evals:
            steps = [r["step"] for r in evals]
            bpd.errorbar(steps, [r["bpd"] for r in evals], yerr=[r.get("bpd_se") or 0.0 for r in evals],
                         marker="o", capsize=3)
        bpd.set_xlabel("step")
        bpd.set_ylabel(f"{evals[0].get('split', 'val') if evals else 'val'} bits per dimension (±1 s.e.)")
        return fig


__all__ = ["Run", "component", "experiment", "open_run", "train", "trained_steps"]
