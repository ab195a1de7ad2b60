"""Where a sweep's variants run: one after another here (``sequential``), several at once on this machine
(``local``) or as SLURM jobs (``slurm``); the last two through submitit's executors.

Every launcher runs the same job, :class:`VariantJob`, into the same per-variant run folders, so the
summary cannot tell them apart. A job records how it ended in ``RUN/job.json`` (failed with its error
line, or stopped by a signal at step k), which ``sdeflow sweep --status`` reads with the run's lock,
checkpoint and logs. Preemption: the trainer saves and raises :class:`~sdeflow.training.preemption.Preempted`;
under SLURM the job then hands the signal on to submitit, which requeues it, and the requeued job
resumes from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from ..core.errors import ConfigError, SdeflowError
from ..experiment.config import structure_section
from ..rundir.folder import RunBusy
from ..training.preemption import Preempted, StopRequests
from .jobstate import one_line, read_job_record, record_job

LOCAL_TIMEOUT_MIN = 60 * 24 * 30
"""submitit's local executor kills a job after its timeout; a local variant may run for weeks."""


@attrs.define(kw_only=True)
class LauncherConfig:
    """The ``launcher:`` section of a sweep file (``--launcher``/``--jobs`` override it)."""

    name: Literal["sequential", "local", "slurm"] = "sequential"
    jobs: int | None = None  # variants at once (local: default 2, or one per gpus_per_job GPUs; slurm: no limit)
    gpus_per_job: int = 0  # local: GPUs pinned to each job (CUDA_VISIBLE_DEVICES); slurm: GPUs per node
    threads_per_job: int | None = None  # CPU threads per job (default: this machine's CPUs / jobs)
    folder: str | None = None  # submitit's logs and pickles (default: RUNS/.submitit)
    partition: str | None = None
    account: str | None = None
    time_minutes: int = 24 * 60
    nodes: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    sbatch: dict = attrs.Factory(dict)  # further sbatch options, e.g. {qos: high, constraint: a100}
    setup: list = attrs.Factory(list)  # shell lines before each SLURM job (module load, source venv)
    wait: bool = True  # slurm: wait for the jobs and write the summary (false: submit and return)


SLURM_ONLY = ("partition", "account", "time_minutes", "nodes", "cpus_per_task", "mem_gb", "sbatch", "setup", "wait")


def read_launcher(data: Mapping[str, Any], source: str, name: str | None = None, jobs: int | None = None
                  ) -> LauncherConfig:
    """The checked ``launcher`` section, with the command line's ``--launcher``/``--jobs`` applied."""
    section = dict(data.get("launcher") or {})
    if name:
        if section.get("name", name) != name:  # another launcher's settings do not carry over
            section = {}
        section["name"] = name
    if jobs is not None:
        section["jobs"] = jobs
    cfg = structure_section(section, LauncherConfig, source, "launcher")
    defaults = LauncherConfig()
    if cfg.name != "slurm":
        for key in SLURM_ONLY:
            if getattr(cfg, key) != getattr(defaults, key):
                raise ConfigError(f"{source}: launcher.{key}: only for the slurm launcher (launcher.name is "
                                  f"'{cfg.name}')")
    for key in ("jobs", "threads_per_job", "nodes", "time_minutes", "cpus_per_task"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{source}: launcher.{key}: must be at least 1, got {value}")
    if cfg.gpus_per_job < 0:
        raise ConfigError(f"{source}: launcher.gpus_per_job: must be 0 (CPU) or more, got {cfg.gpus_per_job}")
    if cfg.name == "sequential" and (cfg.jobs or 1) > 1:
        raise ConfigError(f"{source}: launcher.jobs: the sequential launcher runs one variant at a time; "
                          "use --launcher local to run several at once")
    return cfg


# ---------------------------------------------------------------- the job


@attrs.define
class VariantJob:
    """Train one variant into its run folder: what every launcher runs (pickled by submitit).

    ``config`` is the variant's full experiment mapping, checked again here against the job's own
    plugins. ``requeue``: on preemption hand the signal on to submitit (SLURM) instead of returning.
    """

    name: str
    config: dict
    source: str
    run_dir: str
    threads: int | None = None
    requeue: bool = False

    def __call__(self, ctx=None) -> dict[str, Any]:
        """Train; ``ctx``: an already joined process group (a sweep under torchrun), else join the job's."""
        import torch

        from ..assembly.run import resolve_device
        from ..components.registry import default_registry
        from ..core.distributed import init_from_env, shutdown
        from ..experiment.config import structure
        from ..training.trainer import train

        run_dir = Path(self.run_dir)
        if self.threads:
            torch.set_num_threads(self.threads)
        _export_submitit_distributed()
        try:
            exp = structure(self.config, self.source, default_registry())
            own = ctx is None
            ctx = ctx or init_from_env(resolve_device(exp.device, exp.source))
            try:
                train(exp, run_dir, ctx=ctx)
            finally:
                if own:
                    shutdown(ctx)
        except RunBusy as e:  # another controller runs this variant: its job.json is that job's to write
            return {"variant": self.name, "state": "elsewhere", "message": one_line(e)}
        except Preempted as e:
            record_job(run_dir, "stopped", str(e), step=e.step)
            if self.requeue:
                _hand_on_to_submitit()
            return {"variant": self.name, "state": "stopped", "step": e.step}
        except BaseException as e:
            record_job(run_dir, "failed", one_line(e))
            raise
        record_job(run_dir, "done", "")
        return {"variant": self.name, "state": "done"}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook: the same job again (training resumes from its own checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _export_submitit_distributed() -> None:
    """Inside a submitit job of several tasks: torch.distributed's environment (RANK, WORLD_SIZE, …),
    so the job joins its process group exactly as under torchrun."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _hand_on_to_submitit() -> None:
    """The checkpoint is written: deliver submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL, default
    USR2) to this process, whose handler — submitit's again now — requeues the job and exits."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signal.raise_signal(signal.Signals[f"SIG{name}" if not name.startswith("SIG") else name])


# ---------------------------------------------------------------- launchers


def launch(cfg: LauncherConfig, jobs: Sequence[VariantJob], runs_dir: Path, ctx=None) -> list[dict[str, Any]]:
    """Run every job with the configured launcher; returns one outcome per job, in order
    (``{"variant", "state": done | stopped | failed, ...}``)."""
    if cfg.name == "sequential":
        return _sequential(jobs, ctx)
    folder = Path(cfg.folder) if cfg.folder else runs_dir / ".submitit"
    if cfg.name == "local":
        return _local(cfg, jobs, folder)
    return _slurm(cfg, jobs, folder)


def _sequential(jobs: Sequence[VariantJob], ctx=None) -> list[dict[str, Any]]:
    """In this process, in turn; a failed variant does not stop the others, a stop signal does."""
    outcomes = []
    main = ctx is None or ctx.is_main
    for job in jobs:
        if main:
            print(f"sdeflow: variant '{job.name}' → {job.run_dir}", flush=True)
        try:
            outcome = job(ctx)
        except Exception as e:
            outcome = {"variant": job.name, "state": "failed", "message": one_line(e)}
            if main:
                print(f"sdeflow: variant '{job.name}' failed: {outcome['message']}", flush=True)
        outcomes.append(outcome)
        if outcome["state"] == "stopped":
            outcomes += [{"variant": j.name, "state": "pending"} for j in jobs[len(outcomes):]]
            break
    return outcomes


def _submitit():
    try:
        import submitit
    except ImportError:
        raise SdeflowError("the local and slurm launchers run jobs through submitit, which is not installed: "
                           "pip install 'sdeflow[slurm]'") from None
    return submitit


def visible_gpus() -> list[int]:
    """The GPUs this process may use, by the ids CUDA_VISIBLE_DEVICES gives them (else 0..n-1)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [int(i) for i in listed.split(",") if i.strip().isdigit()]
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _local(cfg: LauncherConfig, jobs: Sequence[VariantJob], folder: Path) -> list[dict[str, Any]]:
    """Up to ``cfg.jobs`` variants at once, each a submitit local job pinned to its own GPUs (or its
    share of the CPU threads). A signal to this process stops every running job with a checkpoint."""
    submitit = _submitit()
    gpus = visible_gpus() if cfg.gpus_per_job else []
    if cfg.gpus_per_job and len(gpus) < cfg.gpus_per_job:
        raise SdeflowError(f"launcher.gpus_per_job: {cfg.gpus_per_job} GPU(s) per job, but this machine shows "
                           f"{len(gpus)}")
    at_once = cfg.jobs or (len(gpus) // cfg.gpus_per_job if cfg.gpus_per_job else 2)
    threads = cfg.threads_per_job or max(1, (os.cpu_count() or 1) // at_once)
    waiting, running, outcomes, told = list(jobs), {}, {}, set()
    with StopRequests() as stop:
        while running or (waiting and not stop.requested):
            while waiting and not stop.requested and len(running) < at_once and len(gpus) >= cfg.gpus_per_job:
                job = attrs.evolve(waiting.pop(0), threads=None if cfg.gpus_per_job else threads)
                mine, gpus = gpus[:cfg.gpus_per_job], gpus[cfg.gpus_per_job:]
                executor = submitit.LocalExecutor(folder=folder)
                executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=len(mine),
                                           visible_gpus=mine, tasks_per_node=max(1, len(mine)))
                running[_submit_ignoring_sigint(executor, job)] = (job, mine)
                print(f"sdeflow: variant '{job.name}' → {job.run_dir} (local job {list(running)[-1].job_id}"
                      f"{', GPUs ' + ','.join(map(str, mine)) if mine else f', {threads} CPU thread(s)'})", flush=True)
            if stop.requested:
                for submitted in set(running) - told:
                    _stop_local(submitted)
                    told.add(submitted)
            time.sleep(0.2)
            for submitted in [j for j in running if j.done()]:
                job, mine = running.pop(submitted)
                gpus = sorted(gpus + mine)
                outcomes[job.name] = _outcome(submitted, job)
    return [outcomes.get(j.name, {"variant": j.name, "state": "pending"}) for j in jobs]


def _submit_ignoring_sigint(executor, job: VariantJob):
    """Submit with SIGINT ignored, a disposition the job's controller inherits: a Ctrl-C in the terminal
    then reaches each trainer (which stops with a checkpoint) and this launcher (which tells the jobs to
    stop), but not the controller, which would kill its tasks a second later."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return executor.submit(job)
    finally:
        signal.signal(signal.SIGINT, handler)


def _stop_local(job) -> None:
    """SIGTERM to a local job's controller, which hands it to its tasks (each stops with a checkpoint);
    submitit's local job id is the controller's process id."""
    try:
        os.kill(int(job.job_id), signal.SIGTERM)
    except (ProcessLookupError, ValueError):
        pass


def _outcome(submitted, job: VariantJob) -> dict[str, Any]:
    try:
        result = submitted.result()
        outcome = result[0] if isinstance(result, list) else result  # one result per task
    except Exception:
        record = read_job_record(Path(job.run_dir))
        message = record.get("message") or f"see {submitted.paths.stderr}"
        outcome = {"variant": job.name, "state": "failed", "message": message}
    if outcome["state"] == "failed":
        print(f"sdeflow: variant '{job.name}' failed: {outcome['message']}", flush=True)
    return outcome


def _slurm(cfg: LauncherConfig, jobs: Sequence[VariantJob], folder: Path) -> list[dict[str, Any]]:
    """One SLURM job per variant (an array when submitted together), DDP over the job's tasks."""
    submitit = _submitit()
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=30)
    except RuntimeError as e:  # no srun on PATH: not a SLURM login node
        raise SdeflowError(f"launcher.name: slurm: {e} (submit from a SLURM login node)") from None
    tasks = max(1, cfg.gpus_per_job)
    parameters = dict(time=cfg.time_minutes, nodes=cfg.nodes, ntasks_per_node=tasks, partition=cfg.partition,
                      account=cfg.account, cpus_per_task=cfg.cpus_per_task, setup=list(cfg.setup),
                      additional_parameters=dict(cfg.sbatch), signal_delay_s=120, job_name="sdeflow")
    if cfg.gpus_per_job:
        parameters["gpus_per_node"] = cfg.gpus_per_job
    if cfg.mem_gb:
        parameters["mem"] = f"{int(cfg.mem_gb * 1024)}M"
    if cfg.jobs:
        parameters["array_parallelism"] = cfg.jobs
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    jobs = [attrs.evolve(j, requeue=True) for j in jobs]
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    for s, job in zip(submitted, jobs):
        print(f"sdeflow: variant '{job.name}' → {job.run_dir} (SLURM job {s.job_id})", flush=True)
    if not cfg.wait:
        return [{"variant": j.name, "state": "submitted", "job_id": s.job_id} for s, j in zip(submitted, jobs)]
    return [_outcome(s, job) for s, job in zip(submitted, jobs)]
