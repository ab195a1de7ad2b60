"""The component registry: kind → name → factory, with the plugin that supplied each one.

Plugins are pluggy plugins discovered through the ``sdeflow`` entry-point group, built-ins included.
Registration is explicit (``register(name, factory)``), so the kernel can list every component,
validate a config before any compute, suggest a name on a typo and refuse silent shadowing.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from ..core import hookspecs
from ..core.errors import ConfigError, PluginError, did_you_mean
from .schema import Argument, signature_schema

ENTRY_POINT_GROUP = "sdeflow"
STRICT_ENV = "SDEFLOW_STRICT_PLUGINS"
DISABLE_ENV = "SDEFLOW_DISABLE_PLUGINS"

INJECTED: dict[str, tuple[str, ...]] = {
    "network": ("data_shape",),
    "parameterization": ("network", "sde"),
    "dequantizer": ("data_shape",),
    "estimator": ("config", "time_sampler", "samples", "time_sampler_name"),
    "optimizer": ("params", "lr"),
    "lr_schedule": ("steps",),
}
"""Arguments the kernel passes itself when building a component of that kind (not set in YAML)."""


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its entry-point name, distribution and version, and hooks it implements."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...] = ()


@attrs.frozen
class Component:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: PluginInfo
    description: str = ""

    @property
    def arguments(self) -> dict[str, Argument]:
        return signature_schema(self.factory, INJECTED.get(self.kind, ()))

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin.name}:{self.name}"


@attrs.define
class Registry:
    """Every component of every kind, and the plugins that supplied them."""

    components: dict[str, dict[str, list[Component]]] = attrs.field(
        factory=lambda: {kind: {} for kind in hookspecs.KINDS}
    )
    plugins: list[PluginInfo] = attrs.field(factory=list)
    failures: dict[str, str] = attrs.field(factory=dict)

    def add(self, component: Component) -> None:
        self.components[component.kind].setdefault(component.name, []).append(component)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def all(self, kind: str | None = None) -> list[Component]:
        kinds = [kind] if kind else list(hookspecs.KINDS)
        return [c for k in kinds for name in sorted(self.components[k]) for c in self.components[k][name]]

    def is_ambiguous(self, kind: str, name: str) -> bool:
        """More than one plugin registers ``name`` (unqualified) for ``kind``."""
        return ":" not in name and len(self.components.get(kind, {}).get(name, [])) > 1

    def get(self, kind: str, name: str, where: str = "", prefer: str | None = None) -> Component:
        """The component ``name`` (or ``plugin:name``) of ``kind``; errors list what exists.

        ``prefer`` names the plugin that settles a name two plugins register (an existing run's record).
        """
        prefix = f"{where}: " if where else ""
        if kind not in self.components:
            raise ConfigError(f"{prefix}unknown kind '{kind}'; kinds: {', '.join(hookspecs.KINDS)}")
        plugin, _, short = name.rpartition(":")
        candidates = self.components[kind].get(short, [])
        if plugin:
            candidates = [c for c in candidates if c.plugin.name == plugin]
        if len(candidates) > 1 and prefer:
            candidates = [c for c in candidates if c.plugin.name == prefer] or candidates
        if not candidates:
            known = self.names(kind)
            raise ConfigError(
                f"{prefix}unknown {kind} '{name}'{did_you_mean(short, known)}; "
                f"available: {', '.join(known) or 'none'}{self._failure_note()}"
            )
        if len(candidates) > 1:
            owners = " and ".join(f"'{c.plugin.name}'" + (f" ({c.plugin.distribution})" if c.plugin.distribution
                                  else "") for c in candidates)
            choices = " or ".join(f"'{c.qualified_name}'" for c in candidates)
            newest = candidates[-1].plugin.name
            raise ConfigError(f"{prefix}{kind} '{name}' is registered by both {owners}; write {choices}, "
                              f"or turn one plugin off with {DISABLE_ENV}={newest}")
        return candidates[0]

    def _failure_note(self) -> str:
        """Which plugins failed to load: the missing name may have been theirs."""
        if not self.failures:
            return ""
        failed = "; ".join(f"'{name}' ({reason})" for name, reason in self.failures.items())
        return f"; note: plugin(s) that failed to load and may provide it: {failed}"


def _register_callback(registry: Registry, kind: str, plugin: PluginInfo) -> Callable[..., None]:
    seen: set[str] = set()

    def register(name: str, factory: Callable[..., Any], *, description: str | None = None) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise PluginError(f"plugin '{plugin.name}' registered an invalid {kind} name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin '{plugin.name}' registered {kind} '{name}' with a non-callable")
        if name in seen:
            raise PluginError(f"plugin '{plugin.name}' registered {kind} '{name}' twice")
        seen.add(name)
        summary = (factory.__doc__ or "").strip().split("\n", 1)[0]
        registry.add(Component(kind, name, factory, plugin, description or summary))

    return register


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code!r}) at import"
    return f"{type(error).__name__}: {error}"


def _report(registry: Registry, plugin: str, reason: str, strict: bool) -> None:
    reason = " ".join(reason.split())  # pluggy's validation messages span several lines
    if strict:
        raise PluginError(f"plugin '{plugin}' failed: {reason}")
    registry.failures[plugin] = reason
    warnings.warn(f"sdeflow: skipping plugin '{plugin}': {reason}", stacklevel=2)


def _entry_point_plugins(
    registry: Registry, strict: bool, disabled: set[str]
) -> Iterable[tuple[PluginInfo, object]]:
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in disabled:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None)
        try:
            module = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # a broken plugin (even one calling sys.exit) must not take the others down
            _report(registry, ep.name, _describe(e), strict)
            continue
        yield info, module


def build_registry(
    extra_plugins: Iterable[tuple[str, object]] = (),
    *,
    entry_points: bool = True,
    strict: bool | None = None,
) -> Registry:
    """Discover plugins (entry points, then ``extra_plugins`` as ``(name, module_or_object)``)."""
    strict = _env_flag(STRICT_ENV) if strict is None else strict
    disabled = _disabled()
    registry = Registry()
    found = list(_entry_point_plugins(registry, strict, disabled)) if entry_points else []
    found += [(PluginInfo(name, None, None), obj) for name, obj in extra_plugins if name not in disabled]
    for info, obj in found:
        _load_plugin(registry, info, obj, strict)
    return registry


def _load_plugin(registry: Registry, info: PluginInfo, obj: object, strict: bool) -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    try:
        manager.register(obj, name=info.name)
        manager.check_pending()  # a misspelled hook name is an error, not a silent no-op
    except pluggy.PluginValidationError as e:
        _report(registry, info.name, str(e), strict)
        return
    staged = Registry()
    hooks = []
    for kind, hook_name in hookspecs.KINDS.items():
        impls = getattr(manager.hook, hook_name).get_hookimpls()
        if not impls:
            continue
        hooks.append(hook_name)
        try:
            for impl in impls:
                impl.function(register=_register_callback(staged, kind, info))
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            _report(registry, info.name, f"{hook_name} raised {_describe(e)}", strict)
            return
    info = attrs.evolve(info, hooks=tuple(hooks))
    registry.plugins.append(info)
    for component in staged.all():
        registry.add(attrs.evolve(component, plugin=info))


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The registry of all installed plugins, built once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = build_registry()
    return _DEFAULT


def reset_default_registry() -> None:
    """Forget the cached registry (tests that install or block plugins call this)."""
    global _DEFAULT
    _DEFAULT = None


def plugin_components(registry: Registry, plugin: str) -> list[Component]:
    return [c for c in registry.all() if c.plugin.name == plugin]


__all__ = [
    "Component",
    "PluginInfo",
    "Registry",
    "build_registry",
    "default_registry",
    "reset_default_registry",
    "plugin_components",
]
