"""Experiment configs: dotted overrides, defaults, the resolved config, and one-line errors that name the
file and the dotted key — checked through ``load_experiment`` and through ``sdeflow check`` (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers_exp import assert_one_line_error, run_cli, tiny_config, write_experiment
from sdeflow.assembly.build import check_experiment
from sdeflow.components.registry import default_registry
from sdeflow.core.errors import ConfigError
from sdeflow.experiment.config import load_experiment, structure

# ------------------------------------------------------------------ overrides and defaults


def test_dotted_overrides_set_run_settings_and_component_arguments(tmp_path):
    path = write_experiment(tmp_path)
    exp = load_experiment(path, ["train.steps=5", "sde.beta_max=10", "time_sampler.name=debiased"])
    assert exp.train.steps == 5
    # every argument the factory takes, given or defaulted: the effective values config.yaml records
    assert exp.components["sde"] == {"name": "vp", "beta_min": 0.1, "beta_max": 10.0, "T": 1.0, "t_eps": 1e-3}
    assert exp.components["time_sampler"]["name"] == "debiased"
    assert exp.args("sde") == {"beta_min": 0.1, "beta_max": 10.0, "T": 1.0, "t_eps": 1e-3}


def test_loss_override_on_a_yaml_without_a_loss_section_keeps_the_default_loss(tmp_path):
    config = tiny_config()
    assert "loss" not in config
    exp = load_experiment(write_experiment(tmp_path, config), ["loss.weighting=likelihood"])
    assert exp.components["loss"] == {"name": "dsm", "weighting": "likelihood"}


def test_overrides_may_be_given_as_a_mapping(tmp_path):
    exp = load_experiment(write_experiment(tmp_path), {"train.lr": 0.5, "network.hidden": 8})
    assert exp.train.lr == 0.5 and exp.components["network"]["hidden"] == 8


def test_overrides_are_checked_like_the_file(tmp_path):
    path = write_experiment(tmp_path)
    with pytest.raises(ConfigError, match=r"sde\.beta_mx: .*did you mean 'beta_max'"):
        load_experiment(path, ["sde.beta_mx=3"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many'"):
        load_experiment(path, ["train.steps=many"])


def test_an_override_without_equals_sign_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_experiment(write_experiment(tmp_path), ["train.steps"])


def test_omitted_components_get_their_defaults_and_the_name_defaults_to_the_file_stem(tmp_path):
    config = tiny_config()
    del config["name"], config["sde"], config["sampler"]
    exp = load_experiment(write_experiment(tmp_path, config, filename="little.yaml"))
    assert exp.name == "little"
    assert exp.components["sde"] == {"name": "vp", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "t_eps": 1e-3}
    assert exp.components["parameterization"] == {"name": "drift"}
    assert exp.components["sampler"] == {"name": "euler_maruyama", "steps": 500, "lam": 0.0}


def test_to_dict_round_trips_through_structure(tmp_path):
    exp = load_experiment(write_experiment(tmp_path), ["sde.beta_max=12"])
    again = structure(yaml.safe_load(yaml.safe_dump(exp.to_dict())), exp.source, default_registry())
    assert again.to_dict() == exp.to_dict()


def test_the_default_swissroll_experiment_is_valid(repo_root):
    exp = load_experiment(repo_root / "experiments" / "swissroll.yaml")
    check_experiment(exp)
    assert exp.name == "swissroll"
    assert [a["name"] for a in exp.ablations] == ["debiased", "score"]


def test_value_checks_name_the_dotted_key(tmp_path):
    exp = load_experiment(write_experiment(tmp_path), ["train.lr=0"])
    with pytest.raises(ConfigError, match=r"train\.lr: must be positive"):
        check_experiment(exp)


# ------------------------------------------------------------------ errors through the CLI


def test_unknown_section_key(tmp_path, capsys):
    path = write_experiment(tmp_path, {**tiny_config(), "netwrk": {"hidden": 3}})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, str(path), "netwrk", "did you mean 'network'")


def test_unknown_run_setting(tmp_path, capsys):
    path = write_experiment(tmp_path, train={"stepz": 3})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, str(path), "train.stepz", "did you mean 'steps'")


def test_unknown_component_argument_names_file_key_and_suggestion(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "check", path, "sde.beta_mx=3")
    assert_one_line_error(status, err, "command line: sde.beta_mx", "did you mean 'beta_max'", "accepted:")


def test_unknown_component_name_suggests_the_nearest(tmp_path, capsys):
    path = write_experiment(tmp_path, time_sampler={"name": "debaised"})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, str(path), "time_sampler.name", "'debaised'", "did you mean 'debiased'")


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, capsys):
    path = write_experiment(tmp_path, network={"name": "mlp", "hidden": "sixteen"})
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, str(path), "network.hidden", "expected int", "'sixteen'")


def test_negative_beta_names_the_key(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, _, err = run_cli(capsys, "check", path, "sde.beta_min=-1")
    assert_one_line_error(status, err, "command line: sde.beta_min", "must be positive")


def test_missing_component_section(tmp_path, capsys):
    config = tiny_config()
    del config["network"]
    path = write_experiment(tmp_path, config)
    status, _, err = run_cli(capsys, "check", path)
    assert_one_line_error(status, err, str(path), "network", "mlp")


def test_missing_experiment_file(tmp_path, capsys):
    status, _, err = run_cli(capsys, "check", tmp_path / "nope.yaml")
    assert_one_line_error(status, err, "nope.yaml", "cannot read")


def test_malformed_yaml_gives_the_line_number_without_traceback(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ndata: {name: swissroll\nsde: vp\n")
    result = subprocess.run([sys.executable, "-m", "sdeflow", "check", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, str(path), "malformed YAML", "line 3")
    assert result.stdout == ""


def test_missing_image_data_is_one_line_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = write_experiment(tmp_path, data={"name": "mnist", "root": str(empty), "download": False})
    status, _, err = run_cli(capsys, "train", path, "--run-dir", tmp_path / "run")
    assert_one_line_error(status, err, "MNIST not found", str(empty))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ sdeflow check


def test_check_prints_the_resolved_config_and_loads_no_data(tmp_path, capsys):
    root = tmp_path / "not-there"
    path = write_experiment(tmp_path, data={"name": "mnist", "root": str(root)})  # download defaults to true
    status, out, err = run_cli(capsys, "check", path, "train.steps=7")
    assert status == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["data"] == {"name": "mnist", "root": str(root), "download": True, "logit_alpha": 0.05,
                                "n_val": 5000, "split_seed": 0, "affine": False}
    assert resolved["train"]["steps"] == 7
    assert resolved["loss"] == {"name": "dsm", "weighting": "sigma2"}
    assert resolved["parameterization"] == {"name": "drift"}
    assert resolved["eval"]["batch_size"] == 64 and "probe" in resolved["eval"]
    assert not root.exists()  # nothing was downloaded, nothing was opened
