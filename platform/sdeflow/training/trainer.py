"""Training: the optimizer and its learning-rate schedule, gradient accumulation, EMA, periodic
evaluation, samples and atomic checkpoints, exact resume.

Every random draw of training step k comes from a seed that is a function of (seed, rank, k), and the
batch of step k is a function of (seed, k): a resumed run repeats the uninterrupted one exactly (on
CPU), and ranks draw different noise while holding identical weights. With ``train.accumulate: N`` the
N micro-batches of a step draw one after another from that step's stream.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..assembly.build import advice, build_lr_schedule, build_optimizer, check_accumulate, plugin_versions
from ..assembly.run import Run, build_run
from ..core.batches import train_batches
from ..core.compiling import CompiledNetwork, autocast_for
from ..core.distributed import DistContext
from ..core.errors import ConfigError, SdeflowError
from ..core.seeding import rng_state, set_rng_state
from ..evaluation.quality import check_metrics
from ..experiment.config import COMPONENT_DEFAULTS, Experiment
from ..rundir.checkpoint import non_finite_entries, save_atomic, write_error, write_text_atomic
from ..rundir.folder import (
    CONFIG_FILE,
    LAST,
    PREVIOUS,
    RunLock,
    check_changes,
    dump_config,
    history_with,
    restore,
    take_folder,
)
from ..rundir.log import RunLog, truncate_metrics
from ..rundir.results import headline
from . import milestones
from .memory import check_run_fits
from .optim import (
    EMA,
    Window,
    adam,  # noqa: F401  (benchmarks/train_step.py takes the trainer's Adam from here)
    base_rates,
    gradient_sync,
    keep_configured,
    load_schedule_state,
    micro_batches,
    schedule_state,
    set_rates,
    step_seed,
    unwrapped,
)
from .preemption import STOP_SIGNALS, Preempted, StopRequests, Timer


class TrainingDiverged(SdeflowError):
    """The loss, or the weights after an update, became NaN or infinite."""


AGREE_EVERY = 10
"""Under DDP, ranks agree on stopping (or a timed checkpoint) every this many steps."""


def notice(message: str) -> None:
    print(f"sdeflow: {message}", file=sys.stderr)


def _quiet(message: str) -> None:
    """Ranks other than 0 say nothing (rank 0 says it once)."""


class Trainer:
    """Owns the optimisation state of one run folder."""

    def __init__(self, run: Run, *, restart: bool = False, allow_changes: bool = False, reevaluate: bool = False):
        self.run, self.exp, self.ctx = run, run.exp, run.ctx
        self.say = notice if self.ctx.is_main else _quiet  # rank 0 speaks for all
        cfg = self.exp.train
        self.objective = run.objective
        self.optimizer = build_optimizer(self.exp, self.objective.param_groups(cfg.lr, cfg.component_lr), run.registry)
        self.base_rates = base_rates(self.optimizer)  # the schedule scales these; the config's win on resume
        self.schedule = build_lr_schedule(self.exp, run.registry)
        self.step = 0
        self.elapsed = 0.0  # seconds spent in training steps, across resumes
        self.raw_network = run.model.parameterization.network
        self.autocast = autocast_for(self.exp.precision, run.device, self.say)
        self.allow_changes, self.reevaluate = allow_changes, reevaluate
        self.stop = StopRequests(self.say)
        self.save_timer = Timer(self.exp.train.checkpoint_minutes)
        self.saved_step: int | None = None
        self.lock = RunLock(run.run_dir)
        for line in advice(self.exp, run.parts):
            self.say(f"warning: {line}")
        self.log: RunLog | None = None
        self.pending_config: str | None = None
        """config.yaml as this process will write it, held back until a step has run (or a save or a final
        evaluation needs it): a process that cannot train changes no settings or history on disk."""
        problem = None
        try:
            check_accumulate(run.exp, self.ctx.world)  # each rank's share splits into equal micro-batches
            # What is in memory at once is one micro-batch of each rank's share.
            check_run_fits(run.model, run.exp, run.data.shape, run.device, self.ctx.world * cfg.accumulate)
        except SdeflowError as e:
            problem = e
        if self.ctx.any(problem is not None):  # ranks see different free memory: all stop together
            raise problem or SdeflowError(f"{run.exp.source}: a batch does not fit on another rank's device")
        try:
            self._prepare_folder(restart)
        except BaseException:
            self.lock.release()
            raise
        if self.exp.train.channels_last and run.data.kind == "image":
            run.model.to(memory_format=torch.channels_last)
            run.ema.to(memory_format=torch.channels_last)
            self.objective.memory_format = torch.channels_last
        # Before compile wraps the network: the EMA tracks every trainable parameter, as they are.
        self.ema = EMA(run.ema_objective, self.objective, cfg.ema, cfg.ema_warmup)
        self.compiled = CompiledNetwork(run.model.parameterization, self.raw_network, self.exp.train.compile,
                                        self.say)
        # One DDP wrapper for the whole run, around everything that holds trainable parameters.
        self.ddp_objective = self.ctx.wrap(self.objective)

    # ------------------------------------------------------------------ set-up

    def _prepare_folder(self, restart: bool) -> None:
        """Take the folder (rank 0), check what changed, resume, and write config.yaml with its history."""
        run_dir = self.run.run_dir
        problem = None
        if self.ctx.is_main:
            try:
                self.lock = take_folder(run_dir, restart, notice)
            except SdeflowError as e:
                problem = e
            except OSError as e:
                problem = write_error(run_dir, e)
        if self.ctx.any(problem is not None):  # every rank stops, not just the one that found out
            raise problem or SdeflowError(f"{run_dir}: rank 0 could not take the run folder")
        changes = (check_changes(run_dir, self.exp, self.run.registry, allow_changes=self.allow_changes,
                                 notice=self.say)
                   if (run_dir / CONFIG_FILE).exists() else {})
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights to the device.
        restore(run_dir, self._resume, self.say, set_aside=self.ctx.is_main)
        self.ctx.barrier()  # every rank has read the old config and checkpoint before rank 0 replaces them
        if self.ctx.is_main and not self.nothing_to_do():
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(run_dir, self.step)  # records after the checkpoint belong to lost work
            text = dump_config(self.exp, plugin_versions(self.run.registry, self.exp),
                               history_with(run_dir, changes, self.step))
            if not (run_dir / CONFIG_FILE).exists() or (run_dir / CONFIG_FILE).read_text() != text:
                self.pending_config = text

    def write_config(self) -> None:
        """Write config.yaml if this run changed it (once: after the first step, before any save)."""
        if self.pending_config is not None:
            write_text_atomic(self.run.run_dir / CONFIG_FILE, self.pending_config)
            self.pending_config = None

    def _resume(self, state: dict[str, Any]) -> None:
        self.run.model.load_state_dict(state["model"])
        self.run.ema.load_state_dict(state["ema"])
        self.objective.load_component_state(state.get("components", {}))
        self.run.ema_objective.load_component_state(state.get("ema_components", {}))
        self._resume_optimization(state)
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.say(f"resuming {self.run.run_dir} from step {self.step}")

    def _resume_optimization(self, state: dict[str, Any]) -> None:
        """The optimizer's state (moments) and the schedule's, when the checkpoint's were of the same
        component; the config's rates and optimizer settings win over the saved ones (as ``train.lr`` does).
        A checkpoint from before schedules existed has none: the schedule starts fresh."""
        saved = state.get("config", {})
        if self._same_component(saved, "optimizer"):
            configured = list(self.optimizer.param_groups)
            self.optimizer.load_state_dict(state["optimizer"])
            settings = self.run.registry.get("optimizer", self.exp.components["optimizer"]["name"]).arguments
            keep_configured(self.optimizer, configured, list(settings))
        else:
            self.say(f"optimizer changed since the checkpoint ({self._saved_name(saved, 'optimizer')} → "
                     f"{self.exp.components['optimizer']['name']}): its state starts afresh")
        if self._same_component(saved, "lr_schedule"):
            load_schedule_state(self.schedule, state.get("lr_schedule"))

    @staticmethod
    def _saved_name(saved: dict[str, Any], kind: str) -> str:
        spec = saved.get(kind) or COMPONENT_DEFAULTS[kind]
        return spec["name"] if isinstance(spec, dict) else str(spec)

    def _same_component(self, saved: dict[str, Any], kind: str) -> bool:
        """The checkpoint's ``kind`` (its recorded config; the default for older checkpoints) is this run's."""
        before, now = self._saved_name(saved, kind), self.exp.components[kind]["name"]
        try:
            registry = self.run.registry
            return registry.get(kind, before).qualified_name == registry.get(kind, now).qualified_name
        except ConfigError:  # no longer installed, or now ambiguous: compare as written
            return before == now

    def _open_log(self) -> RunLog:
        log = RunLog(self.run.run_dir, tensorboard=self.exp.logging.tensorboard, purge_step=self.step + 1)
        if self.step == 0:
            log.config(self.exp.to_dict())
        return log

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        with unwrapped(self.run.model.parameterization, self.raw_network):
            model = self.run.model.state_dict()
        state = {"model": model, "ema": self.run.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_schedule": schedule_state(self.schedule), "step": self.step, "elapsed": self.elapsed,
                 "rng": rng_state(), "config": self.exp.to_dict()}
        if self.objective.component_state():  # a trainable loss or time sampler
            state["components"] = self.objective.component_state()
            state["ema_components"] = self.run.ema_objective.component_state()
        return state

    def save(self) -> None:
        """last.pt, keeping the one it replaces as previous.pt (the fallback if last.pt is ever unreadable).
        Weights that are not all finite are never saved: the update that broke them is refused here, so the
        last good checkpoint stays last.pt (the loss is computed before the update and cannot tell)."""
        self.write_config()
        state = self.state_dict()
        bad = non_finite_entries(state)
        if self.ctx.any(torch.tensor(bool(bad), device=self.run.device)):
            ckpt = self.run.checkpoint_path
            kept = f"last good checkpoint kept at {ckpt}" if ckpt.exists() else "no checkpoint was written"
            raise TrainingDiverged(f"non-finite weights after step {self.step} ({', '.join(bad[:3]) or 'another rank'}"
                                   f"); nothing saved ({kept}); try a lower train.lr or train.grad_clip")
        if self.ctx.is_main:
            save_atomic(state, self.run.checkpoint_path, keep_previous=self.run.run_dir / PREVIOUS)
            if self.log:  # so a folder whose checkpoints were deleted is never taken for a fresh one
                self.log.log(self.step, checkpoint=str(LAST))
        self.ctx.barrier()
        self.saved_step = self.step
        self.save_timer.reset()

    # ------------------------------------------------------------------ the loop

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimiser step on this rank's shard, in ``train.accumulate`` micro-batches whose gradients
        add up to the gradient of the whole shard's mean loss; each group at its base rate times the
        schedule's factor for this update. Returns the (detached) mean loss."""
        cfg = self.exp.train
        self.optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(x, cfg.accumulate)
        loss = sum(self._backward(part, len(parts), last=i == len(parts) - 1) for i, part in enumerate(parts))
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.grad_clip)
        set_rates(self.optimizer, self.base_rates, self.schedule(self.step))
        self.optimizer.step()
        self.ema.update(self.step)
        return loss

    def _backward(self, x: torch.Tensor, parts: int, last: bool) -> torch.Tensor:
        """Backward of one micro-batch's share of the shard's mean loss (its mean / ``parts``: the micro-batches
        are equal); under DDP the gradients all-reduce after the ``last`` one only. Returns that share."""
        with gradient_sync(self.ddp_objective, last):
            with self.autocast():
                per_example = self.ddp_objective(x).float()
            self.objective.observe_loss(per_example)
            loss = per_example.mean() if parts == 1 else per_example.mean() / parts
            loss.backward()
            self.objective.observe_loss(None)
        return loss.detach()

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``, then save, evaluate and sample; the logs are closed and the run
        folder unlocked whatever happens. Returns the final results by split."""
        try:
            return self._fit()
        finally:
            if self.log:
                self.log.close()
            self.lock.release()

    def _fit(self) -> dict[str, Any]:
        cfg, run = self.exp.train, self.run
        if self.nothing_to_do():
            if self.ctx.is_main:
                notice(f"{run.run_dir} is already trained to step {self.step} (train.steps={cfg.steps}) and "
                       "evaluated; nothing to do (--reevaluate evaluates it again)")
            return {split: headline(run.run_dir, split) for split in milestones.final_splits(run)}
        self.log = self._open_log() if self.ctx.is_main else None
        with self.stop:
            if self.step >= cfg.steps:
                if self.ctx.is_main:
                    notice(f"{run.run_dir} is already trained to step {self.step} (train.steps={cfg.steps})")
                return self.finish(trained=False)
            self.loop()
            return self.finish(trained=True)

    def loop(self) -> None:
        """Steps until ``train.steps``, with the periodic logs, evaluations, samples and checkpoints; a
        stop signal ends it after the step in progress, with a checkpoint (:class:`Preempted`)."""
        cfg, run = self.exp.train, self.run
        batches = train_batches(run.data.train, cfg.batch_size, self.exp.seed, self.step, cfg.steps,
                                shuffle=run.data.train_shuffle, shard=self.ctx.shard,
                                num_workers=cfg.num_workers)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.ctx.is_main and self.exp.logging.progress),
                   dynamic_ncols=True, desc=self.exp.name)
        run.model.train()
        self.window = Window(torch.zeros((), device=run.device))
        step = lambda batch: self.compiled.first_step(self.train_step, batch)  # noqa: E731
        tick = time.perf_counter()
        try:
            for x in batches:
                torch.manual_seed(step_seed(self.exp.seed, self.ctx.rank, self.step))
                loss = step(x.to(run.device, non_blocking=True))
                step = self.train_step
                self.step += 1
                self.write_config()
                now = time.perf_counter()
                self.window.add(loss, now - tick)
                self.elapsed += now - tick
                bar.update(1)
                if self._due(cfg.log_every) or self._due(cfg.checkpoint_every) or self._due(cfg.eval_every):
                    self._log_window(bar)
                self.periodic()  # evaluation and saving are not training time
                self._check_stop()
                tick = time.perf_counter()
        finally:
            bar.close()
        if self.window.steps:
            self._check_finite(self.window.mean())

    def _log_window(self, bar) -> None:
        mean = self._check_finite(self.window.mean())
        rate = self.window.steps / max(self.window.seconds, 1e-9)
        bar.set_postfix(loss=f"{mean:.4g}", it_s=f"{rate:.1f}")
        if self._due(self.exp.train.log_every) and self.log:
            self.log.log(self.step, loss=mean, lr=self.optimizer.param_groups[0]["lr"], it_per_s=rate,
                         elapsed_s=round(self.elapsed, 3))
        self.window.reset()

    def _check_stop(self) -> None:
        """After a step: a checkpoint when ``train.checkpoint_minutes`` have passed since the last one,
        and on a stop signal (on any rank) a checkpoint and :class:`Preempted`. Under DDP the ranks agree
        every few steps (one small all-reduce), so they stop at the same step."""
        if self.ctx.active and self.step % AGREE_EVERY and self.step != self.exp.train.steps:
            return
        stop, save = self.ctx.any_of(self.stop.requested, self.save_timer.due)
        if not (stop or save) or self.step == self.exp.train.steps:  # the final step saves anyway
            if stop:
                self.stop.signum = self.stop.signum or STOP_SIGNALS[0]
            return
        if self.window.steps:
            self._check_finite(self.window.mean())  # never checkpoint a diverged model
        if self.saved_step != self.step:
            self.save()
        if stop:
            raise Preempted(self.stop.signum or STOP_SIGNALS[0], self.step, str(self.run.checkpoint_path))

    def _due(self, every: int) -> bool:
        return bool(every) and (self.step % every == 0 or self.step == self.exp.train.steps)

    def _check_finite(self, mean_loss: torch.Tensor) -> float:
        if self.ctx.any(~torch.isfinite(mean_loss)):
            ckpt = self.run.checkpoint_path
            kept = f"last good checkpoint kept at {ckpt}" if ckpt.exists() else "no checkpoint was written"
            raise TrainingDiverged(f"non-finite loss at or before step {self.step}; stopping ({kept}); "
                                   f"try a lower train.lr or train.grad_clip")
        return float(mean_loss)

    def periodic(self) -> None:
        """Evaluation, samples and checkpoints due at this step; the final step's are done by finish()."""
        cfg = self.exp.train
        if self.step == cfg.steps:
            return
        if self._due(cfg.eval_every):
            self.evaluate()
        if self._due(cfg.sample_every):
            self.samples()
        if self._due(cfg.checkpoint_every):
            self.save()

    def nothing_to_do(self) -> bool:
        """Trained to train.steps and evaluated on every final split at that step (and not asked again)."""
        trained = self.step >= self.exp.train.steps
        return not self.reevaluate and trained and milestones.evaluated_at(self.run, self.step)

    def evaluate(self, split: str | None = None) -> dict[str, Any]:
        return milestones.evaluate(self.run, self.log, self.step, split)

    def samples(self) -> None:
        if self.ctx.is_main:
            milestones.samples(self.run, self.log, self.step)

    def finish(self, trained: bool) -> dict[str, dict[str, Any]]:
        """Save, evaluate every final split, sample; results are recorded in eval.json (by split)."""
        self.write_config()
        if trained:
            self.save()
        results = {}
        for split in milestones.final_splits(self.run):  # each split recorded as soon as it is done
            if self.ctx.any(self.stop.requested):  # trained and saved: a rerun only evaluates
                raise Preempted(self.stop.signum or STOP_SIGNALS[0], self.step, str(self.run.checkpoint_path))
            results[split] = self.evaluate(split)
            if self.ctx.is_main:
                milestones.record_final(self.run, split, results[split], self.step)
        self.samples()
        if self.ctx.is_main:
            milestones.quality(self.run, self.log, self.step)
        if self.log:
            milestones.hparams(self.run, self.log, results)
        return results


def train(exp: Experiment, run_dir: str | Path | None = None, *, restart: bool = False, registry=None,
          ctx: DistContext | None = None, allow_changes: bool = False, reevaluate: bool = False
          ) -> dict[str, dict[str, Any]]:
    """Train ``exp`` into ``run_dir`` (default runs/<name>), resuming from its last checkpoint.

    Returns the final evaluation by split and estimator (``results["test"]["elbo"]["bpd"]``).
    """
    run = build_run(exp, run_dir or default_run_dir(exp.name), registry=registry, ctx=ctx)
    check_metrics(exp, run.data)
    return Trainer(run, restart=restart, allow_changes=allow_changes, reevaluate=reevaluate).fit()


def default_run_dir(name: str) -> Path:
    return Path("runs") / name
