"""Training: Adam + EMA, periodic evaluation, samples and atomic checkpoints, exact resume.

Every random draw of training step k comes from a seed that is a function of (seed, rank, k), and the
batch of step k is a function of (seed, k): a resumed run repeats the uninterrupted one exactly (on
CPU), and ranks draw different noise while holding identical weights.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import (
    derive_seed,
    remove_stale_temporaries,
    rng_state,
    save_atomic,
    set_rng_state,
    write_error,
    write_text_atomic,
)
from .config import Experiment, load_experiment, plugin_versions, read_experiment_data, structure
from .data import train_batches
from .distributed import DistContext, init_from_env, shutdown
from .errors import SdeflowError
from .evaluate import format_results
from .figures import image_for_tensorboard
from .memory import bytes_per_example, check_batch_fits
from .preemption import STOP_SIGNALS, Preempted, StopRequests, Timer
from .results import headline, record
from .runlog import RunLog, flatten, truncate_metrics
from .runs import (
    CONFIG_FILE,
    LAST,
    LOCK_FILE,
    PREVIOUS,
    Run,
    RunLock,
    breaks_exact_resume,
    build_run,
    config_changes,
    dump_config,
    history_entry,
    qualified_components,
    read_run_config,
    read_run_records,
    recorded_plugins,
    resolve_device,
    restore,
)


class TrainingDiverged(SdeflowError):
    """The loss became NaN or infinite."""


AGREE_EVERY = 10
"""Under DDP, ranks agree on stopping (or a timed checkpoint) every this many steps."""


class Window:
    """The training losses and seconds since the last log line."""

    def __init__(self, zero: torch.Tensor):
        self.loss, self.steps, self.seconds = zero, 0, 0.0

    def add(self, loss: torch.Tensor, seconds: float) -> None:
        self.loss = self.loss + loss
        self.steps += 1
        self.seconds += seconds

    def mean(self) -> torch.Tensor:
        return self.loss / self.steps

    def reset(self) -> None:
        self.loss, self.steps, self.seconds = torch.zeros_like(self.loss), 0, 0.0


def notice(message: str) -> None:
    print(f"sdeflow: {message}", file=sys.stderr)


def _quiet(message: str) -> None:
    """Ranks other than 0 say nothing (rank 0 says it once)."""


def step_seed(seed: int, rank: int, step: int) -> int:
    return derive_seed(seed, "train", rank, step)


@contextlib.contextmanager
def unwrapped(run: Run, raw_network: torch.nn.Module):
    """Temporarily put the plain network back (state dicts without DDP/compile prefixes)."""
    parameterization = run.model.parameterization
    wrapped = parameterization.network
    parameterization.network = raw_network
    try:
        yield
    finally:
        parameterization.network = wrapped


def adam(parameters, lr: float) -> torch.optim.Adam:
    """Adam, with PyTorch's fused one-kernel update where it has one for the parameters' device.

    On the CPU it measured 1.5 ms instead of 5.3 ms per step for the MNIST U-net's 1.5M parameters.
    """
    params = list(parameters)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True if fused else None)


class Trainer:
    """Owns the optimisation state of one run folder."""

    def __init__(self, run: Run, *, restart: bool = False, allow_changes: bool = False, reevaluate: bool = False):
        self.run, self.exp, self.ctx = run, run.exp, run.ctx
        cfg = self.exp.train
        self.optimizer = adam(run.model.parameters(), cfg.lr)
        self.step = 0
        self.elapsed = 0.0  # seconds spent in training steps, across resumes
        self.raw_network = run.model.parameterization.network
        self.autocast = self._autocast()
        self.allow_changes, self.reevaluate = allow_changes, reevaluate
        self.stop = StopRequests(notice if self.ctx.is_main else _quiet)
        self.save_timer = Timer(self.exp.train.checkpoint_minutes)
        self.saved_step: int | None = None
        self.lock = RunLock(run.run_dir)
        self.log: RunLog | None = None
        problem = None
        try:
            self._check_memory()  # before anything is written
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
        # Pairs taken before wrapping: DDP and compile wrappers must not change what the EMA tracks.
        self.ema_pairs = (list(run.ema.parameters()), [p.detach() for p in run.model.parameters()])
        self.ddp_network = self.ctx.wrap(self.raw_network)  # one DDP wrapper for the whole run
        run.model.parameterization.network = self._compile(self.ddp_network)

    # ------------------------------------------------------------------ set-up

    def _autocast(self):
        if self.exp.precision == "bf16":
            if self.run.device.type == "cuda" and torch.cuda.is_bf16_supported():
                return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
            if self.ctx.is_main:
                notice("precision bf16 needs a CUDA device with bf16 support; training in fp32")
        return contextlib.nullcontext

    def _compile(self, network: torch.nn.Module) -> torch.nn.Module:
        self.compiled = self.exp.train.compile
        if self.compiled:
            try:
                return torch.compile(network)
            except Exception as e:  # no compiler backend at all
                self._compile_failed(e)
        return network

    def _compile_failed(self, error: Exception) -> None:
        self.compiled = False
        if self.ctx.is_main:
            notice(f"train.compile unavailable here ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                   "running eagerly")

    def first_step(self, x: torch.Tensor) -> torch.Tensor:
        """The first step compiles; if compiling fails (no compiler, unsupported op), fall back to eager."""
        if not self.compiled:
            return self.train_step(x)
        before = rng_state()
        try:
            return self.train_step(x)
        except Exception as e:
            self._compile_failed(e)
            self.run.model.parameterization.network = self.ddp_network
            set_rng_state(before)  # the eager step draws the same noise the compiled one would have
            return self.train_step(x)

    def _check_memory(self) -> None:
        """Batch sizes and sample counts that clearly cannot fit are config errors, before any allocation."""
        run, exp = self.run, self.exp
        per_example = bytes_per_example(run.model, tuple(run.data.shape), run.device)
        check_batch_fits("train.batch_size", -(-exp.train.batch_size // self.ctx.world), per_example,
                         run.device, exp.source)
        check_batch_fits("eval.batch_size", exp.eval.batch_size * exp.eval.samples_per_example, per_example,
                         run.device, exp.source)
        check_batch_fits("sample.num", exp.sample.num, per_example, run.device, exp.source, factor=1.5)

    def _prepare_folder(self, restart: bool) -> None:
        run_dir = self.run.run_dir
        problem = None
        if self.ctx.is_main:
            try:
                self._take_folder(restart)
            except SdeflowError as e:
                problem = e
            except OSError as e:
                problem = write_error(run_dir, e)
        if self.ctx.any(problem is not None):  # every rank stops, not just the one that found out
            raise problem or SdeflowError(f"{run_dir}: rank 0 could not take the run folder")
        changes = self._check_changes() if (run_dir / CONFIG_FILE).exists() else {}
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights to the device.
        restore(run_dir, self._resume, notice if self.ctx.is_main else _quiet, set_aside=self.ctx.is_main)
        self.ctx.barrier()  # every rank has read the old config and checkpoint before rank 0 replaces them
        if self.ctx.is_main and not self.nothing_to_do():
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(run_dir, self.step)  # records after the checkpoint belong to lost work
            plugins = plugin_versions(self.run.registry, self.exp)
            history = self._history(changes)
            text = dump_config(self.exp, plugins, history)
            if not (run_dir / CONFIG_FILE).exists() or (run_dir / CONFIG_FILE).read_text() != text:
                write_text_atomic(run_dir / CONFIG_FILE, text)

    def _take_folder(self, restart: bool) -> None:
        """Lock the run folder (one writer per run), moving an old run aside first with ``--restart``."""
        run_dir = self.run.run_dir
        self.lock.acquire()
        if restart and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            backup = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
            n = 1
            while backup.exists():  # two restarts within one second
                backup, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}"), n + 1
            old_lock, self.lock = self.lock, RunLock(run_dir)
            os.rename(run_dir, backup)  # the held lock file moves with it; a rename never copies
            self.lock.acquire()  # the new folder's lock before the old one is let go
            old_lock.release()
            notice(f"--restart: moved the previous run to {backup}")
        for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
            notice(f"removed {tmp}, left by a writer that was killed mid-write")

    def _check_changes(self) -> dict[str, tuple[Any, Any]]:
        """Announce every setting changed since the run's config.yaml; refuse those that break exact
        resume (seed, batch size, components) unless ``--allow-changes``."""
        run_dir, registry = self.run.run_dir, self.run.registry
        recorded = recorded_plugins(run_dir)
        old = read_run_config(run_dir)
        with contextlib.suppress(SdeflowError):  # settings added since the run began take their defaults
            old = structure(old, str(run_dir / CONFIG_FILE), registry, prefer=recorded).to_dict()
        old = qualified_components(old, registry, recorded)
        new = qualified_components(self.exp.to_dict(), registry, recorded)
        changes = config_changes(old, new)
        # With no checkpoint nothing trained survives: a new seed or batch size breaks nothing.
        strict = not self.allow_changes and any((run_dir / p).exists() for p in (LAST, PREVIOUS))
        for key, (before, after) in changes.items():
            kind = key.split(".", 1)[0]
            if not breaks_exact_resume(key, self.exp.components):
                continue
            if not self.allow_changes and kind in self.exp.components:  # another experiment: refused always
                raise SdeflowError(
                    f"{run_dir}: holds a run with a different {kind} ({old.get(kind)} vs {new.get(kind)}); "
                    "use --restart or another --run-dir (or --allow-changes to load its weights anyway)")
            if strict:
                raise SdeflowError(
                    f"{run_dir}: {key} changed on resume ({before} → {after}), which breaks exact resume; "
                    "use --allow-changes to go on anyway, --restart to start afresh, or another --run-dir")
        for key, (before, after) in changes.items():
            if self.ctx.is_main:
                notice(f"{key} changed on resume: {before} → {after}")
        return changes

    def _history(self, changes: dict[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
        """config.yaml's record of earlier settings, with one more step range if settings changed now."""
        path = self.run.run_dir / CONFIG_FILE
        history = list((read_run_records(self.run.run_dir).get("history") or []) if path.exists() else [])
        if changes and self.step > 0:
            start = history[-1]["to_step"] if history else 0
            history.append(history_entry(changes, start, self.step))
        return history

    def _resume(self, state: dict[str, Any]) -> None:
        self.run.model.load_state_dict(state["model"])
        self.run.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config's lr wins over the one saved
            group["lr"] = self.exp.train.lr
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        if self.ctx.is_main:
            notice(f"resuming {self.run.run_dir} from step {self.step}")

    def _open_log(self) -> RunLog:
        log = RunLog(self.run.run_dir, tensorboard=self.exp.logging.tensorboard, purge_step=self.step + 1)
        if self.step == 0:
            log.config(self.exp.to_dict())
        return log

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        with unwrapped(self.run, self.raw_network):
            model = self.run.model.state_dict()
        return {"model": model, "ema": self.run.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "elapsed": self.elapsed, "rng": rng_state(), "config": self.exp.to_dict()}

    def save(self) -> None:
        """last.pt, keeping the one it replaces as previous.pt (the fallback if last.pt is ever unreadable)."""
        if self.ctx.is_main:
            save_atomic(self.state_dict(), self.run.checkpoint_path, keep_previous=self.run.run_dir / PREVIOUS)
        self.ctx.barrier()
        self.saved_step = self.step
        self.save_timer.reset()

    # ------------------------------------------------------------------ the loop

    def ema_decay(self) -> float:
        """The EMA decay after ``self.step`` updates, warmed up so a short run is not stale."""
        cfg = self.exp.train
        return min(cfg.ema, (1 + self.step) / (10 + self.step)) if cfg.ema_warmup else cfg.ema

    @torch.no_grad()
    def update_ema(self) -> None:
        cfg = self.exp.train
        ema_params, params = self.ema_pairs
        if cfg.ema == 0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1 - self.ema_decay())
        for b_ema, b in zip(self.run.ema.buffers(), self.run.model.buffers()):
            b_ema.copy_(b)

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimiser step on this rank's shard; returns the (detached) mean loss."""
        run, cfg = self.run, self.exp.train
        z, _ = run.data.transform.forward(x)
        if cfg.channels_last and z.ndim == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            loss = run.parts.loss(run.model, z, run.parts.time_sampler).float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
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
            return {split: headline(run.run_dir, split) for split in self.final_splits()}
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
        step = self.first_step
        tick = time.perf_counter()
        try:
            for x in batches:
                torch.manual_seed(step_seed(self.exp.seed, self.ctx.rank, self.step))
                loss = step(x.to(run.device, non_blocking=True))
                step = self.train_step
                self.step += 1
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
        if self.reevaluate or self.step < self.exp.train.steps:
            return False
        done = [headline(self.run.run_dir, split) for split in self.final_splits()]
        return all(entries and min(e["step"] for e in entries.values()) >= self.step for entries in done)

    def final_splits(self) -> list[str]:
        """The splits the final evaluation covers: val (when the data has one) and test."""
        return (["val"] if self.run.data.val is not None else []) + ["test"]

    def evaluate(self, split: str | None = None) -> dict[str, Any]:
        """One split (default: val, else test); its main estimator's bpd goes to metrics.jsonl. The
        periodic curve is always the same split; a final test result is logged as ``test_bpd``."""
        curve = self.final_splits()[0]
        split = split or curve
        results = self.run.evaluate(split=split)
        if self.log:
            main = results.get("elbo") or next(iter(results.values()))
            prefix = "" if split == curve else f"{split}_"
            extra = {f"{prefix}exact_bpd": results["exact"]["bpd"]} if "exact" in results else {}
            self.log.log(self.step, **{f"{prefix}bpd": main["bpd"], f"{prefix}bpd_se": main["bpd_se"],
                                       f"{prefix}elbo": -main["nats"]}, split=split, **extra)
        return results

    def samples(self) -> None:
        if not self.ctx.is_main:
            return
        path = self.run.run_dir / "samples" / f"step_{self.step:07d}.png"
        self.run.save_samples(path, num=self.exp.sample.num, steps=self.exp.sample.steps,
                              lam=self.exp.sample.lam, seed=self.exp.seed)
        if self.log:
            self.log.image("samples", image_for_tensorboard(path), self.step)
        if self.exp.sample.trajectories and self.run.data.planar:
            self.run.save_trajectories(self.run.run_dir / "samples" / "trajectories.png",
                                       num=self.exp.sample.num, steps=self.exp.sample.steps, seed=self.exp.seed)

    def finish(self, trained: bool) -> dict[str, dict[str, Any]]:
        """Save, evaluate every final split, sample; results are recorded in eval.json (by split)."""
        if trained:
            self.save()
        results = {}
        for split in self.final_splits():  # each split recorded as soon as it is done
            if self.ctx.any(self.stop.requested):  # trained and saved: a rerun only evaluates
                raise Preempted(self.stop.signum or STOP_SIGNALS[0], self.step, str(self.run.checkpoint_path))
            results[split] = self.evaluate(split)
            if self.ctx.is_main:
                record(self.run.run_dir, results[split], step=self.step, seed=self.exp.seed)
                print(f"{split}:\n{format_results(results[split], self.run.data.kind)}")
        self.samples()
        if self.ctx.is_main:
            if self.log:
                main = results["test"].get("elbo", {})
                self.log.hparams(flatten({k: v for k, v in self.exp.to_dict().items()
                                          if k not in ("ablations", "sweep", "launcher")}),
                                 {"bpd": main.get("bpd", float("nan")), "bpd_se": main.get("bpd_se", float("nan"))})
        return results


def train(exp: Experiment, run_dir: str | Path | None = None, *, restart: bool = False, registry=None,
          ctx: DistContext | None = None, allow_changes: bool = False, reevaluate: bool = False
          ) -> dict[str, dict[str, Any]]:
    """Train ``exp`` into ``run_dir`` (default runs/<name>), resuming from its last checkpoint.

    Returns the final evaluation by split and estimator (``results["test"]["elbo"]["bpd"]``).
    """
    run = build_run(exp, run_dir or default_run_dir(exp.name), registry=registry, ctx=ctx)
    return Trainer(run, restart=restart, allow_changes=allow_changes, reevaluate=reevaluate).fit()


def default_run_dir(name: str) -> Path:
    return Path("runs") / name


def train_from_cli(args) -> int:
    data = read_experiment_data(args.experiment, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(str(data.get("name", Path(args.experiment).stem)))
    # A name that two plugins now register resolves as this run recorded it.
    prefer = {} if args.restart else recorded_plugins(run_dir)
    exp = load_experiment(args.experiment, args.overrides, prefer=prefer)
    ctx = init_from_env(resolve_device(exp.device, exp.source))
    try:
        train(exp, run_dir, restart=args.restart, ctx=ctx, allow_changes=args.allow_changes,
              reevaluate=args.reevaluate)
    finally:
        shutdown(ctx)
    return 0
