"""Fault injection on run folders (issue 13): one writer per run, no lost results, no silent garbage.

Each test reproduces one attack from the fault-injection table and asserts the outcome the platform
promises: a one-line error naming the file and the key, or a recovery said in one line, and never a
result or a file lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

import sdeflow.likelihood.elbo
from helpers_exp import (
    assert_one_line_error,
    finished_run,
    losses,
    run_cli,
    snapshot,
    tiny_config,
    write_experiment,
)
from sdeflow.core.errors import ConfigError
from sdeflow.experiment.config import safe_load_capped
from sdeflow.rundir.checkpoint import load
from sdeflow.rundir.folder import RunLock
from sdeflow.rundir.log import read_metrics
from sdeflow.rundir.results import per_example

LAST = Path("checkpoints") / "last.pt"
PREVIOUS = Path("checkpoints") / "previous.pt"


def sdeflow_process(*argv, script: str = "", **kwargs) -> subprocess.Popen:
    """``sdeflow ARGV`` in a fresh Python process, after running ``script`` (e.g. a fault to inject)."""
    code = textwrap.dedent(script) + "\nimport sys\nfrom sdeflow.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def trained(tmp_path, capsys):
    return finished_run(tmp_path, capsys)


# ------------------------------------------------------------------ one writer per run


def test_a_second_trainer_on_a_busy_run_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(train={"steps": 200_000, "log_every": 100,
                                                         "checkpoint_every": 100}))
    run = tmp_path / "run"
    first = sdeflow_process("train", path, "--run-dir", run)
    try:
        deadline = time.monotonic() + 60
        while not any("checkpoint" in r for r in read_metrics(run)):  # training is under way, and saved
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        before = losses(run)
        status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.lr=0.01")
        assert_one_line_error(status, err, str(run), f"PID {first.pid}", "on host", "--run-dir")
        assert losses(run)[: len(before)] == before  # the first run's records are still there
        status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "--restart")
        assert_one_line_error(status, err, "in use by")  # --restart must not move a live run aside
        assert not list(tmp_path.glob("run.old-*"))
    finally:
        first.kill()
        first.communicate()
    # SIGKILL leaves no stale lock: the next trainer resumes from the first one's checkpoint
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=2000")
    assert status == 0, err
    assert "resuming" in err


def test_the_lock_is_held_by_training_and_released_after(tmp_path, capsys):
    path = write_experiment(tmp_path)
    run = tmp_path / "run"
    holder = RunLock(run).acquire()
    try:
        status, _, err = run_cli(capsys, "train", path, "--run-dir", run)
        assert_one_line_error(status, err, f"PID {os.getpid()}")
        assert not (run / "config.yaml").exists()  # nothing was written by the refused trainer
    finally:
        holder.release()
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    RunLock(run).acquire().release()  # released when training ended


# ------------------------------------------------------------------ no result lost


def test_a_partial_or_train_split_evaluation_never_replaces_the_final_test_result(trained, capsys):
    path, run = trained
    headline = json.loads((run / "eval.json").read_text())["test"]
    for argv in (["--split", "train", "--max-examples", "20"], ["--max-examples", "8"], ["--split", "val"]):
        status, _, err = run_cli(capsys, "eval", run, *argv)
        assert status == 0, err
    saved = json.loads((run / "eval.json").read_text())
    assert saved["test"] == headline
    splits = sorted({(e["split"], e["n"]) for e in saved["results"].values() if e["estimator"] == "elbo"})
    assert splits == [("test", 8), ("test", 16), ("train", 20), ("val", 16)]
    assert all((run / e["per_example"]).exists() for e in saved["results"].values())
    status, out, _ = run_cli(capsys, "sweep", "--summary", run.parent, "--baseline", "run")
    assert status == 0 and f"{headline['elbo']['bpd']:.4f}" in out


def test_evaluation_records_are_keyed_and_kept_side_by_side(trained, capsys):
    _, run = trained
    for k in ("1", "2", "2"):  # the repeat replaces only itself
        assert run_cli(capsys, "eval", run, "--samples-per-example", k)[0] == 0
    saved = json.loads((run / "eval.json").read_text())
    keys = [key for key, e in saved["results"].items() if e["split"] == "test" and e["estimator"] == "elbo"]
    assert len(keys) == 2  # the training run's K = 1 and the first eval share a key; K = 2 twice: one key
    settings = {saved["results"][k]["settings"]["samples_per_example"] for k in keys}
    assert settings == {1, 2}
    headline = saved["test"]["elbo"]
    assert headline["settings"]["samples_per_example"] == 1  # the experiment's own K, not the ad-hoc K = 2
    values = per_example(run, "test", "elbo")
    assert values["index"].tolist() == list(range(16))
    assert float(values["bpd"].mean()) == pytest.approx(headline["bpd"], rel=1e-12)
    other = next(saved["results"][k] for k in keys if saved["results"][k]["settings"]["samples_per_example"] == 2)
    assert not other["full"] and per_example(run, entry=other)["bpd"].shape == (16,)


def test_a_nan_evaluation_is_an_error_and_is_not_recorded(trained, capsys, monkeypatch):
    _, run = trained
    before = snapshot(run)
    monkeypatch.setattr(sdeflow.likelihood.elbo, "elbo_integrand", lambda *a, **k: torch.tensor(float("nan")))
    status, _, err = run_cli(capsys, "eval", run)
    assert_one_line_error(status, err, "elbo on the test split is not finite", "nothing was recorded")
    assert snapshot(run) == before


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "wrong contents", "code-running pickle"])
def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(trained, capsys, damage):
    path, run = trained
    previous = load(run / PREVIOUS)["step"]
    good = (run / LAST).read_bytes()
    if damage == "truncated":
        (run / LAST).write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        (run / LAST).write_bytes(b"")
    elif damage == "garbage":
        (run / LAST).write_bytes(os.urandom(4096))
    elif damage == "wrong contents":
        torch.save({"weights": torch.ones(3)}, run / LAST)
    else:
        (run / LAST).write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6")
    assert status == 0, err
    assert "weights_only" not in err
    (fallback,) = [line for line in err.splitlines() if "instead" in line]
    assert str(run / LAST) in fallback and f"resuming from {run / PREVIOUS} (step {previous})" in fallback
    assert load(run / LAST)["step"] == 6
    assert list((run / "checkpoints").glob("last.unreadable-*.pt"))  # kept for a post-mortem, out of the way
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]


def test_no_usable_checkpoint_is_one_line_pointing_to_restart(trained, capsys):
    path, run = trained
    (run / LAST).write_bytes(b"")
    (run / PREVIOUS).write_bytes(b"PK\x03\x04")
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert_one_line_error(status, err, "empty or truncated file", "no usable checkpoint", "--restart")
    assert "weights_only" not in err
    status, _, err = run_cli(capsys, "eval", run)
    assert_one_line_error(status, err, "no usable checkpoint")


def test_eval_reads_the_previous_checkpoint_when_the_last_is_torn(trained, capsys):
    _, run = trained
    (run / LAST).write_bytes((run / LAST).read_bytes()[:100])
    status, out, err = run_cli(capsys, "eval", run)
    assert status == 0 and "instead" in err and "bits/dim" in out
    assert (run / LAST).exists()  # a reader never renames anything


def test_a_kill_during_a_save_leaves_a_temporary_file_that_the_next_run_removes(tmp_path, capsys):
    path = write_experiment(tmp_path)
    run = tmp_path / "run"
    dying_save = """
        import os, signal, torch
        real_save, calls = torch.save, []
        def dying_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the checkpoint at step 4: half written, then SIGKILL
                f.write(b"PK" * 50_000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
    """
    process = sdeflow_process("train", path, "--run-dir", run, script=dying_save)
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    (stale,) = list((run / "checkpoints").glob(".last.pt.*.tmp"))
    assert stale.stat().st_size >= 100_000 and load(run / LAST)["step"] == 2
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert status == 0, err
    assert f"removed {stale}" in err and not stale.exists()
    assert load(run / LAST)["step"] == 4


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m"):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}); the disk-full "
                    "paths are covered by the monkeypatched tests in test_training.py")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Write a file until the disk is full."""
    with open(folder / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


def test_a_full_disk_is_one_line_naming_the_path_and_loses_nothing(tmp_path, capsys):
    path = write_experiment(tmp_path)
    with small_disk(tmp_path / "disk") as disk:
        run = disk / "run"
        assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
        before = snapshot(run)
        fill(disk)
        status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=8")
        assert_one_line_error(status, err, "No space left on device", str(run), notices=True)
        assert snapshot(run)[str(LAST)] == before[str(LAST)]
        assert load(run / LAST)["step"] == 4
        status, _, err = run_cli(capsys, "train", path, "--run-dir", disk / "fresh")  # full at the start
        assert_one_line_error(status, err, "No space left on device", str(disk / "fresh"), notices=True)
        status, _, err = run_cli(capsys, "sample", run, "--num", 8, "--out", disk / "s.png")
        assert_one_line_error(status, err, "s.png", "No space left on device")
        assert not (disk / "s.png").exists()  # no 0-byte picture
        assert not list(disk.rglob(".*.tmp"))


def test_run_files_are_created_with_the_users_umask(tmp_path, capsys):
    path = write_experiment(tmp_path)
    old = os.umask(0o002)
    try:
        assert run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")[0] == 0
    finally:
        os.umask(old)
    for name in ("config.yaml", "eval.json", str(LAST), str(PREVIOUS)):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o664, name


# ------------------------------------------------------------------ every value checked first


@pytest.mark.parametrize(("override", "fragments"), [
    ("train.grad_clip=-1", ["train.grad_clip", "must be positive", "or null"]),
    ("sde.beta_max=.inf", ["sde.beta_max", "expected a finite float", "inf"]),
    ("train.lr=.inf", ["train.lr", "expected a finite float"]),
    ("train.lr=.nan", ["train.lr", "expected a finite float"]),
    ("train.checkpoint_every=-1", ["train.checkpoint_every", "0 (never) or positive"]),
    ("train.log_every=-7", ["train.log_every", "0 (never) or positive, got -7"]),
    (f"seed={2**64}", ["seed", "[0, 2**63)"]),
    ("seed=-1", ["seed", "[0, 2**63)"]),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, capsys, override, fragments):
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "check", path, override)
    assert_one_line_error(status, err, "command line: ", *fragments)  # the value was given there
    status, _, err = run_cli(capsys, "train", path, override, "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_anything_is_written(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "train", path, "train.batch_size=1e12", "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, "train.batch_size", "1,000,000,000,000 examples", "available")
    assert not (tmp_path / "run").exists()
    assert run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")[0] == 0
    before = snapshot(tmp_path / "run")
    status, _, err = run_cli(capsys, "sample", tmp_path / "run", "--num", 10**12)
    assert_one_line_error(status, err, "--num", "available")
    assert snapshot(tmp_path / "run") == before


def test_a_yaml_anchor_bomb_is_refused_quickly(tmp_path, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nname: bomb\n")
    status, _, err = run_cli(capsys, "check", bomb)
    assert_one_line_error(status, err, str(bomb), "expands to more than 100,000 nodes")
    six = tmp_path / "six.yaml"
    six.write_text("\n".join(levels[:7]) + "\n")  # 9**6 = 531,441 nodes: 11.8 MB written back
    status, _, err = run_cli(capsys, "check", six)
    assert_one_line_error(status, err, "aliases counted")
    assert safe_load_capped("a: &x [1, 2]\nb: *x\n", "ok") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(ConfigError, match="expands"):
        safe_load_capped("a: &x [1, 2]\nb: [*x, *x]\n", "small", limit=5)


# ------------------------------------------------------------------ honest resume


@pytest.mark.parametrize(("override", "key"), [("seed=1", "seed"), ("train.batch_size=16", "train.batch_size")])
def test_resume_refuses_a_change_that_breaks_exact_resume(trained, capsys, override, key):
    path, run = trained
    before = snapshot(run)
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6", override)
    assert_one_line_error(status, err, str(run), f"{key} changed on resume", "--allow-changes", "--restart")
    assert snapshot(run) == before
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6", override, "--allow-changes")
    assert status == 0, err
    assert f"{key} changed on resume" in err
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history[-1]["from_step"] == 0 and history[-1]["to_step"] == 4
    assert history[-1]["settings"]["train.steps"] == 4 and key in history[-1]["settings"]


def test_every_change_on_resume_is_announced_and_kept_in_the_config_history(trained, capsys):
    path, run = trained
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6", "train.lr=0.01")
    assert status == 0, err
    assert "train.lr changed on resume: 0.001 → 0.01" in err and "train.steps changed on resume: 4 → 6" in err
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=8", "train.lr=0.01")
    assert status == 0, err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["lr"] == 0.01 and config["train"]["steps"] == 8
    assert config["history"] == [
        {"from_step": 0, "to_step": 4, "settings": {"train.lr": 0.001, "train.steps": 4}},
        {"from_step": 4, "to_step": 6, "settings": {"train.steps": 6}},
    ]
    assert run_cli(capsys, "eval", run)[0] == 0  # a config with a history still opens


def test_settings_added_since_a_run_began_are_not_changes(trained, capsys):
    path, run = trained
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["sdeflow"]  # as written by sdeflow 0.1: no header, so not a complete config
    del config["eval"]["stratify_time"], config["train"]["num_workers"], config["sde"]["t_eps"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6")
    assert status == 0, err
    assert [line for line in err.splitlines() if "changed on resume" in line] == [
        "sdeflow: train.steps changed on resume: 4 → 6"]
    (announced,) = [line for line in err.splitlines() if "predates complete configs" in line]
    assert "3 setting(s)" in announced and "sde.t_eps=0.001" in announced  # today's defaults, said once
    assert yaml.safe_load((run / "config.yaml").read_text())["sdeflow"]["config"] == 2  # now complete


def test_a_complete_config_missing_a_setting_is_damaged_not_filled(trained, capsys):
    path, run = trained
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["train"]["ema"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(run)
    for argv in (["eval", run], ["sample", run], ["train", path, "--run-dir", run, "train.steps=6"]):
        status, _, err = run_cli(capsys, *argv)
        assert_one_line_error(status, err, "config.yaml: train.ema: missing", "damaged")
        assert snapshot(run) == before


@pytest.mark.parametrize("cut", ["network:", "train:", "eval:", "  ode_method:", "sample:", "logging:"])
def test_a_config_cut_short_at_a_line_is_refused_and_nothing_is_replaced(trained, capsys, cut):
    _, run = trained
    lines = (run / "config.yaml").read_text().splitlines(keepends=True)
    (run / "config.yaml").write_text("".join(lines[: next(i for i, line in enumerate(lines) if line.startswith(cut))]))
    before = snapshot(run)
    status, _, err = run_cli(capsys, "eval", run)
    assert_one_line_error(status, err, "config.yaml", "missing")
    assert snapshot(run) == before


def test_rerunning_a_finished_run_does_nothing_but_say_so(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(logging={"progress": False, "tensorboard": True}))
    run = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    before = snapshot(run)
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert status == 0 and "nothing to do" in err and "--reevaluate" in err
    assert snapshot(run) == before  # no duplicate records, no new event file, no new samples
    status, out, err = run_cli(capsys, "train", path, "--run-dir", run, "--reevaluate")
    assert status == 0 and "bits/dim" in out
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]


# ------------------------------------------------------------------ damaged records


def test_a_damaged_metrics_file_is_skipped_line_by_line_and_resume_goes_on(trained, capsys):
    path, run = trained
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b"\xff\xfe{not json\n[1, 2]\n\"text\"\n{\"no\": \"step\"}\n")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6")
    assert status == 0, err
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ plugins fail loudly and locally

BOOM_IMPORT = 'raise ImportError("no module named torch_boom")\n'
EXITING = "import sys\nsys.exit(3)\n"
FAILING_FACTORIES = '''
from sdeflow.core.hookspecs import hookimpl
from sdeflow_builtin.sdes import VPSDE

def runtime(**kwargs):
    raise RuntimeError("CUDA kernel cache is corrupt")

def key(**kwargs):
    raise KeyError("beta")

def value(**kwargs):
    raise ValueError("math domain error")

@hookimpl
def sdeflow_register_sdes(register):
    register("runtime_sde", runtime)
    register("key_sde", key)
    register("value_sde", value)
'''
CLASH = '''
from sdeflow.core.hookspecs import hookimpl
from sdeflow_builtin.sdes import VPSDE

@hookimpl
def sdeflow_register_sdes(register):
    register("vp", VPSDE)
'''


def test_an_unknown_name_whose_plugin_failed_to_load_says_so(tmp_path, capsys, install_fake, plugin_env):
    install_fake("boomplug", "0.1", {"boomplug": BOOM_IMPORT})
    install_fake("exitplug", "0.1", {"exitplug": EXITING})
    path = write_experiment(tmp_path, sde={"name": "boom_sde"})
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, "unknown sde 'boom_sde'", "'boomplug' (ImportError: no module named torch_boom)",
                          "'exitplug' (SystemExit(3) at import)")


def test_a_plugin_exiting_at_import_does_not_end_the_command(tmp_path, capsys, install_fake, plugin_env):
    install_fake("exitplug", "0.1", {"exitplug": EXITING})
    status, out, err = run_cli(capsys, "train", write_experiment(tmp_path), "--run-dir", tmp_path / "run")
    assert status == 0 and "bits/dim" in out, err


@pytest.mark.parametrize(("name", "error"), [("runtime_sde", "RuntimeError: CUDA kernel cache is corrupt"),
                                             ("key_sde", "KeyError: 'beta'"),
                                             ("value_sde", "ValueError: math domain error")])
def test_a_failing_factory_names_its_plugin_and_component(tmp_path, capsys, install_fake, plugin_env, name, error):
    install_fake("failplug", "0.2", {"failplug": FAILING_FACTORIES})
    path = write_experiment(tmp_path, sde={"name": name})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, str(path), f"sde '{name}' of plugin 'failplug (failplug 0.2)'", error)


def test_a_name_clash_names_the_block_list_and_existing_runs_keep_their_plugin(trained, capsys, install_fake,
                                                                               plugin_env):
    path, run = trained
    install_fake("clashplug", "1.0", {"clashplug": CLASH})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, "sde 'vp' is registered by both", "SDEFLOW_DISABLE_PLUGINS=clashplug")
    for argv in (["eval", run], ["sample", run, "--num", 4, "--out", run.parent / "s.png"],
                 ["train", path, "--run-dir", run, "train.steps=6"],
                 ["train", path, "--run-dir", run, "train.steps=8", "sde.name=builtin-sdes:vp"]):
        status, _, err = run_cli(capsys, *argv)
        assert status == 0, (argv, err)
        assert "different sde" not in err
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"]["sde"]["plugin"] == "builtin-sdes"


def test_a_change_without_any_checkpoint_is_announced_not_refused(tmp_path, capsys):
    path = write_experiment(tmp_path, tiny_config(train={"checkpoint_every": 0}))
    run = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    for name in ("checkpoints/last.pt", "checkpoints/previous.pt", "metrics.jsonl", "eval.json"):
        (run / name).unlink(missing_ok=True)  # as if the first step had run out of memory: config.yaml alone
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.batch_size=16")
    assert status == 0 and "train.batch_size changed on resume: 32 → 16" in err


def test_sampling_and_data_location_settings_may_change_on_resume(trained, capsys):
    path, run = trained
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6", "sampler.steps=4")
    assert status == 0 and "sampler.steps changed on resume: 8 → 4" in err


def test_a_finished_run_rerun_with_other_settings_records_no_history(trained, capsys):
    path, run = trained
    before = (run / "config.yaml").read_bytes()
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "eval.batch_size=32")
    assert status == 0 and "nothing to do" in err
    assert (run / "config.yaml").read_bytes() == before


def test_an_eval_json_of_an_unknown_format_is_refused_not_wiped(trained, capsys):
    _, run = trained
    (run / "eval.json").write_text(json.dumps({"format": 3, "test": {}}))
    status, _, err = run_cli(capsys, "eval", run)
    assert_one_line_error(status, err, "eval.json format 3")
    assert json.loads((run / "eval.json").read_text()) == {"format": 3, "test": {}}


def test_deeply_nested_yaml_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    status, _, err = run_cli(capsys, "check", deep)
    assert_one_line_error(status, err, str(deep), "nested too deeply")


def test_three_estimators_on_the_val_split_write_three_per_example_records(trained, capsys):
    """README's line `sdeflow eval RUN --estimator elbo,dsm_elbo,ode --split val`: one result and one
    per-example file per estimator, on the same val examples, each a mean of its own file."""
    _, run = trained
    status, out, err = run_cli(capsys, "eval", run, "--estimator", "elbo,dsm_elbo,ode", "--split", "val")
    assert status == 0, err
    saved = json.loads((run / "eval.json").read_text())
    fresh = {name: saved["val"][name] for name in ("elbo", "dsm_elbo", "ode")}
    assert set(fresh) == {"elbo", "dsm_elbo", "ode"}
    files = {e["per_example"] for e in fresh.values()}
    assert len(files) == 3
    for name, entry in fresh.items():
        values = per_example(run, entry=entry)
        assert entry["split"] == "val" and entry["full"], name
        assert values["index"].tolist() == list(range(16)), name
        assert torch.isfinite(values["bpd"]).all(), name
        assert float(values["bpd"].mean()) == pytest.approx(entry["bpd"], rel=1e-9), name
        assert name in out


# ------------------------------------------------------------------ no poisoned checkpoint (issue 27, principle 1)


@pytest.mark.parametrize("steps", [5, 6, 7])
def test_an_update_that_breaks_the_weights_is_never_saved(trained, capsys, steps):
    """lr = 1e39 on resume: the loss of each step is computed before its update, so only the weights can tell.
    Whether the broken update falls on a checkpoint step (6), the final step (5, 7) or both, nothing is
    saved: last.pt and previous.pt keep their bytes, the error is one line, and the run resumes later."""
    path, run = trained
    before = {p: (run / p).read_bytes() for p in (LAST, PREVIOUS)}
    status, _, err = run_cli(capsys, "check", path, "train.lr=1e39")
    assert status == 0 and "train.lr: 1e+39 is far above any rate Adam trains with" in err
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.lr=1e39", f"train.steps={steps}",
                             "train.checkpoint_every=2", "--allow-changes")
    assert_one_line_error(status, err, "non-finite", str(run / LAST), notices=True)
    assert {p: (run / p).read_bytes() for p in (LAST, PREVIOUS)} == before
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6")
    assert status == 0, err
    assert load(run / LAST)["step"] == 6


def test_a_checkpoint_with_non_finite_weights_is_skipped_like_an_unreadable_one(trained, capsys):
    """A last.pt written with NaN weights (by an older sdeflow, or by hand) is not 'good': sample and eval
    fall back to previous.pt with one line, and resume sets it aside."""
    path, run = trained
    state = load(run / LAST)
    name = next(iter(state["ema"]))
    state["ema"][name] = torch.full_like(state["ema"][name], float("nan"))
    torch.save(state, run / LAST)
    status, _, err = run_cli(capsys, "sample", run, "--num", "4", "--out", run.parent / "s.png")
    assert status == 0, err
    (line,) = [line for line in err.splitlines() if "non-finite weights" in line]
    assert f"ema.{name}" in line and f"resuming from {run / PREVIOUS}" in line
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=6")
    assert status == 0, err
    assert list((run / "checkpoints").glob("last.unreadable-*.pt")) and load(run / LAST)["step"] == 6


# ------------------------------------------------------------------ paths a user names (issue 27, principle 5)


@pytest.mark.parametrize("target", ["eval.json", "config.yaml", "checkpoints/last.pt", "metrics.jsonl",
                                    "evals/x.png", "../run/eval.json", "sample.png"])
def test_sample_never_writes_over_a_runs_own_records(trained, capsys, target):
    path, run = trained
    before = snapshot(run)
    status, _, err = run_cli(capsys, "sample", run, "--num", "4", "--out", run / target)
    assert_one_line_error(status, err, "--out", "inside the run folder", "samples/", notices=True)
    assert snapshot(run) == before
    status, _, err = run_cli(capsys, "sample", run, "--num", "4", "--out", run / "samples" / "mine.png")
    assert status == 0, err
    assert (run / "samples" / "mine.png").exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "x" * 101])
def test_a_variant_name_that_would_leave_the_runs_folder_is_refused(tmp_path, capsys, name):
    config = tiny_config(ablations=[{"name": name, "set": {"train.lr": 0.01}}])
    path = write_experiment(tmp_path, config)
    status, _, err = run_cli(capsys, "sweep", path, "--runs-dir", tmp_path / "runs")
    assert_one_line_error(status, err, "ablations[0].name", "becomes a folder")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


def test_sweep_status_of_a_folder_that_is_not_a_sweep_is_an_error(tmp_path, capsys):
    status, _, err = run_cli(capsys, "sweep", "--status", tmp_path)
    assert_one_line_error(status, err, "--status", "holds no sweep")
