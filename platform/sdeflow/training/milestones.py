"""What a run records besides its training steps: the periodic and final evaluations (val for the
curve, val and test at the end), the samples and trajectories, and the final hyperparameter record."""

from __future__ import annotations

from typing import Any

from ..assembly.run import Run
from ..evaluation.evaluate import format_results
from ..evaluation.figures import image_for_tensorboard
from ..evaluation.quality import format_quality, parse_metrics, run_quality
from ..rundir.log import RunLog, flatten
from ..rundir.results import headline, record, record_quality


def final_splits(run: Run) -> list[str]:
    """The splits the final evaluation covers: val (when the data has one) and test."""
    return (["val"] if run.data.val is not None else []) + ["test"]


def evaluated_at(run: Run, step: int) -> bool:
    """Every final split has results in eval.json from ``step`` on."""
    done = [headline(run.run_dir, split) for split in final_splits(run)]
    return all(entries and min(e["step"] for e in entries.values()) >= step for entries in done)


def evaluate(run: Run, log: RunLog | None, step: int, split: str | None = None) -> dict[str, Any]:
    """One split (default: the curve's, val else test); its main estimator's bpd goes to metrics.jsonl.
    The periodic curve is always the same split; a final test result is logged as ``test_bpd``."""
    curve = final_splits(run)[0]
    split = split or curve
    results = run.evaluate(split=split)
    if log:
        main = results.get("elbo") or next(iter(results.values()))
        prefix = "" if split == curve else f"{split}_"
        extra = {f"{prefix}exact_bpd": results["exact"]["bpd"]} if "exact" in results else {}
        log.log(step, **{f"{prefix}bpd": main["bpd"], f"{prefix}bpd_se": main["bpd_se"],
                         f"{prefix}elbo": -main["nats"]}, split=split, **extra)
    return results


def record_final(run: Run, split: str, results: dict[str, Any], step: int) -> None:
    """A final split's results into eval.json (as soon as that split is done) and on stdout."""
    record(run.run_dir, results, step=step, seed=run.exp.seed)
    print(f"{split}:\n{format_results(results, run.data.kind)}")


def quality(run: Run, log: RunLog | None, step: int) -> None:
    """``eval.metrics`` (SWD, MMD with their floors) of the final samples against the test split."""
    names = parse_metrics(run.exp.eval.metrics)
    if not names:
        return
    values, settings = run_quality(run, names, split="test", seed=run.exp.seed)
    record_quality(run.run_dir, "test", values, step=step, seed=run.exp.seed, settings=settings)
    print(f"test sample quality:\n{format_quality(values, 'test')}")
    if log:
        log.log(step, split="test", **{f"test_{name}": q["value"] for name, q in values.items()},
                **{f"test_{name}_floor": q["floor"] for name, q in values.items()})


def samples(run: Run, log: RunLog | None, step: int) -> None:
    """samples/step_N.png (and TensorBoard), and for 2-D data the λ = 0 / 1 trajectories (Figure 5)."""
    exp = run.exp
    path = run.run_dir / "samples" / f"step_{step:07d}.png"
    run.save_samples(path, num=exp.sample.num, steps=exp.sample.steps, lam=exp.sample.lam, seed=exp.seed)
    if log:
        log.image("samples", image_for_tensorboard(path), step)
    if exp.sample.trajectories and run.data.planar:
        figure = run.save_trajectories(run.run_dir / "samples" / "trajectories.png", num=exp.sample.num,
                                       steps=exp.sample.steps, seed=exp.seed)
        if log:
            log.image("trajectories", image_for_tensorboard(figure), step)


def hparams(run: Run, log: RunLog, results: dict[str, dict[str, Any]]) -> None:
    """TensorBoard's hyperparameter record: the settings and the final test bpd."""
    main = results["test"].get("elbo", {})
    settings = {k: v for k, v in run.exp.to_dict().items() if k not in ("ablations", "sweep", "launcher")}
    log.hparams(flatten(settings), {"bpd": main.get("bpd", float("nan")), "bpd_se": main.get("bpd_se", float("nan"))})
