"""A variant's job as its run folder records it: ``RUN/job.json`` (how the last job ended), the run's
lock (held while it trains) and its metrics, read back as the state ``sdeflow sweep --status`` prints."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from ..core.errors import SdeflowError
from ..rundir.checkpoint import write_text_atomic
from ..rundir.folder import LOCK_FILE
from ..rundir.log import read_metrics

JOB_FILE = "job.json"


def one_line(error: BaseException) -> str:
    """An error as one line of at most 300 characters (an sdeflow error's own text, else with its type)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:300] if not isinstance(error, SdeflowError) else text[:300]


def record_job(run_dir: Path, state: str, message: str, **extra: Any) -> None:
    """``RUN/job.json``: how the variant's last job ended (read by ``sdeflow sweep --status``)."""
    if not run_dir.is_dir():
        return
    record = {"state": state, "message": message, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    write_text_atomic(run_dir / JOB_FILE, json.dumps(record) + "\n")


def read_job_record(run_dir: Path) -> dict[str, Any]:
    """job.json, or {} when it is missing or damaged (the state is then read from the run itself)."""
    try:
        record = json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("state", ""), str) else {}


def is_locked(run_dir: Path) -> bool:
    """Whether a process holds the run folder's lock (i.e. is training or evaluating it now)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def variant_state(run_dir: Path, steps: int | None, finished: bool) -> str:
    """pending, running (step k/N), stopped at step k/N, failed: <its error line>, or done."""
    trained = [r["step"] for r in read_metrics(run_dir) if "loss" in r] if run_dir.is_dir() else []
    of = f"/{steps}" if steps else ""
    if is_locked(run_dir):
        return f"running (step {trained[-1] if trained else 0}{of})"
    if finished:
        return "done"
    record = read_job_record(run_dir)
    if record.get("state") == "failed":
        return f"failed: {record.get('message', '')}"
    if record.get("state") == "stopped" or trained:
        return f"stopped at step {record.get('step', trained[-1] if trained else 0)}{of}"
    return "pending"


