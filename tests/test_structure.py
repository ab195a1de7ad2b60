"""The kernel's module graph has no import circle (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[1] / "platform" / "sdeflow"


def kernel_imports() -> dict[str, set[str]]:
    """{module: kernel modules it imports anywhere in its body}."""
    modules = {p.stem for p in KERNEL.glob("*.py")}
    graph = {}
    for path in KERNEL.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[path.stem] = (deps & modules) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
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


def test_no_import_circle_in_the_kernel():
    graph = kernel_imports()
    assert {"api", "cli", "trainer", "runs", "runfolder", "evaluate"} <= set(graph)
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_every_command_line_option_is_described():
    import argparse

    from sdeflow.cli import build_parser

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
