"""CONTRIBUTING.md kept in step with the code: its hook table names every hook spec (and each one registers a
component, tested here through a plugin built at run time), and its ownership table names every kernel file.

Both lists are read from the code when the tests run (``sdeflow.core.hookspecs``, ``platform/sdeflow/*.py``), so a
new hook or module fails here until CONTRIBUTING.md says what it is.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest

from sdeflow.components.registry import build_registry
from sdeflow.core import hookspecs
from sdeflow.core.hookspecs import KINDS, hookimpl

ROOT = Path(__file__).resolve().parents[1]
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
KERNEL = ROOT / "platform" / "sdeflow"

HOOK_SPECS = sorted(name for name, value in vars(hookspecs).items()
                    if callable(value) and hasattr(value, f"{hookspecs.PROJECT}_spec"))
"""Every function ``sdeflow.core.hookspecs`` marks ``@hookspec``."""

KIND_OF = {hook: kind for kind, hook in KINDS.items()}


def section(title_start: str) -> str:
    """The body of the ``## <title_start>...`` section of CONTRIBUTING.md."""
    text = CONTRIBUTING.read_text()
    match = re.search(rf"^## {re.escape(title_start)}.*$", text, flags=re.M)
    assert match, f"CONTRIBUTING.md has no section '## {title_start}...'"
    end = text.find("\n## ", match.end())
    return text[match.end(): end if end != -1 else None]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the Markdown tables in ``text`` (headers too; separator rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def hook_table() -> dict[str, str]:
    """{hook: its kind cell} from the table of "Writing a plugin"."""
    rows = [row for row in table_rows(section("Writing a plugin")) if row[0].startswith("`sdeflow_register_")]
    return {row[0].strip("`"): row[1] for row in rows}


def owned_files() -> set[str]:
    """Every ``*.py`` named in the first column of "Layout: which file owns what"."""
    return {name for row in table_rows(section("Layout")) for name in re.findall(r"`([\w./]+\.py)`", row[0])}


def kernel_files() -> set[str]:
    """Every module of the kernel, by its path under platform/sdeflow/ (a folder's __init__.py aside: its
    docstring describes the folder)."""
    return {str(p.relative_to(KERNEL)) for p in KERNEL.rglob("*.py") if p.name != "__init__.py" or p.parent == KERNEL}


# --- the hook table -------------------------------------------------------------------------------


def test_hook_specs_are_found():
    assert len(HOOK_SPECS) >= 10 and "sdeflow_register_sdes" in HOOK_SPECS


@pytest.mark.parametrize("hook", HOOK_SPECS)
def test_every_hook_spec_is_in_the_hook_table_with_its_kind(hook):
    assert hook in KIND_OF, f"{hook} is a hook spec but no kind in sdeflow.core.hookspecs.KINDS"
    table = hook_table()
    assert hook in table, f"CONTRIBUTING.md's hook table ('Writing a plugin') has no row for {hook}"
    kinds = re.findall(r"`([^`]+)`", table[hook])
    assert kinds and kinds[0] == KIND_OF[hook], \
        f"CONTRIBUTING.md gives {hook} the kind {table[hook]!r}; sdeflow.core.hookspecs.KINDS says '{KIND_OF[hook]}'"


def test_the_hook_table_names_only_hook_specs():
    stale = sorted(set(hook_table()) - set(HOOK_SPECS))
    assert not stale, f"CONTRIBUTING.md's hook table names hooks that sdeflow.core.hookspecs does not have: {stale}"


def one_hook_plugin(hook: str) -> types.ModuleType:
    """A plugin module implementing only ``hook``: it registers ``meta_<kind>``, whose one YAML argument is
    ``width`` (anything the kernel injects for the kind is taken by ``**injected``)."""

    def factory(*passed: Any, width: int = 1, **injected: Any) -> types.SimpleNamespace:
        return types.SimpleNamespace(width=width, passed=passed, injected=injected)

    def implementation(register):
        register(f"meta_{KIND_OF[hook]}", factory)

    implementation.__name__ = hook
    plugin = types.ModuleType(f"meta_plugin_{hook}")
    setattr(plugin, hook, hookimpl(implementation))
    return plugin


@pytest.mark.parametrize("hook", HOOK_SPECS)
def test_a_component_registers_through_every_hook_spec(hook):
    kind = KIND_OF.get(hook)
    assert kind, f"{hook} is a hook spec but no kind in sdeflow.core.hookspecs.KINDS"
    registry = build_registry([("meta", one_hook_plugin(hook))], entry_points=False, strict=True)
    (plugin,) = registry.plugins
    assert plugin.hooks == (hook,)
    assert registry.names(kind) == [f"meta_{kind}"]
    component = registry.get(kind, f"meta_{kind}")
    assert component.plugin.name == "meta" and list(component.arguments) == ["width"]
    assert [c.name for c in registry.all()] == [f"meta_{kind}"]  # listed under its own kind only


# --- the ownership table --------------------------------------------------------------------------


def test_every_kernel_module_is_in_the_ownership_table():
    missing = sorted(kernel_files() - owned_files())
    assert not missing, f"CONTRIBUTING.md's ownership table ('Layout: which file owns what') omits {missing}"


def test_the_ownership_table_names_only_kernel_modules():
    stale = sorted(owned_files() - kernel_files())
    assert not stale, f"CONTRIBUTING.md's ownership table names files platform/sdeflow/ does not have: {stale}"
