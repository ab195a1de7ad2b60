"""The kernel's shape: its folders are its layers. No import circle between modules or between
subpackages (lazy imports inside functions included), and every import goes down the layering that
CONTRIBUTING states, never up."""

from __future__ import annotations

import ast
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[1] / "platform" / "sdeflow"

LAYERS = [
    {"core"},
    {"components"},
    {"experiment"},
    {"likelihood", "rundir"},
    {"evaluation"},
    {"assembly"},
    {"training"},
    {"sweeps"},
    {"api", "plugin", "launchers"},
    {"cli"},
    {"__init__", "__main__"},
]
"""Each subpackage (or top-level module) of ``sdeflow``, lowest first: a layer imports only from lower
layers and from itself (CONTRIBUTING, "Layout")."""


def module_name(path: Path) -> str:
    """``core/errors.py`` → ``core.errors``; ``api.py`` → ``api``; a package's __init__ is the package."""
    parts = list(path.relative_to(KERNEL).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The kernel modules a relative ``from`` import in ``module`` names."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    if node.module:
        target = [*base, *node.module.split(".")]
        return [".".join(target), *(".".join([*target, a.name]) for a in node.names)]
    return [".".join([*base, a.name]) for a in node.names]


def kernel_imports() -> dict[str, set[str]]:
    """{module: kernel modules it imports anywhere in its body}."""
    paths = {module_name(p): p for p in KERNEL.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                deps |= {m for m in resolve(name, path.name == "__init__.py", node) if m in paths}
        graph[name] = deps - {name}
    return graph


def package_of(module: str) -> str:
    return module.split(".")[0]


def package_imports() -> dict[str, set[str]]:
    """{subpackage: the other subpackages (or top-level modules) its modules import}."""
    graph: dict[str, set[str]] = {}
    for module, deps in kernel_imports().items():
        graph.setdefault(package_of(module), set()).update(package_of(d) for d in deps)
    return {package: deps - {package} for package, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_reader_resolves_relative_imports_in_subpackages():
    graph = kernel_imports()
    assert "core.errors" in graph["components.registry"]
    assert {"training.milestones", "assembly.run"} <= graph["training.trainer"]
    assert "rundir.folder" in graph["api"]


def test_no_import_circle_in_the_kernel():
    graph = kernel_imports()
    assert {"api", "cli.commands", "training.trainer", "assembly.run", "rundir.folder",
            "evaluation.evaluate"} <= set(graph)
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_no_import_circle_between_subpackages():
    graph = package_imports()
    assert {"core", "likelihood", "training", "sweeps", "cli"} <= set(graph)
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_every_import_goes_down_the_layers():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert set(package_imports()) == set(layer), "every subpackage has a layer (and only those that exist)"
    upward = sorted(f"{module} → {dep}" for module, deps in kernel_imports().items() for dep in deps
                    if layer[package_of(dep)] > layer[package_of(module)])
    assert not upward, f"imports that climb a layer: {upward}"
    sideways = sorted(f"{module} → {dep}" for module, deps in kernel_imports().items() for dep in deps
                      if package_of(dep) != package_of(module)
                      and layer[package_of(dep)] == layer[package_of(module)])
    assert not sideways, f"imports between packages of one layer: {sideways}"


def test_the_core_imports_nothing_else_of_sdeflow():
    assert package_imports()["core"] == set()


def test_every_command_line_option_is_described():
    import argparse

    from sdeflow.cli.commands import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"plugins", "components", "check", "train", "eval", "sample", "sweep"}
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"sdeflow {name} {'/'.join(action.option_strings) or action.dest}: no help"


PLUGIN_SOURCES = [KERNEL.parents[1] / "plugins", KERNEL.parents[1] / "examples" / "sdeflow-example-plugin"]


def kernel_modules_imported(path: Path) -> set[str]:
    """The sdeflow modules ``path`` imports (``sdeflow_builtin`` and other plugins' own modules aside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "sdeflow" or n.startswith("sdeflow.")}
    return found


def test_plugins_import_the_kernel_only_through_sdeflow_plugin():
    files = [p for root in PLUGIN_SOURCES for p in root.rglob("*.py")]
    assert len(files) > 20
    offending = {str(p.relative_to(KERNEL.parents[1])): sorted(m - {"sdeflow.plugin"})
                 for p in files if (m := kernel_modules_imported(p)) - {"sdeflow.plugin"}}
    assert not offending, f"import these through sdeflow.plugin: {offending}"


def test_sdeflow_plugin_exports_exactly_its_all():
    import sdeflow.plugin

    public = {name for name in vars(sdeflow.plugin) if not name.startswith("_") and name != "annotations"}
    assert public == set(sdeflow.plugin.__all__)
    assert all(getattr(sdeflow.plugin, name) is not None for name in sdeflow.plugin.__all__)
