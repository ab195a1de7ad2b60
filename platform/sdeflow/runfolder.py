"""A run folder as a record: one writer at a time (its lock), its checkpoints (last, previous) and the
fallback between them, config.yaml with the history of its settings, and the rules for resuming it:
which changed settings are announced, which refused, and what ``--restart`` moves aside."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from . import hookspecs
from .checkpoint import UnreadableCheckpoint, load, non_finite_entries, remove_stale_temporaries, write_error
from .config import Experiment, read_yaml, structure
from .errors import ConfigError, SdeflowError
from .registry import Registry
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
    return None


# ---------------------------------------------------------------- resuming honestly

REFUSED = ("seed", "train.batch_size", "bound")
"""Settings whose change on resume breaks exact resume (besides any component's), refused unless allowed:
the bound is what the ELBO loss trains and how the data are dequantized (MATH.md §15)."""
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


def check_changes(run_dir: Path, exp: Experiment, registry: Registry, *, allow_changes: bool,
                  notice: Callable[[str], None]) -> dict[str, tuple[Any, Any]]:
    """Announce every setting changed since the run's config.yaml; refuse those that break exact
    resume (seed, batch size, components) unless ``allow_changes``."""
    recorded = recorded_plugins(run_dir)
    old = read_run_config(run_dir)
    with contextlib.suppress(SdeflowError):  # settings added since the run began take their defaults
        old = structure(old, str(run_dir / CONFIG_FILE), registry, prefer=recorded).to_dict()
    old = qualified_components(old, registry, recorded)
    new = qualified_components(exp.to_dict(), registry, recorded)
    changes = config_changes(old, new)
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
