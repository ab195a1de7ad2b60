"""Sweep launchers (issue 17): sequential, local (submitit's local executor: real subprocesses) and slurm
(the job script submitit renders, submitted to a stand-in ``sbatch``); ``--status``; failures and stops."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from helpers_exp import assert_one_line_error, run_cli, tiny_config, write_experiment
from sdeflow.sweeps.jobstate import JOB_FILE
from sdeflow.sweeps.launchers import read_launcher
from sdeflow.training.preemption import EXIT_PREEMPTED

pytest.importorskip("submitit", reason="the local and slurm launchers need submitit: pip install -e '.[test]'")

FOUR = [{"name": "score", "set": {"parameterization.name": "score"}},
        {"name": "noise", "set": {"parameterization.name": "noise", "bound": "truncated"}},
        {"name": "debiased", "set": {"time_sampler.name": "debiased", "loss.weighting": "likelihood"}}]
"""With base: four variants."""


def swissroll_sweep(tmp_path, **train):
    config = tiny_config(data={"name": "swissroll", "n": 256, "n_test": 64, "n_val": 64}, ablations=FOUR,
                         train={"steps": 6, "checkpoint_every": 3, "log_every": 2, **train})
    return write_experiment(tmp_path, config)


def summary(runs) -> str:
    return (runs / "summary.csv").read_text()


def without_timing(csv_text: str) -> list[list[str]]:
    """The summary's rows without the wall-time columns (which differ between any two runs)."""
    lines = [line.split(",") for line in csv_text.splitlines()]
    drop = {lines[0].index("wall_s"), lines[0].index("it_per_s")}
    return [[v for i, v in enumerate(row) if i not in drop] for row in lines]


def test_the_local_launcher_runs_two_jobs_at_once_and_matches_the_sequential_summary(tmp_path, capsys):
    path = swissroll_sweep(tmp_path)
    status, _, err = run_cli(capsys, "sweep", path, "--runs-dir", tmp_path / "seq")
    assert status == 0, err
    status, out, err = run_cli(capsys, "sweep", path, "--runs-dir", tmp_path / "par", "--launcher", "local",
                               "--jobs", "2")
    assert status == 0, err
    assert out.count("(local job ") == 4 and "1 CPU thread(s)" in out  # 2 cores split between 2 jobs
    assert without_timing(summary(tmp_path / "par")) == without_timing(summary(tmp_path / "seq"))
    for name in ("base", "score", "noise", "debiased"):
        assert json.loads((tmp_path / "par" / name / JOB_FILE).read_text())["state"] == "done"
    status, out, _ = run_cli(capsys, "sweep", "--status", tmp_path / "par")
    assert status == 0 and out.split() == ["base", "done", "score", "done", "noise", "done", "debiased", "done"]


def test_a_failing_variant_does_not_stop_the_others_and_status_shows_its_error(tmp_path, capsys):
    ablations = [{"name": "exploding", "set": {"train.lr": 1.0e30}}, {"name": "fine", "set": {"train.lr": 0.002}}]
    path = write_experiment(tmp_path, tiny_config(ablations=ablations))
    runs = tmp_path / "runs"
    status, out, err = run_cli(capsys, "sweep", path, "--runs-dir", runs)
    assert status == 1 and "1 variant(s) failed: exploding: non-finite loss" in err
    assert (runs / "fine" / "eval.json").exists() and (runs / "summary.md").exists()
    status, out, _ = run_cli(capsys, "sweep", "--status", runs)
    states = dict(line.split(None, 1) for line in out.splitlines())
    assert states["base"] == "done" and states["fine"] == "done"
    assert states["exploding"].startswith("failed: non-finite loss")
    assert "exploding (failed: non-finite loss" in (runs / "summary.md").read_text()


def test_status_of_a_sweep_in_progress_says_pending_running_and_stopped(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(ablations=FOUR[:2]))
    runs = tmp_path / "runs"
    assert run_cli(capsys, "sweep", path, "--runs-dir", runs, "--only", "base")[0] == 0
    from sdeflow.rundir.folder import RunLock
    from sdeflow.sweeps.summary import write_plan
    from sdeflow.sweeps.sweep import prepare

    write_plan(runs, prepare(path))
    (runs / "score").mkdir()
    lock = RunLock(runs / "score").acquire()
    try:
        status, out, _ = run_cli(capsys, "sweep", "--status", runs)
    finally:
        lock.release()
    states = dict(line.split(None, 1) for line in out.splitlines())
    assert states == {"base": "done", "score": "running (step 0)", "noise": "pending"}


def test_a_sigterm_stops_a_local_sweep_with_a_checkpoint_in_every_running_variant(tmp_path, capsys):
    path = swissroll_sweep(tmp_path, steps=100_000, checkpoint_every=0, log_every=10)
    runs = tmp_path / "runs"
    code = "import sys; from sdeflow.cli.commands import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "sweep", str(path), "--runs-dir", str(runs),
                                "--launcher", "local", "--jobs", "2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    logs = [runs / name / "metrics.jsonl" for name in ("base", "score")]
    while not all(p.exists() and p.read_text().count("\n") >= 3 for p in logs):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=180)
    assert process.returncode == EXIT_PREEMPTED, err
    assert "saved mid-run: base, score" in err
    from sdeflow.rundir.checkpoint import load

    for name in ("base", "score"):
        record = json.loads((runs / name / JOB_FILE).read_text())
        assert record["state"] == "stopped"
        assert load(runs / name / "checkpoints" / "last.pt")["step"] == record["step"] > 0
    status, out, _ = run_cli(capsys, "sweep", "--status", runs)
    states = dict(line.split(None, 1) for line in out.splitlines())
    assert states["base"].startswith("stopped at step ") and states["noise"] == "pending"


def fake_sbatch(folder):
    """An ``sbatch`` that keeps the script it is given and answers as SLURM does."""
    script = folder / "sbatch"
    script.write_text(f"#!/bin/sh\ncp \"$1\" {folder}/submitted.sh\necho 'Submitted batch job 4242'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    srun = folder / "srun"  # submitit looks for it to tell a SLURM node; the job script calls it
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return script


def test_the_slurm_launcher_renders_the_requested_resources(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_sbatch(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = {"name": "slurm", "partition": "gpu", "account": "lab", "time_minutes": 90, "gpus_per_job": 4,
                "nodes": 2, "cpus_per_task": 8, "mem_gb": 32, "jobs": 1, "sbatch": {"qos": "high"},
                "setup": ["module load cuda"], "wait": False}
    path = write_experiment(tmp_path, tiny_config(ablations=FOUR[:1], launcher=launcher))
    status, out, err = run_cli(capsys, "sweep", path, "--runs-dir", tmp_path / "runs")
    assert status == 0, err
    assert "(SLURM job 4242_0)" in out and "(SLURM job 4242_1)" in out
    script = (bin_dir / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=90", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=32768M", "#SBATCH --qos=high", "#SBATCH --array=0-1%1",
                 "#SBATCH --signal=USR2@120", "module load cuda"):
        assert line in script, line


def test_the_slurm_launcher_off_a_cluster_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    path = write_experiment(tmp_path, tiny_config(launcher={"name": "slurm"}))
    status, _, err = run_cli(capsys, "sweep", path, "--runs-dir", tmp_path / "runs")
    assert_one_line_error(status, err, "launcher.name: slurm", "srun", "SLURM login node")


@pytest.mark.parametrize(("section", "fragments"), [
    ({"name": "local", "partition": "gpu"}, ["launcher.partition", "only for the slurm launcher"]),
    ({"name": "sequential", "jobs": 2}, ["launcher.jobs", "--launcher local"]),
    ({"name": "slurmm"}, ["launcher.name", "slurmm"]),
    ({"name": "local", "jbos": 2}, ["launcher.jbos", "did you mean 'jobs'"]),
    ({"name": "local", "jobs": 0}, ["launcher.jobs", "at least 1"]),
])
def test_a_bad_launcher_section_is_one_line_before_anything_runs(tmp_path, capsys, section, fragments):
    path = write_experiment(tmp_path, tiny_config(launcher=section))
    status, _, err = run_cli(capsys, "sweep", path, "--runs-dir", tmp_path / "runs")
    assert_one_line_error(status, err, str(path), *fragments)
    assert not (tmp_path / "runs").exists()


def test_the_command_line_launcher_replaces_the_files_own(tmp_path):
    data = {"launcher": {"name": "slurm", "partition": "gpu"}}
    assert read_launcher(data, "x.yaml", "local", 3).name == "local"
    assert read_launcher(data, "x.yaml", "local", 3).jobs == 3
    assert read_launcher(data, "x.yaml").partition == "gpu"


def test_the_launcher_section_does_not_enter_the_runs_config(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(launcher={"name": "sequential"}))
    runs = tmp_path / "runs"
    assert run_cli(capsys, "sweep", path, "--runs-dir", runs)[0] == 0
    assert "launcher" not in (runs / "base" / "config.yaml").read_text()
    shutil.rmtree(runs)
