"""Sample-quality metrics (sdeflow.evaluation.quality) against closed forms, and `eval --metrics` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sdeflow
from helpers_exp import assert_one_line_error, run_cli, write_experiment
from sdeflow.core.errors import ConfigError, InvalidArgument
from sdeflow.evaluation.quality import mmd, parse_metrics, sample_quality, sliced_wasserstein


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_swd_of_a_shift_is_its_length_over_root_d():
    """y = x + μ shifts every projection by θᵀμ, so SW₂² = E_θ (θᵀμ)² = ‖μ‖²/d (θ uniform on the sphere)."""
    x = gaussian(500, 4, 0)
    mu = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    value = sliced_wasserstein(x, x + mu, generator=g(), projections=20000)
    assert value == pytest.approx(float(mu.norm()) / 2, rel=0.02)
    assert sliced_wasserstein(x, x, generator=g()) == 0.0
    assert sliced_wasserstein(3 * x, 3 * (x + mu), generator=g()) == pytest.approx(
        3 * sliced_wasserstein(x, x + mu, generator=g()), rel=1e-12)


def test_mmd_matches_its_closed_form_between_two_gaussians():
    """x ~ N(0, I), y ~ N(μ, I) in d dims, k = exp(−‖·‖²/2h²): E k(x,x') = (h²/(h²+2))^{d/2} and
    E k(x,y) = that × exp(−‖μ‖²/(2(h²+2))), so MMD² = 2 (h²/(h²+2))^{d/2} (1 − exp(−‖μ‖²/(2(h²+2))))."""
    d, h2 = 2, 1.0
    mu = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x, y = gaussian(3000, d, 0), gaussian(3000, d, 1) + mu
    exact = 2 * (h2 / (h2 + 2)) ** (d / 2) * (1 - math.exp(-float(mu @ mu) / (2 * (h2 + 2))))
    assert mmd(x, y, scales=(1.0,), h2=h2) == pytest.approx(exact, abs=0.01)
    assert abs(mmd(x, gaussian(3000, d, 2), scales=(1.0,), h2=h2)) < 0.005  # unbiased: ≈ 0 when equal
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-12)


def test_samples_from_the_data_distribution_score_about_the_floor():
    held_out, good, bad = gaussian(2000, 2, 0), gaussian(1000, 2, 1), 1.5 * gaussian(1000, 2, 2)
    ok = sample_quality(["swd", "mmd"], good, held_out, seed=0)
    assert ok["swd"]["n"] == 1000 and ok["swd"]["floor"] > 0
    assert ok["swd"]["value"] < 2 * ok["swd"]["floor"]
    worse = sample_quality(["swd", "mmd"], bad, held_out, seed=0)
    assert worse["swd"]["value"] > 3 * worse["swd"]["floor"] and worse["mmd"]["value"] > 10 * abs(ok["mmd"]["value"])
    assert worse["swd"]["floor"] == ok["swd"]["floor"]  # the floor depends on the held-out split only


def test_metric_names_are_checked():
    assert parse_metrics("swd, mmd,swd") == ["swd", "mmd"] and parse_metrics("") == []
    with pytest.raises(InvalidArgument, match="unknown metric 'swdd'"):
        parse_metrics("swdd")
    assert parse_metrics(["kid", "fid"]) == ["kid", "fid"]


def test_eval_metrics_records_value_and_floor_and_training_reports_them(tmp_path, capsys):
    path = write_experiment(tmp_path, eval={"metrics": "swd"}, data={"name": "gaussian", "dim": 2, "n": 256,
                                                                    "n_test": 64})
    run = tmp_path / "run"
    status, out, err = run_cli(capsys, "train", path, "--run-dir", run)
    assert status == 0, err
    assert "test sample quality" in out and "floor" in out
    saved = json.loads((run / "eval.json").read_text())
    swd = saved["quality"]["test"]["swd"]
    assert swd["n"] == 16 and swd["floor"] > 0 and swd["value"] > 0 and swd["settings"]["weights"] == "ema"
    status, out, err = run_cli(capsys, "eval", run, "--metrics", "swd,mmd", "--seed", "3")
    assert status == 0, err
    saved = json.loads((run / "eval.json").read_text())
    assert set(saved["quality"]["test"]) == {"swd", "mmd"} and saved["quality"]["test"]["mmd"]["seed"] == 3
    assert saved["test"]["elbo"]["bpd"] > 0  # the likelihood results are kept beside them
    status, _, err = run_cli(capsys, "check", path, "eval.metrics=swd,fidd")
    assert_one_line_error(status, err, "eval.metrics", "unknown metric 'fidd'")
    before = (run / "eval.json").read_bytes()
    status, _, err = run_cli(capsys, "eval", run, "--metrics", "swdd")
    assert_one_line_error(status, err, "--metrics: unknown metric 'swdd'")
    assert (run / "eval.json").read_bytes() == before  # refused before anything was evaluated
    with pytest.raises(ConfigError, match="^metrics: unknown metric 'swdd'"):
        sdeflow.open_run(run).quality("swdd")
