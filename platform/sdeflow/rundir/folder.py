"""A run folder as a record: one writer at a time (its lock), its checkpoints (last, previous) and the
fallback between them, config.yaml with the history of its settings, and the rules for resuming it:
which changed settings are announced, which refused, and what ``--restart`` moves aside."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..components.registry import Registry
from ..core import hookspecs
from ..core.errors import ConfigError, SdeflowError
from ..experiment.config import Experiment, read_yaml, structure
from .checkpoint import UnreadableCheckpoint, load, non_finite_entries, remove_stale_temporaries, write_error
from .log import flatten, read_metrics
from .results import EVAL_FILE

CONFIG_FILE = "config.yaml"
LAST = Path("checkpoints") / "last.pt"
PREVIOUS = Path("checkpoints") / "previous.pt"
LOCK_FILE = ".lock"
RECORDS = ("sdeflow", "plugins", "history")
"""Keys of config.yaml that record the run rather than configure it."""
COMPLETE = 2
"""``sdeflow.experiment.config`` of a config.yaml that holds every effective setting (sdeflow > 0.1): read strictly.
Without it (older runs), a setting the file does not hold takes today's default, and that is said."""


class DamagedConfig(ConfigError):
    """A run's complete config.yaml lacks a setting (cut short, edited): never filled with defaults."""


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



class FolderGone(SdeflowError):
    """The run folder a command read was deleted or replaced before it could record its result."""


class PinnedFolder:
    """A run folder followed by identity, not by name: a command that reads a run (eval, sample) records
    into that folder wherever it is now, since ``train --restart`` may move it aside meanwhile and
    start a new run under the old name. Linux names an open folder's current path in /proc; elsewhere
    the folder must still be at its path."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.resolved = self.path.resolve()
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        self.moved_to: Path | None = None

    def now(self) -> Path:
        """The folder's path now (its original name while it has not moved)."""
        try:
            where = Path(os.readlink(f"/proc/self/fd/{self.fd}"))
        except OSError:
            where = self.resolved
        if not self._is_ours(where):
            raise FolderGone(f"{self.path}: the run folder was deleted or replaced while this command read it; "
                             "nothing was recorded")
        if where == self.resolved:
            return self.path
        if where != self.moved_to:
            say(f"{self.path} was moved to {where} while this command ran (train --restart?); its records go there")
            self.moved_to = where
        return where

    def _is_ours(self, where: Path) -> bool:
        try:
            here, ours = os.stat(where), os.fstat(self.fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


def say(message: str) -> None:
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
            bad = non_finite_entries(state)
            if bad:
                raise UnreadableCheckpoint(f"{path}: holds non-finite weights ({', '.join(bad[:3])}"
                                           f"{', …' if len(bad) > 3 else ''}), the update that wrote it diverged")
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
    orphaned = records_of_weights(run_dir)
    if orphaned:
        raise UnreadableCheckpoint(f"{run_dir}: {orphaned}, but no checkpoint (not saved yet, or checkpoints/ "
                                   "deleted?); training from step 0 here would mix a new model's records with them: "
                                   "--restart moves this run aside and starts afresh")
    return None


def records_of_weights(run_dir: Path) -> str | None:
    """What the folder records of saved or evaluated weights (a checkpoint written, evaluations), or None:
    steps logged before a first checkpoint are lost work, which training from step 0 replaces."""
    saved = [r["step"] for r in read_metrics(run_dir) if "checkpoint" in r] if run_dir.is_dir() else []
    if saved:
        return f"metrics.jsonl records a checkpoint saved at step {max(saved)}"
    if (run_dir / EVAL_FILE).exists():
        return f"{EVAL_FILE} records evaluations of its weights"
    return None


# ---------------------------------------------------------------- resuming honestly

REFUSED = ("seed", "train.batch_size", "bound")
"""Settings whose change on resume breaks exact resume (besides any component's), refused unless allowed:
the bound is what the ELBO loss trains and how the data are dequantized (MATH.md §15)."""
HARMLESS = ("sampler.", "data.root", "data.download")
"""Component settings that do not touch training: how samples are drawn, where the data lies."""
STEPPING = ("optimizer.", "lr_schedule.")
"""Component sections that say how the weights are stepped, not what is trained: announced on resume
like ``train.lr``, not refused."""


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
    if key.startswith(HARMLESS + STEPPING):
        return False
    return key in REFUSED or key.split(".", 1)[0] in components


def history_entry(changes: Mapping[str, tuple[Any, Any]], from_step: int, to_step: int) -> dict[str, Any]:
    """One step range of config.yaml's ``history``: the values the changed settings had then."""
    return {"from_step": from_step, "to_step": to_step, "settings": {k: old for k, (old, _) in changes.items()}}


def dump_config(exp: Experiment, plugins: dict[str, Any], history: list[dict[str, Any]] | None = None) -> str:
    """config.yaml: a header (first, so a file cut short keeps it), every effective setting of ``exp``
    (component arguments with their defaults), then the records."""
    records: dict[str, Any] = {"plugins": plugins}
    if history:
        records["history"] = history
    header = {"sdeflow": {"config": COMPLETE, "version": installed_version()}}
    return yaml.safe_dump({**header, **exp.to_dict(), **records}, sort_keys=False, allow_unicode=True)


def installed_version() -> str:
    """sdeflow's version as installed (``0+unknown`` in a source tree that was never installed)."""
    try:
        return importlib.metadata.version("sdeflow")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def run_experiment(run_dir: str | Path, registry: Registry, notice: Callable[[str], None]) -> Experiment:
    """The experiment of a run's config.yaml, read strictly: a complete file missing a setting is damaged
    (one line naming the key); an older, incomplete one takes today's defaults for what it lacks, said once."""
    path = Path(run_dir) / CONFIG_FILE
    records = read_run_records(run_dir)
    raw = {k: v for k, v in records.items() if k not in RECORDS}
    exp = structure(raw, str(path), registry, prefer=recorded_plugins(run_dir))
    filled = filled_settings(raw, exp)
    header = records.get("sdeflow")
    if isinstance(header, Mapping) and header.get("config") == COMPLETE:
        if filled:
            first, more = next(iter(filled)), len(filled) - 1
            raise DamagedConfig(f"{path}: {first}: missing{f' (and {more} more)' if more else ''};"
                                " a run's config.yaml holds every setting it ran with, so this one is damaged "
                                "(cut short?): restore it, or --restart the run")
    elif filled:
        shown = ", ".join(f"{k}={v!r}" for k, v in list(filled.items())[:4])
        notice(f"{path} predates complete configs: {len(filled)} setting(s) it does not hold take today's "
               f"defaults ({shown}{', …' if len(filled) > 4 else ''})")
    return exp


def filled_settings(raw: Mapping[str, Any], exp: Experiment) -> dict[str, Any]:
    """{dotted key: value} of the settings of ``exp`` that ``raw`` (the file) does not hold: filled with defaults."""
    held = set(flatten(dict(raw)))
    return {k: v for k, v in flatten(exp.to_dict()).items() if k not in held and k != "name"}


# ---------------------------------------------------------------- taking a folder to write


def take_folder(run_dir: Path, restart: bool, notice: Callable[[str], None]) -> RunLock:
    """Lock the run folder (one writer per run), moving an old run aside first with ``restart``;
    temporaries of a writer killed mid-save are removed. Returns the held lock."""
    lock = RunLock(run_dir).acquire()
    if restart and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
        n = 1
        while backup.exists():  # two restarts within one second
            backup, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}"), n + 1
        old_lock, lock = lock, RunLock(run_dir)
        os.rename(run_dir, backup)  # the held lock file moves with it; a rename never copies
        lock.acquire()  # the new folder's lock before the old one is let go
        old_lock.release()
        notice(f"--restart: moved the previous run to {backup}")
    for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
        notice(f"removed {tmp}, left by a writer that was killed mid-write")
    return lock


def changes_since(run_dir: Path, exp: Experiment, registry: Registry
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[Any, Any]]]:
    """(the run's config, ``exp``'s, {dotted key: (old, new)} of every setting that differs), component
    names qualified by plugin; settings added since the run began compare with their defaults."""
    recorded = recorded_plugins(run_dir)
    try:
        old = run_experiment(run_dir, registry, say).to_dict()
    except DamagedConfig:
        raise
    except SdeflowError:  # a name no plugin registers now, a value no longer valid: compared as written
        old = read_run_config(run_dir)
    old = qualified_components(old, registry, recorded)
    new = qualified_components(exp.to_dict(), registry, recorded)
    return old, new, config_changes(old, new)


OUTSIDE_RESULTS = (*HARMLESS, "logging.", "device", "train.num_workers", "train.checkpoint_every",
                   "train.checkpoint_minutes")
"""Settings a finished run's results do not depend on (how it logged, where, on what device)."""


def check_changes(run_dir: Path, exp: Experiment, registry: Registry, *, allow_changes: bool,
                  notice: Callable[[str], None]) -> dict[str, tuple[Any, Any]]:
    """Announce every setting changed since the run's config.yaml; refuse those that break exact
    resume (seed, batch size, components) unless ``allow_changes``."""
    old, new, changes = changes_since(run_dir, exp, registry)
    # With no checkpoint nothing trained survives: a new seed or batch size breaks nothing.
    strict = not allow_changes and any((run_dir / p).exists() for p in (LAST, PREVIOUS))
    for key, (before, after) in changes.items():
        kind = key.split(".", 1)[0]
        if not breaks_exact_resume(key, exp.components):
            continue
        if not allow_changes and kind in exp.components:  # another experiment: refused always
            raise SdeflowError(
                f"{run_dir}: holds a run with a different {kind} ({old.get(kind)} vs {new.get(kind)}); "
                "use --restart or another --run-dir (or --allow-changes to load its weights anyway)")
        if strict:
            raise SdeflowError(
                f"{run_dir}: {key} changed on resume ({before} → {after}), which breaks exact resume; "
                "use --allow-changes to go on anyway, --restart to start afresh, or another --run-dir")
    for key, (before, after) in changes.items():
        notice(f"{key} changed on resume: {before} → {after}")
    return changes


def history_with(run_dir: Path, changes: Mapping[str, tuple[Any, Any]], step: int) -> list[dict[str, Any]]:
    """config.yaml's record of earlier settings, with one more step range if settings changed now."""
    path = run_dir / CONFIG_FILE
    history = list((read_run_records(run_dir).get("history") or []) if path.exists() else [])
    if changes and step > 0:
        start = history[-1]["to_step"] if history else 0
        history.append(history_entry(changes, start, step))
    return history
