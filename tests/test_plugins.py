"""The plugin system: entry-point discovery (real and faked distributions), loud collisions, block
list, broken plugins, strict mode, bad registrations, and a meta-test that every hook spec is tested.

Faked distributions (the ``install_fake`` fixture in conftest.py) are real as far as
``importlib.metadata`` is concerned, so they exercise the same discovery path as an installed package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform as stdlib_platform
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import sdeflow
from sdeflow.components.registry import (
    DISABLE_ENV,
    ENTRY_POINT_GROUP,
    STRICT_ENV,
    PluginInfo,
    build_registry,
    default_registry,
    plugin_components,
    reset_default_registry,
)
from sdeflow.components.schema import check_arguments
from sdeflow.core import hookspecs
from sdeflow.core.errors import ConfigError, InvalidArgument, PluginError
from sdeflow.core.hookspecs import KINDS, hookimpl
from sdeflow.core.interfaces import TabulatedTimeDensity, gaussian_log_prob

REAL_PLUGINS = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
"""Entry points installed before any test fakes one: the built-ins and the example plugin."""

EXAMPLE_MISSING = "the example plugin is not installed: pip install -e examples/sdeflow-example-plugin"

SHARED_SDE = '''
from sdeflow.core.hookspecs import hookimpl

class Shared:
    """A fake SDE."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

@hookimpl
def sdeflow_register_sdes(register):
    register("shared", Shared)
'''

EXTRA_LOSS = """
from sdeflow.core.hookspecs import hookimpl

@hookimpl
def sdeflow_register_losses(register):
    register("extra_loss", dict)
"""

BROKEN = 'raise RuntimeError("boom")\n'


class Dummy:
    """A stand-in component."""

    def __init__(self, width: int = 1):
        self.width = width


# --- helpers ------------------------------------------------------------------------------------


def discover(*extra: tuple[str, object], entry_points: bool = True, strict: bool | None = None):
    """Build a registry; return it and the messages of the warnings raised while building it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = build_registry(list(extra), entry_points=entry_points, strict=strict)
    return registry, [str(w.message) for w in caught]


def plugin(**hooks) -> object:
    """An in-process plugin object whose attributes are the given hook implementations."""
    return types.SimpleNamespace(**{name: hookimpl(function) for name, function in hooks.items()})


def registers(hook: str, *entries: tuple[str, object]) -> object:
    """A plugin whose ``hook`` calls ``register(name, factory)`` for each entry, in order."""

    def implementation(register):
        for name, factory in entries:
            register(name, factory)

    return plugin(**{hook: implementation})


def plugin_names(registry) -> list[str]:
    return [p.name for p in registry.plugins]


# --- real installed distributions ---------------------------------------------------------------


def test_example_plugin_is_discovered_from_its_distribution(plugin_env):
    registry, _ = discover()
    plugins = {p.name: p for p in registry.plugins}
    assert "example" in plugins, EXAMPLE_MISSING
    info = plugins["example"]
    assert (info.distribution, info.version) == ("sdeflow-example-plugin", "0.1.0")
    assert set(info.hooks) == {"sdeflow_register_sdes", "sdeflow_register_networks", "sdeflow_register_estimators",
                               "sdeflow_register_metrics"}
    components = {(c.kind, c.name) for c in plugin_components(registry, "example")}
    assert components == {("sde", "vp_const"), ("sde", "vp_learned_beta"), ("network", "resmlp"),
                          ("estimator", "ode_rk4"), ("metric", "mean_distance")}


def test_builtin_plugins_are_discovered_through_entry_points(plugin_env, repo_root):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"][ENTRY_POINT_GROUP]
    installed = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                 if ep.dist.name == "sdeflow"}
    assert installed == set(declared), "the installed metadata is stale: pip install -e ."
    registry, _ = discover()
    loaded = {p.name: p for p in registry.plugins}
    for name, module in declared.items():
        if importlib.util.find_spec(module) is None:
            continue  # that built-in is not written yet
        assert name in loaded, registry.failures.get(name)
        assert (loaded[name].distribution, loaded[name].version) == ("sdeflow", sdeflow.__version__)


def test_example_components_have_schemas_and_validate_arguments(plugin_env):
    registry, _ = discover()
    sde = registry.get("sde", "vp_const")
    network = registry.get("network", "example:resmlp")
    assert [a.describe() for a in sde.arguments.values()] == ["beta: float = 5.0", "T: float = 1.0",
                                                               "t_eps: float = 0.001"]
    assert list(network.arguments) == ["hidden", "blocks", "time_scale"]  # data_shape is injected
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        check_arguments({"bta": 1.0}, sde.arguments, "exp.yaml: sde", "sde 'vp_const'")
    with pytest.raises(InvalidArgument) as info:
        sde.factory(beta=-1.0)
    assert info.value.argument == "beta"


def test_example_sde_satisfies_the_moment_odes(plugin_env):
    sde = default_registry().get("sde", "vp_const").factory(beta=4.0)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-5
    dm = (sde.m(t + h) - sde.m(t - h)) / (2 * h)
    dvar = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(dm, -0.5 * 4.0 * sde.m(t))
    torch.testing.assert_close(dvar, -4.0 * sde.sigma(t) ** 2 + sde.g(t) ** 2)
    y = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(sde.f(y, t[:3]), -2.0 * y)
    torch.testing.assert_close(sde.prior_log_prob(y), gaussian_log_prob(y))
    assert isinstance(sde.likelihood_time_density, TabulatedTimeDensity)


def test_example_network_keeps_the_shape_and_starts_at_zero(plugin_env):
    make = default_registry().get("network", "resmlp").factory
    for shape in [(2,), (1, 4, 4)]:
        net = make(data_shape=shape, hidden=16)
        y = torch.randn(5, *shape)
        out = net(y, torch.rand(5))
        assert out.shape == y.shape and not out.any()
    torch.nn.init.ones_(net.output.weight)
    early, late = net(y, torch.zeros(5)), net(y, torch.ones(5))
    assert not torch.allclose(early, late)  # the time embedding reaches the output


# --- faked distributions ------------------------------------------------------------------------


def test_fake_distribution_is_discovered_with_its_metadata(install_fake, plugin_env):
    install_fake("fakeplug", "0.3", {"fakeplug": SHARED_SDE})
    install_fake("multiplug", "2.0", {"multi-a": EXTRA_LOSS, "multi-b": None})
    registry, _ = discover()
    info = {p.name: p for p in registry.plugins}["fakeplug"]
    assert info == PluginInfo("fakeplug", "fakeplug", "0.3", ("sdeflow_register_sdes",))
    component = registry.get("sde", "shared")
    assert component.plugin == info and component.description == "A fake SDE."
    assert list(component.arguments) == ["scale"]
    assert registry.get("loss", "extra_loss").plugin.distribution == "multiplug"


def test_duplicate_name_across_plugins_names_both(install_fake, plugin_env):
    install_fake("fakeplug", "0.3", {"fakeplug": SHARED_SDE})
    install_fake("otherplug", "1.0", {"otherplug": SHARED_SDE})
    registry, _ = discover()
    with pytest.raises(ConfigError) as info:
        registry.get("sde", "shared", where="exp.yaml: sde.name")
    message = str(info.value)
    assert message.startswith("exp.yaml: sde.name: sde 'shared' is registered by both")
    assert "'fakeplug' (fakeplug)" in message and "'otherplug' (otherplug)" in message
    assert "'fakeplug:shared' or 'otherplug:shared'" in message


def test_qualified_name_picks_one_plugin(install_fake, plugin_env):
    install_fake("fakeplug", "0.3", {"fakeplug": SHARED_SDE})
    install_fake("otherplug", "1.0", {"otherplug": SHARED_SDE})
    registry, _ = discover()
    assert registry.get("sde", "otherplug:shared").plugin.version == "1.0"
    assert registry.get("sde", "fakeplug:shared").plugin.version == "0.3"
    with pytest.raises(ConfigError, match="unknown sde 'nosuch:shared'"):
        registry.get("sde", "nosuch:shared")


def test_blocked_plugins_are_skipped_without_being_imported(install_fake, plugin_env):
    install_fake("fakeplug", "0.3", {"fakeplug": SHARED_SDE})
    install_fake("brokenplug", "0.1", {"brokenplug": BROKEN})
    install_fake("multiplug", "2.0", {"multi-a": EXTRA_LOSS})
    plugin_env.setenv(DISABLE_ENV, "fakeplug, brokenplug,inproc")
    registry, messages = discover(("inproc", registers("sdeflow_register_sdes", ("mine", Dummy))))
    names = plugin_names(registry)
    assert "multi-a" in names
    assert not {"fakeplug", "brokenplug", "inproc"} & set(names)
    assert "brokenplug" not in registry.failures and not any("brokenplug" in m for m in messages)
    assert registry.names("sde").count("shared") == 0 and "mine" not in registry.names("sde")


def test_block_list_applies_to_the_default_registry(plugin_env):
    plugin_env.setenv(DISABLE_ENV, "example")
    reset_default_registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "example" not in plugin_names(default_registry())


def test_broken_plugin_is_reported_once_and_skipped(install_fake, plugin_env):
    install_fake("brokenplug", "0.1", {"brokenplug": BROKEN, "ghostplug": None})
    install_fake("fakeplug", "0.3", {"fakeplug": SHARED_SDE})
    registry, messages = discover()
    about_broken = [m for m in messages if "brokenplug" in m]
    assert about_broken == ["sdeflow: skipping plugin 'brokenplug': RuntimeError: boom"]
    assert registry.failures["brokenplug"] == "RuntimeError: boom"
    assert registry.failures["ghostplug"].startswith("ModuleNotFoundError")
    assert "fakeplug" in plugin_names(registry) and "brokenplug" not in plugin_names(registry)
    assert registry.get("sde", "shared").plugin.name == "fakeplug"


def test_strict_mode_makes_a_broken_plugin_an_error(install_fake, plugin_env):
    install_fake("brokenplug", "0.1", {"brokenplug": BROKEN})
    plugin_env.setenv(DISABLE_ENV, ",".join(REAL_PLUGINS))  # only the fake one can fail
    plugin_env.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError, match=r"^plugin 'brokenplug' failed: RuntimeError: boom$"):
        build_registry()
    registry, _ = discover(strict=False)  # the argument beats the environment
    assert "brokenplug" in registry.failures
    plugin_env.setenv(STRICT_ENV, "0")
    assert "brokenplug" in discover()[0].failures


def test_hook_that_raises_skips_the_plugin_but_not_the_others():
    def explode(register):
        register("early", Dummy)
        raise ValueError("nope")

    registry, messages = discover(
        ("bad", plugin(sdeflow_register_sdes=explode)),
        ("good", registers("sdeflow_register_sdes", ("fine", Dummy))),
        entry_points=False,
    )
    assert registry.failures == {"bad": "sdeflow_register_sdes raised ValueError: nope"}
    assert registry.names("sde") == ["fine"]  # what "bad" registered before failing is dropped
    assert len(messages) == 1


def test_misspelled_hook_is_rejected_with_a_clear_reason():
    typo = plugin(sdeflow_register_sde=lambda register: register("x", Dummy))
    registry, messages = discover(("typo", typo), entry_points=False)
    assert "unknown hook 'sdeflow_register_sde'" in registry.failures["typo"]
    assert plugin_names(registry) == [] and registry.names("sde") == []
    assert len(messages) == 1 and "typo" in messages[0]
    with pytest.raises(PluginError, match="unknown hook 'sdeflow_register_sde'"):
        build_registry([("typo", typo)], entry_points=False, strict=True)


def test_hook_with_a_wrong_argument_name_is_rejected():
    wrong = plugin(sdeflow_register_sdes=lambda reg: reg("x", Dummy))
    registry, _ = discover(("wrong", wrong), entry_points=False)
    assert "{'reg'}" in registry.failures["wrong"]
    assert plugin_names(registry) == []


@pytest.mark.parametrize(
    "entries, reason",
    [
        ([("twin", Dummy), ("twin", Dummy)], "plugin 'bad' registered sde 'twin' twice"),
        ([("number", 42)], "plugin 'bad' registered sde 'number' with a non-callable"),
        ([("vp:odd", Dummy)], "plugin 'bad' registered an invalid sde name 'vp:odd'"),
        ([("", Dummy)], "plugin 'bad' registered an invalid sde name ''"),
    ],
)
def test_bad_registration_is_an_error(entries, reason):
    bad = registers("sdeflow_register_sdes", ("first", Dummy), *entries)
    good = registers("sdeflow_register_sdes", ("fine", Dummy))
    registry, _ = discover(("bad", bad), ("good", good), entry_points=False)
    assert reason in registry.failures["bad"]
    assert registry.names("sde") == ["fine"]
    with pytest.raises(PluginError, match=re.escape(reason)):
        build_registry([("bad", bad)], entry_points=False, strict=True)


def test_same_name_in_two_kinds_is_allowed():
    both = plugin(
        sdeflow_register_sdes=lambda register: register("common", Dummy),
        sdeflow_register_losses=lambda register: register("common", Dummy),
    )
    registry, messages = discover(("both", both), entry_points=False)
    assert not messages
    assert registry.get("sde", "common").kind == "sde" and registry.get("loss", "common").kind == "loss"


def test_unknown_name_lists_available_names_and_suggests_one():
    sdes = registers("sdeflow_register_sdes", ("brownian", Dummy), ("ornstein", Dummy))
    registry, _ = discover(("p", sdes), entry_points=False)
    with pytest.raises(ConfigError) as info:
        registry.get("sde", "brownain", where="exp.yaml: sde.name")
    assert str(info.value) == (
        "exp.yaml: sde.name: unknown sde 'brownain' (did you mean 'brownian'?); available: brownian, ornstein"
    )
    with pytest.raises(ConfigError, match="available: none"):
        registry.get("loss", "dsm")
    with pytest.raises(ConfigError, match="unknown kind 'sdes'"):
        registry.get("sdes", "brownian")


def test_default_registry_is_cached_until_reset(plugin_env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = default_registry()
        assert default_registry() is first
        reset_default_registry()
        assert default_registry() is not first


# --- every hook spec is exercised -----------------------------------------------------------------


class EveryKind:
    """A plugin implementing every hook, one component each (the meta-test below looks for these)."""

    @hookimpl
    def sdeflow_register_sdes(self, register):
        register("every_sde", Dummy)

    @hookimpl
    def sdeflow_register_networks(self, register):
        register("every_network", lambda data_shape, width=1: Dummy(width))

    @hookimpl
    def sdeflow_register_parameterizations(self, register):
        register("every_parameterization", lambda network, sde, scale=1.0: Dummy())

    @hookimpl
    def sdeflow_register_losses(self, register):
        register("every_loss", Dummy)

    @hookimpl
    def sdeflow_register_time_samplers(self, register):
        register("every_time_sampler", Dummy)

    @hookimpl
    def sdeflow_register_samplers(self, register):
        register("every_sampler", Dummy)

    @hookimpl
    def sdeflow_register_datasets(self, register):
        register("every_data", Dummy)

    @hookimpl
    def sdeflow_register_dequantizers(self, register):
        register("every_dequantizer", lambda data_shape, bins=1: Dummy())

    @hookimpl
    def sdeflow_register_estimators(self, register):
        register("every_estimator", lambda config, time_sampler, samples, time_sampler_name, order=2: Dummy())

    @hookimpl
    def sdeflow_register_metrics(self, register):
        register("every_metric", Dummy)

    @hookimpl
    def sdeflow_register_optimizers(self, register):
        register("every_optimizer", lambda params, lr, momentum=0.0: Dummy())

    @hookimpl
    def sdeflow_register_lr_schedules(self, register):
        register("every_lr_schedule", lambda steps, warmup_steps=0: Dummy())


def test_a_plugin_can_implement_every_hook():
    registry, messages = discover(("every", EveryKind()), entry_points=False)
    assert not messages
    (info,) = registry.plugins
    assert info.hooks == tuple(KINDS.values())
    for kind in KINDS:
        assert registry.get(kind, f"every_{kind}").plugin == info
    assert list(registry.get("network", "every_network").arguments) == ["width"]  # data_shape injected
    assert list(registry.get("parameterization", "every_parameterization").arguments) == ["scale"]
    assert list(registry.get("dequantizer", "every_dequantizer").arguments) == ["bins"]
    assert list(registry.get("estimator", "every_estimator").arguments) == ["order"]  # the eval settings injected
    assert list(registry.get("optimizer", "every_optimizer").arguments) == ["momentum"]  # params, lr injected
    assert list(registry.get("lr_schedule", "every_lr_schedule").arguments) == ["warmup_steps"]  # steps injected


HOOK_SPECS = sorted(name for name in vars(hookspecs) if name.startswith("sdeflow_register_"))


def test_every_hook_spec_is_a_kind():
    assert HOOK_SPECS == sorted(KINDS.values())
    for name in HOOK_SPECS:
        assert hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec"), f"{name} is not a @hookspec"


def test_every_hook_spec_is_implemented_by_some_test():
    sources = "\n".join(path.read_text() for path in Path(__file__).parent.glob("test_*.py"))
    untested = [name for name in HOOK_SPECS if f"def {name}(" not in sources]
    assert not untested, f"hook specs without a test that implements them: {untested}"


def test_every_kind_has_a_component_in_the_default_registry(plugin_env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registry = default_registry()
    empty = [kind for kind in KINDS if not registry.names(kind)]
    unwritten = [ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                 if ep.dist.name == "sdeflow" and importlib.util.find_spec(ep.value) is None]
    if empty and unwritten:
        pytest.skip(f"built-in plugins not written yet: {unwritten}")
    assert not empty, f"kinds without any component: {empty}; plugin failures: {registry.failures}"


# --- the kernel's folder named `platform` ---------------------------------------------------------


def test_stdlib_platform_is_not_shadowed_from_the_repository_root(repo_root):
    assert (repo_root / "platform" / "sdeflow").is_dir()
    assert not (repo_root / "platform" / "__init__.py").exists()
    result = subprocess.run(
        [sys.executable, "-c", "import platform, sdeflow; print(platform.system())"],
        cwd=repo_root, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == stdlib_platform.system()
