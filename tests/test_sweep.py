"""Ablations and sweeps: expansion, validation before any run, resume, and the summary table."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers_exp import assert_one_line_error, run_cli, snapshot, tiny_config, write_experiment
from sdeflow.core.errors import ConfigError, SdeflowError
from sdeflow.experiment.files import read_yaml
from sdeflow.rundir.log import read_metrics
from sdeflow.rundir.results import per_example
from sdeflow.sweeps.summary import own_settings_variant, write_summary
from sdeflow.sweeps.sweep import expand, prepare, run_sweep

SOURCE = "exp.yaml"


def test_ablations_cross_the_grid_with_names_and_counts():
    data = {"ablations": [{"name": "debiased", "set": {"time_sampler.name": "debiased"}},
                          {"name": "score", "set": {"parameterization.name": "score"}}],
            "sweep": {"sde.beta_max": [10, 20], "train.lr": [0.001, 0.01]}}
    variants = expand(data, SOURCE)
    assert len(variants) == 3 * 4
    assert [v.name for v in variants[:4]] == ["10-0.001", "10-0.01", "20-0.001", "20-0.01"]
    assert variants[4].name == "debiased-10-0.001"
    assert variants[4].changes == {"time_sampler.name": "debiased", "sde.beta_max": 10, "train.lr": 0.001}


def test_without_a_grid_the_base_run_comes_first():
    variants = expand({"ablations": [{"name": "score", "set": {"parameterization.name": "score"}}]}, SOURCE)
    assert [(v.name, v.changes) for v in variants] == [("base", {}), ("score", {"parameterization.name": "score"})]


def test_grid_values_override_the_ablation_and_the_command_line_overrides_both(tmp_path):
    config = tiny_config(ablations=[{"name": "a", "set": {"sde.beta_max": 5.0, "train.lr": 0.5}}],
                         sweep={"sde.beta_max": [7.0]})
    path = write_experiment(tmp_path, config)
    variants = {v.name: v.exp for v in prepare(path, ["train.lr=0.25"])}
    assert set(variants) == {"7.0", "a-7.0"}
    assert variants["a-7.0"].components["sde"]["beta_max"] == 7.0   # grid beats ablation
    assert variants["a-7.0"].train.lr == 0.25                       # command line beats ablation
    assert variants["7.0"].components["sde"]["beta_max"] == 7.0
    assert variants["a-7.0"].name == "tiny/a-7.0"


def test_duplicate_variant_names_are_refused():
    with pytest.raises(ConfigError, match="duplicate variant name"):
        expand({"ablations": [{"name": "x", "set": {}}, {"name": "x", "set": {}}]}, SOURCE)


def test_an_invalid_variant_stops_the_sweep_before_anything_runs(tmp_path, capsys):
    config = tiny_config(ablations=[{"name": "fine", "set": {"train.lr": 0.01}},
                                    {"name": "broken", "set": {"sde.beta_mx": 3.0}}])
    path = write_experiment(tmp_path, config)
    runs = tmp_path / "runs"
    status, _, err = run_cli(capsys, "sweep", path, "--runs-dir", runs)
    assert_one_line_error(status, err, "variant 'broken'", "sde.beta_mx", "did you mean 'beta_max'")
    assert not runs.exists()  # not even the valid variants ran


def test_only_selects_variants_and_rejects_unknown_names(tmp_path):
    ablations = [{"name": "score", "set": {"parameterization.name": "score"}}]
    path = write_experiment(tmp_path, tiny_config(ablations=ablations))
    assert [v.name for v in prepare(path, only=["score"])] == ["score"]
    with pytest.raises(ConfigError, match="unknown variant"):
        prepare(path, only=["scroe"])


@pytest.fixture
def finished_sweep(tmp_path):
    config = tiny_config(ablations=[{"name": "score", "set": {"parameterization.name": "score"}}],
                         train={"eval_every": 2})
    path = write_experiment(tmp_path, config)
    runs = run_sweep(path, tmp_path / "runs")
    return path, runs


def test_a_sweep_writes_one_run_per_variant_and_a_summary(finished_sweep):
    _, runs = finished_sweep
    assert (runs / "base" / "checkpoints" / "last.pt").exists()
    assert (runs / "score" / "checkpoints" / "last.pt").exists()
    table = [line for line in (runs / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, rule, two rows
    assert (runs / "bpd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_numbers_match_the_runs_metrics(finished_sweep):
    _, runs = finished_sweep
    with open(runs / "summary.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    for name in ("base", "score"):
        saved = json.loads((runs / name / "eval.json").read_text())
        last = [r for r in read_metrics(runs / name) if "loss" in r][-1]
        for split in ("val", "test"):
            assert float(rows[name][f"{split}_bpd"]) == pytest.approx(saved[split]["elbo"]["bpd"], rel=1e-12)
            assert float(rows[name][f"{split}_bpd_se"]) == pytest.approx(saved[split]["elbo"]["bpd_se"], rel=1e-12)
        assert float(rows[name]["final_loss"]) == pytest.approx(last["loss"], rel=1e-12)
        assert int(rows[name]["steps"]) == last["step"] == 4
    base, score = (json.loads((runs / n / "eval.json").read_text())["test"]["elbo"] for n in ("base", "score"))
    assert float(rows["score"]["test_delta"]) == pytest.approx(score["bpd"] - base["bpd"], rel=1e-9)
    expected_se = (score["bpd_se"] ** 2 + base["bpd_se"] ** 2) ** 0.5
    assert float(rows["score"]["test_delta_se_indep"]) == pytest.approx(expected_se, rel=1e-9)
    a, b = (per_example(runs / n, "test", "elbo") for n in ("score", "base"))
    assert torch.equal(a["index"], b["index"])
    paired = float((a["bpd"] - b["bpd"]).std() / len(a["bpd"]) ** 0.5)
    assert float(rows["score"]["test_delta_se_paired"]) == pytest.approx(paired, rel=1e-9)
    assert int(rows["score"]["paired_n"]) == 16
    assert rows["score"]["changes"] == "parameterization.name=score"
    assert float(rows["base"]["test_delta"]) == 0.0
    assert {rows["base"]["val_rank"], rows["score"]["val_rank"]} == {"1", "2"}


def test_rerunning_a_sweep_skips_finished_variants(finished_sweep, capsys):
    path, runs = finished_sweep
    before = snapshot(runs / "base")
    capsys.readouterr()
    run_sweep(path, runs)
    assert "variant 'base' already finished" in capsys.readouterr().out
    assert snapshot(runs / "base") == before


def test_summary_can_be_rebuilt_from_the_runs_folder(finished_sweep, capsys):
    _, runs = finished_sweep
    original = (runs / "summary.csv").read_text()
    (runs / "summary.csv").unlink()
    status, _, _ = run_cli(capsys, "sweep", "--summary", runs)
    assert status == 0
    assert (runs / "summary.csv").read_text() == original
    assert write_summary(runs)[1]["changes"] == "parameterization.name=score"


def test_resummarising_a_finished_sweep_reproduces_every_summary_file_exactly(finished_sweep, capsys):
    _, runs = finished_sweep
    files = ("summary.csv", "summary.md", "bpd.png")
    before = {name: (runs / name).read_bytes() for name in files}
    for name in files:
        (runs / name).unlink()
    assert run_cli(capsys, "sweep", "--summary", runs)[0] == 0
    assert {name: (runs / name).read_bytes() for name in files} == before


def test_paired_se_is_below_the_independent_one_for_common_examples_and_streams(finished_sweep):
    _, runs = finished_sweep
    with open(runs / "summary.csv") as f:
        score = next(r for r in csv.DictReader(f) if r["variant"] == "score")
    assert 0 < float(score["test_delta_se_paired"]) < float(score["test_delta_se_indep"])


def test_a_sweep_folder_without_a_base_needs_an_explicit_baseline(finished_sweep, tmp_path, capsys):
    _, runs = finished_sweep
    other = tmp_path / "copied"
    shutil.copytree(runs / "score", other / "score")
    shutil.copytree(runs / "base", other / "drift")  # no variant called base, and no sweep.json
    status, _, err = run_cli(capsys, "sweep", "--summary", other)
    assert_one_line_error(status, err, "no baseline run", "--baseline NAME", "drift, score")
    with pytest.raises(SdeflowError, match="'nope' is not among them"):
        write_summary(other, "nope")
    rows = write_summary(other, "drift")
    assert [r["variant"] for r in rows] == ["drift", "score"]
    assert rows[0]["test_delta"] == 0.0 and rows[1]["test_delta_se_paired"] > 0


def test_summary_rows_follow_the_experiments_order(tmp_path):
    ablations = [{"name": "zeta", "set": {"parameterization.name": "score"}},
                 {"name": "alpha", "set": {"parameterization.name": "noise", "bound": "truncated"}}]
    runs = run_sweep(write_experiment(tmp_path, tiny_config(ablations=ablations)), tmp_path / "runs")
    assert [r["variant"] for r in write_summary(runs)] == ["base", "zeta", "alpha"]


def test_a_grid_without_base_takes_the_variant_repeating_the_files_own_settings():
    data = {"parameterization": {"name": "drift"}, "sde": {"name": "vp"},
            "ablations": [{"name": "debiased", "set": {"time_sampler.name": "debiased"}}],
            "sweep": {"parameterization.name": ["score", "drift"], "sde.name": ["subvp", "vp"]}}
    variants = expand(data, SOURCE)
    assert own_settings_variant(data, variants) == "drift-vp"
    data["sde"] = {"name": "ve"}  # no grid point repeats the file: the first variant
    assert own_settings_variant(data, variants) == "score-subvp"
    assert own_settings_variant({"ablations": [{"name": "x", "set": {}}]}, expand({"ablations": [
        {"name": "x", "set": {}}]}, SOURCE)) == "base"


SHIPPED = sorted((Path(__file__).parents[1] / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_experiment_and_each_of_its_variants_passes_the_checks(path):
    assert len(SHIPPED) >= 9
    variants = prepare(path)
    assert variants and all(v.exp is not None for v in variants)


def test_the_gpu_twin_of_the_likelihood_ablation_differs_only_in_data_and_steps():
    folder = Path(__file__).parents[1] / "experiments" / "ablations"
    cpu, gpu = (read_yaml(folder / f"likelihood_techniques{suffix}.yaml") for suffix in ("", "_mnist"))
    assert set(cpu) == set(gpu)
    differ = {key for key in cpu if cpu[key] != gpu[key]}
    assert differ == {"name", "data", "train"}
    assert {k for k in cpu["train"] if cpu["train"][k] != gpu["train"][k]} == {"steps"}
    assert gpu["train"]["steps"] > 50 * cpu["train"]["steps"]
