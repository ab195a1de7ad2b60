"""Stopping on request: a preempted or interrupted run ends with a checkpoint, never mid-step.

Clusters preempt with SIGTERM (SLURM, Kubernetes) or a user signal sent ahead of the time limit (SLURM's
``--signal``; submitit's is SIGUSR2), and a person stops a run with Ctrl-C (SIGINT). While training,
each of them only *asks* to stop: the step in progress finishes, the checkpoint is written atomically,
the logs are flushed, and the run exits with :data:`EXIT_PREEMPTED`, so a launcher knows to requeue it.
Running the same command again resumes exactly where it stopped. Later signals while stopping are
noted and ignored (the save is atomic either way; SIGKILL still kills).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from ..core.errors import SdeflowError

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
                     if hasattr(signal, name))

EXIT_PREEMPTED = 75
"""The exit status of a run stopped by a signal after saving: sysexits' EX_TEMPFAIL, "try again"."""


class Stopped(SdeflowError):
    """Work stopped on a signal with everything saved (not an error): the CLI exits with status 75."""

    exit_code = EXIT_PREEMPTED


class Preempted(Stopped):
    """Training stopped on a signal after writing its checkpoint; rerunning resumes it."""

    def __init__(self, signum: int, step: int, where: str):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} with a checkpoint in {where}; "
                         "run the same command again to resume")


class StopRequests:
    """While active (a ``with`` block in the main thread), the stop signals set :attr:`signum`
    instead of killing the process; the handlers that were there before come back afterwards."""

    def __init__(self, say=None):
        self.signum: int | None = None
        self._say = say or (lambda message: print(f"sdeflow: {message}", file=sys.stderr))
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _request(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            self._say(f"received {name}: stopping after this step, with a checkpoint")
        else:
            self._say(f"received {name} again: still stopping; the checkpoint is written atomically")

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Timer:
    """Due every ``minutes`` of wall time (never when ``minutes`` is 0 or None)."""

    def __init__(self, minutes: float | None):
        self.seconds = 60.0 * minutes if minutes else None
        self.reset()

    def reset(self) -> None:
        self.start = time.monotonic()

    @property
    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start >= self.seconds
