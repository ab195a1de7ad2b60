"""``sdeflow plugins`` and ``sdeflow components``: the example plugin shows up with its version, the
JSON has the documented keys, and user errors exit with status 2 and one line on stderr."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdeflow.cli.commands import main
from sdeflow.components.registry import DISABLE_ENV, ENTRY_POINT_GROUP, STRICT_ENV

BROKEN = 'raise RuntimeError("boom")\n'
REAL_PLUGINS = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_plugins_table_shows_the_example_plugin_and_its_version(plugin_env, capsys):
    status, out, _ = run_cli(capsys, "plugins")
    assert status == 0
    (row,) = [line for line in out.splitlines() if line.startswith("example ")]
    assert "sdeflow-example-plugin 0.1.0" in row and "sde:vp_const" in row and "network:resmlp" in row


def test_plugins_json(plugin_env, capsys):
    status, out, _ = run_cli(capsys, "plugins", "--json")
    assert status == 0
    items = json.loads(out)
    assert all({"name", "version", "hooks", "components"} <= set(item) for item in items)
    (example,) = [item for item in items if item["name"] == "example"]
    assert example["version"] == "0.1.0"
    assert set(example["hooks"]) == {"sdeflow_register_sdes", "sdeflow_register_networks",
                                     "sdeflow_register_estimators", "sdeflow_register_metrics"}
    assert set(example["components"]) == {"sde:vp_const", "sde:vp_learned_beta", "network:resmlp",
                                          "estimator:ode_rk4", "metric:mean_distance"}


def test_components_json_of_one_kind(plugin_env, capsys):
    status, out, _ = run_cli(capsys, "components", "sde", "--json")
    assert status == 0
    items = json.loads(out)
    assert all({"kind", "name", "plugin", "arguments"} <= set(item) for item in items)
    assert {item["kind"] for item in items} == {"sde"}
    (vp_const,) = [item for item in items if item["name"] == "vp_const"]
    assert vp_const["plugin"] == "example"
    assert vp_const["arguments"][0] == {"name": "beta", "type": "float", "required": False, "default": 5.0}


def test_components_table_lists_arguments_with_defaults(plugin_env, capsys):
    status, out, _ = run_cli(capsys, "components", "network")
    assert status == 0
    (row,) = [line for line in out.splitlines() if " resmlp " in line]
    assert "example" in row and "hidden: int = 64" in row and "data_shape" not in row


def test_unknown_kind_exits_2_with_one_line(plugin_env, capsys):
    status, out, err = run_cli(capsys, "components", "sdes")
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("sdeflow: error: unknown kind 'sdes' (did you mean 'sde'?)")


def test_skipped_plugin_is_reported_on_stderr(plugin_env, install_fake, capsys):
    install_fake("brokenplug", "0.1", {"brokenplug": BROKEN})
    status, out, err = run_cli(capsys, "plugins")
    assert status == 0 and "example" in out
    assert "skipped brokenplug: RuntimeError: boom" in err


def test_strict_mode_broken_plugin_exits_2_with_one_line(plugin_env, install_fake, capsys):
    install_fake("brokenplug", "0.1", {"brokenplug": BROKEN})
    plugin_env.setenv(STRICT_ENV, "1")
    plugin_env.setenv(DISABLE_ENV, ",".join(REAL_PLUGINS))  # only the fake one can fail
    status, _, err = run_cli(capsys, "plugins")
    assert status == 2
    assert err == "sdeflow: error: plugin 'brokenplug' failed: RuntimeError: boom\n"


def test_installed_sdeflow_command_lists_plugins(repo_root):
    script = shutil.which("sdeflow", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the sdeflow console script is not installed next to this Python")
    result = subprocess.run([script, "plugins"], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("example ") and "0.1.0" in line for line in result.stdout.splitlines())
