"""Reliability principles (issue 27), each tried on more than the example that broke it: a record goes
only into the run it was read from (2), nothing stale is reused (3), every malformed file or value the
CLI reads is one line naming the file and the key (7), and the small things of 8. Principles 1 and 5
are tested in test_reliability.py, 6 in test_group_norm_silu.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sdeflow.api
from helpers_exp import (
    Killed,
    assert_one_line_error,
    die_at_step,
    finished_run,
    run_cli,
    snapshot,
    tiny_config,
    write_experiment,
)
from sdeflow.cli import main
from sdeflow.rundir.folder import FolderGone


@pytest.fixture
def trained(tmp_path, capsys):
    return finished_run(tmp_path, capsys)


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    """A finished sweep of two variants (base, score), copied afresh by :func:`sweep`."""
    folder = tmp_path_factory.mktemp("sweep")
    config = tiny_config(ablations=[{"name": "score", "set": {"parameterization.name": "score"}}])
    path = write_experiment(folder, config)
    assert main(["sweep", str(path), "--runs-dir", str(folder / "runs")]) == 0
    return folder


@pytest.fixture
def sweep(sweep_folder, tmp_path):
    """(experiment file, runs folder) of a private copy of the finished sweep."""
    shutil.copytree(sweep_folder, tmp_path / "s")
    return tmp_path / "s" / "tiny.yaml", tmp_path / "s" / "runs"


def moved_aside(run: Path) -> Path:
    (old,) = run.parent.glob(f"{run.name}.old-*")
    return old


# ------------------------------------------------------------------ 2: a record goes into the run it read


def test_an_evaluation_records_into_the_folder_it_read_after_a_restart_moved_it(trained, capsys):
    path, run = trained
    opened = sdeflow.api.open_run(run)  # an `sdeflow eval` that has read the run and is still evaluating
    assert run_cli(capsys, "train", path, "--run-dir", run, "--restart", "train.steps=2")[0] == 0
    new_run = snapshot(run)
    old = moved_aside(run)
    results = opened.evaluate("test", max_examples=8, show=False)
    assert snapshot(run) == new_run  # the new run got nothing of the old model's
    recorded = json.loads((old / "eval.json").read_text())["results"]
    assert results["elbo"]["bpd"] == pytest.approx(
        next(e["bpd"] for e in recorded.values() if e["n"] == 8 and e["estimator"] == "elbo"))
    assert "moved to" in capsys.readouterr().err
    sample = opened.built.save_samples(None, num=4)  # the default samples/ folder follows the run too
    assert sample.parent == old / "samples" and sample.exists()
    assert snapshot(run) == new_run


def test_an_evaluation_of_a_deleted_run_records_nothing_and_says_so(trained):
    _, run = trained
    opened = sdeflow.api.open_run(run)
    shutil.rmtree(run)
    run.mkdir()  # another folder under the old name: not the one the weights came from
    with pytest.raises(FolderGone, match="deleted or replaced"):
        opened.evaluate("test", max_examples=4, show=False)
    assert list(run.iterdir()) == []


# ------------------------------------------------------------------ 3: nothing stale is reused


@pytest.mark.parametrize(("edit", "key"), [
    ({"ablations": [{"name": "score", "set": {"parameterization.name": "score", "train.lr": 0.01}}]}, "train.lr"),
    ({"sde": {"name": "vp", "beta_min": 0.1, "beta_max": 10.0}}, "sde.beta_max"),  # the base file, both variants
    ({"eval": {"batch_size": 64, "max_examples": 8}}, "eval.max_examples"),
])
def test_a_sweep_whose_finished_variant_was_redefined_refuses_before_running_anything(sweep, capsys, edit, key):
    path, runs = sweep
    write_experiment(path.parent, tiny_config(
        **{"ablations": [{"name": "score", "set": {"parameterization.name": "score"}}], **edit}))
    before = snapshot(runs)
    status, _, err = run_cli(capsys, "sweep", path, "--runs-dir", runs)
    assert_one_line_error(status, err, "finished under other settings", key, "move the folder aside")
    assert snapshot(runs) == before


def test_a_sweep_rerun_with_only_logging_changed_skips_its_finished_variants(sweep, capsys):
    path, runs = sweep
    status, out, err = run_cli(capsys, "sweep", path, "--runs-dir", runs, "logging.progress=true", "sampler.steps=4",
                               "train.checkpoint_every=1")
    assert status == 0, err
    assert out.count("already finished") == 2


@pytest.mark.parametrize("deleted", ["checkpoints", "checkpoints/last.pt+previous.pt"])
def test_a_run_whose_checkpoints_were_deleted_is_not_silently_retrained(trained, capsys, deleted):
    path, run = trained
    if deleted == "checkpoints":
        shutil.rmtree(run / "checkpoints")
    else:
        for name in ("last.pt", "previous.pt"):
            (run / "checkpoints" / name).unlink()
    before = snapshot(run)
    for argv in (["train", path, "--run-dir", run], ["train", path, "--run-dir", run, "train.steps=8"],
                 ["eval", run], ["sample", run]):
        status, _, err = run_cli(capsys, *argv)
        assert_one_line_error(status, err, "metrics.jsonl records a checkpoint saved at step 4", "no checkpoint",
                              "--restart", notices=True)
        assert snapshot(run) == before
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "--restart")
    assert status == 0, err
    assert snapshot(moved_aside(run)) == before


def test_a_run_that_never_got_to_its_first_step_resumes_from_step_zero(tmp_path, capsys):
    path = write_experiment(tmp_path)
    run = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--run-dir", run)[0] == 0
    for name in ("checkpoints", "evals", "samples"):
        shutil.rmtree(run / name)
    for name in ("metrics.jsonl", "eval.json"):
        (run / name).unlink()  # as if the first step had run out of memory: config.yaml alone
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert status == 0, err


# ------------------------------------------------------------------ 7: one line for every malformed input

LONG_INT = "1" * 5000


@pytest.mark.parametrize(("text", "fragments"), [
    ("name: caf\xe9\n".encode("latin-1"), ["not UTF-8", "line 1"]),
    (f"name: x\ntrain:\n  steps: {LONG_INT}\n".encode(), ["unreadable value", "4300 digits"]),
    (b"\x00\x01name: x\n", ["malformed YAML"]),
    (b"a: " + b"[" * 5000 + b"]" * 5000, ["nested too deeply"]),
])
def test_a_malformed_experiment_file_is_one_line(tmp_path, capsys, text, fragments):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text)
    status, _, err = run_cli(capsys, "check", bad)
    assert_one_line_error(status, err, str(bad), *fragments)


@pytest.mark.parametrize("override", [f"train.steps={LONG_INT}", f"sde.beta_max={LONG_INT}.5e1"])
def test_a_value_too_long_to_read_is_one_line(tmp_path, capsys, override):
    status, _, err = run_cli(capsys, "check", write_experiment(tmp_path), override)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def damage_eval(run: Path, change) -> None:
    data = json.loads((run / "eval.json").read_text())
    change(data)
    (run / "eval.json").write_text(json.dumps(data))


EVAL_DAMAGE = {
    "results a list": (lambda d: d.update(results=[1, 2]), "results", "a mapping of evaluations"),
    "headline bpd a string": (lambda d: d["test"]["elbo"].update(bpd="x"), "test.elbo.bpd", "a finite number"),
    "headline bpd NaN": (lambda d: d["test"]["elbo"].update(bpd=float("nan")), "test.elbo.bpd", "a finite number"),
    "step a string": (lambda d: d["val"]["elbo"].update(step="x"), "val.elbo.step", "an integer"),
    "an entry a string": (lambda d: d["test"].update(elbo="hello"), "test.elbo", "a result"),
    "split section a list": (lambda d: d.update(val=[1]), "val", "a mapping of estimator"),
    "format missing": (lambda d: d.pop("format"), "format: missing", "format-2"),
    "format a string": (lambda d: d.update(format="2"), "format", "an integer"),
    "split unknown": (lambda d: next(iter(d["results"].values())).update(split="dev"), ".split", "one of"),
}


@pytest.mark.parametrize("damage", sorted(EVAL_DAMAGE))
@pytest.mark.parametrize("command", ["eval", "summary"])
def test_a_damaged_eval_json_is_one_line_naming_the_key_and_is_never_rewritten(trained, capsys, damage, command):
    path, run = trained
    change, key, expected = EVAL_DAMAGE[damage]
    damage_eval(run, change)
    before = snapshot(run)
    if command == "eval":
        status, _, err = run_cli(capsys, "eval", run, "--max-examples", "4")
        assert_one_line_error(status, err, "eval.json", key, expected, notices=True)
    else:  # a sweep's summary goes on without the damaged run, and says which file and why
        status, _, err = run_cli(capsys, "sweep", "--summary", run.parent, "--baseline", "run")
        assert status == 0, err
        warning = [line for line in err.splitlines() if "warning" in line]
        assert len(warning) == 1 and key in warning[0] and "eval.json" in warning[0], err
    assert snapshot(run) == {**before, **{k: v for k, v in snapshot(run).items() if k.startswith("summary")
                                          or k == "bpd.png" or k.startswith("evals/")}}


@pytest.mark.parametrize(("raw", "fragment"), [
    (b'{"format": 2, "results": {}, "x": "\xe9"}', "not UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"format": 2, "results": {}, "n": ' + LONG_INT.encode() + b"}", "unreadable value"),
    (b'{"format": 2, "results": ', "not valid JSON"),
])
def test_an_unreadable_eval_json_is_one_line(trained, capsys, raw, fragment):
    _, run = trained
    (run / "eval.json").write_bytes(raw)
    status, _, err = run_cli(capsys, "eval", run, "--max-examples", "4")
    assert_one_line_error(status, err, "eval.json", fragment, notices=True)
    assert (run / "eval.json").read_bytes() == raw


@pytest.mark.parametrize(("damage", "fragment"), [
    ("truncated", "rows, but its eval.json entry has n = 16 (truncated?)"),
    ("torn row", "expected 3 values"),
    ("nan", "nats is 'nan', expected a finite number"),
    ("text", "bpd is 'oops', expected a finite number"),
    ("missing", "cannot read per-example record"),
    ("header", "expected the header index,nats,bpd"),
])
def test_a_damaged_per_example_record_is_named_in_the_summary(sweep, capsys, damage, fragment):
    _, runs = sweep
    (csv_path,) = (runs / "score" / "evals").glob("test.elbo.*.csv")
    lines = csv_path.read_text().splitlines()
    if damage == "truncated":
        csv_path.write_text("\n".join(lines[:5]) + "\n")
    elif damage == "torn row":
        csv_path.write_text("\n".join(lines[:5] + [lines[5][:3]] + lines[6:]) + "\n")
    elif damage == "nan":
        csv_path.write_text("\n".join(lines[:3] + ["2,nan,nan"] + lines[4:]) + "\n")
    elif damage == "text":
        csv_path.write_text("\n".join(lines[:3] + ["2,1.0,oops"] + lines[4:]) + "\n")
    elif damage == "missing":
        csv_path.unlink()
    else:
        csv_path.write_text("\n".join(["a,b,c"] + lines[1:]) + "\n")
    status, _, err = run_cli(capsys, "sweep", "--summary", runs)
    assert status == 0, err
    (warning,) = [line for line in err.splitlines() if "warning" in line]
    assert str(csv_path) in warning and fragment in warning and "no paired s.e. for score" in warning
    rows = {r.split(",")[0]: r for r in (runs / "summary.csv").read_text().splitlines()}
    assert "nan" not in rows["score"]


@pytest.mark.parametrize(("plan", "fragment"), [
    (b"[1]", "variants: expected a list"),
    (b'{"baseline": "base", "variants": [{"name": "..", "changes": {}}]}', "variants: expected a list"),
    (b'{"baseline": "base", "variants": [{"name": "../x", "changes": {}}]}', "variants: expected a list"),
    (b'{"baseline": 3, "variants": []}', "baseline: expected"),
    (b'{"variants": "\xe9"}', "not UTF-8"),
    (b'{"variants": [', "not valid JSON"),
])
@pytest.mark.parametrize("command", ["summary", "sweep"])
def test_a_damaged_sweep_plan_is_one_line(sweep, capsys, plan, fragment, command):
    path, runs = sweep
    (runs / "sweep.json").write_bytes(plan)
    before = snapshot(runs)
    argv = ["sweep", "--summary", runs] if command == "summary" else ["sweep", path, "--runs-dir", runs]
    status, _, err = run_cli(capsys, *argv)
    assert_one_line_error(status, err, "sweep.json", fragment)
    assert snapshot(runs) == before


@pytest.mark.parametrize("record", [b"[1]", b'{"state": 3}', b"\xe9", b"{"])
def test_a_damaged_job_record_reads_as_no_record(sweep, capsys, record):
    _, runs = sweep
    (runs / "score" / "job.json").write_bytes(record)
    status, out, err = run_cli(capsys, "sweep", "--status", runs)
    assert status == 0, err
    assert "score" in out and "done" in out


def test_an_unexpected_exception_is_one_line_pointing_to_debug(trained, capsys, monkeypatch):
    _, run = trained

    def broken(*args, **kwargs):
        raise TypeError("a bug in a plugin")

    monkeypatch.setattr(sdeflow.api.Run, "evaluate", broken)
    status, _, err = run_cli(capsys, "eval", run)
    assert status == 1
    assert err.strip().splitlines() == [
        "sdeflow: error: internal error (TypeError: a bug in a plugin); rerun with --debug for the traceback, and "
        "please report it"]
    with pytest.raises(TypeError):
        run_cli(capsys, "--debug", "eval", run)


# ------------------------------------------------------------------ 8: small things


def test_the_standard_error_of_one_example_is_undefined_not_zero(trained, capsys):
    _, run = trained
    status, out, err = run_cli(capsys, "eval", run, "--max-examples", "1")
    assert status == 0, err
    assert "± n/a (one example)" in out
    entries = json.loads((run / "eval.json").read_text())["results"].values()
    one = [e for e in entries if e["n"] == 1]
    assert one and all(e["bpd_se"] is None and e["nats_se"] is None for e in one)


def test_two_sweep_controllers_on_one_folder_both_succeed(tmp_path):
    config = tiny_config(ablations=[{"name": "score", "set": {"parameterization.name": "score"}},
                                    {"name": "lr", "set": {"train.lr": 0.01}}])
    path = write_experiment(tmp_path, config)
    argv = [sys.executable, "-m", "sdeflow", "sweep", str(path), "--runs-dir", str(tmp_path / "runs")]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 0, second.stderr
    for name in ("base", "score", "lr"):
        assert (tmp_path / "runs" / name / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(("sections", "fragments"), [
    ({"data": {"name": "cifar10", "root": "nowhere", "download": False}, "network": {"name": "unet", "ch": 12}},
     ["network.ch", "multiple of num_groups=32"]),
    ({"data": {"name": "mnist", "root": "nowhere", "download": False}, "dequantizer": {"name": "variational"}},
     ["dequantizer", "does not train"]),
    ({"data": {"name": "imagenet32", "root": "nowhere"}}, ["data.version", "required"]),
])
def test_check_runs_the_checks_train_runs_without_reading_data(tmp_path, capsys, sections, fragments):
    path = write_experiment(tmp_path, **sections)
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, *fragments)
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, *fragments)  # the same refusal, before any data is read
    assert not (tmp_path / "run").exists()


def test_a_small_mnist_format_set_is_refused_with_the_n_val_that_would_fit(tmp_path, capsys):
    from fakedata import write_mnist

    write_mnist(tmp_path / "data", n_train=40, n_test=10)
    path = write_experiment(tmp_path, data={"name": "mnist", "root": str(tmp_path / "data"), "download": False})
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, "data.n_val", "less than the 40 training examples", "set data.n_val (e.g. 4")
    path = write_experiment(tmp_path, data={"name": "mnist", "root": str(tmp_path / "data"), "download": False,
                                            "n_val": 4}, network={"name": "mlp", "hidden": 8, "depth": 1})
    assert run_cli(capsys, "check", path)[0] == 0


# ------------------------------------------------------------------ 6: nothing changes before a step has run


def test_a_process_that_dies_in_its_first_step_leaves_config_yaml_as_it_was(trained, capsys, monkeypatch):
    path, run = trained
    before = (run / "config.yaml").read_bytes()
    with monkeypatch.context() as patch:
        die_at_step(patch, 5)  # the first step this resumed run takes
        with pytest.raises(Killed):
            run_cli(capsys, "train", path, "--run-dir", run, "train.steps=8", "train.lr=0.002")
    assert (run / "config.yaml").read_bytes() == before  # no history entry for steps that never ran
    status, _, err = run_cli(capsys, "train", path, "--run-dir", run, "train.steps=8", "train.lr=0.002")
    assert status == 0 and "train.lr changed on resume: 0.001 → 0.002" in err
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history == [{"from_step": 0, "to_step": 4, "settings": {"train.lr": 0.001, "train.steps": 4}}]


def test_a_fresh_run_that_dies_in_its_first_step_writes_no_config(tmp_path, capsys, monkeypatch):
    path = write_experiment(tmp_path)
    die_at_step(monkeypatch, 1)
    with pytest.raises(Killed):
        run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
