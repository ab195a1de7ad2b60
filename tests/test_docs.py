"""The documentation site: the YAML reference generated from the registry names every kind, component,
argument and experiment key the code accepts, the pages made from README/MATH/CONTRIBUTING link only to
what the site holds, and (where mkdocs is installed: the ``docs`` extra) ``mkdocs build --strict`` passes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import attrs
import pytest
import yaml

from sdeflow.components.registry import INJECTED, build_registry
from sdeflow.components.schema import type_name
from sdeflow.core.hookspecs import KINDS, hookimpl
from sdeflow.experiment import config
from sdeflow.sweeps import launchers

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load(name: str) -> ModuleType:
    """A generator script of docs/ as a module (mkdocs-gen-files runs it as a script; importing runs nothing)."""
    spec = importlib.util.spec_from_file_location(f"sdeflow_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load("gen_reference")


@pytest.fixture(scope="module")
def registry():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a plugin being written elsewhere may not load yet
        return build_registry()


@pytest.fixture(scope="module")
def page(gen, registry) -> str:
    return gen.reference_markdown(registry)


def block(page: str, anchor: str) -> str:
    """The part of the page under the heading with id ``anchor``, to the next heading."""
    start = page.index(f"{{#{anchor}}}")
    end = re.search(r"\n#{2,3} ", page[start:])
    return page[start: start + end.start() if end else None]


def row_pattern(key: str, annotation: str, default: str) -> re.Pattern:
    return re.compile(rf"^\| `{re.escape(key)}` \| `{re.escape(annotation)}` \| {re.escape(default)} \|", re.M)


# --- the generated YAML reference -----------------------------------------------------------------


def test_every_kind_and_its_hook_is_in_the_reference(page):
    for kind, hook in KINDS.items():
        assert f"### Kind `{kind}`" in page and f"`{hook}`" in page, kind


def test_every_component_and_argument_is_in_the_reference(gen, registry, page):
    components = registry.all()
    assert {c.kind for c in components} >= {"sde", "network", "loss", "sampler", "data"}
    for c in components:
        anchor = gen.anchor(c.kind, c.name)
        assert f"[`{c.name}`](#{anchor})" in block(page, f"kind-{gen.anchor(c.kind, '')}"), f"{c.kind} {c.name}"
        section = block(page, anchor)
        assert f"`{c.plugin.name}`" in section
        for argument in c.arguments.values():
            default = "required" if argument.required else f"`{gen.yaml_value(argument.default)}`"
            assert row_pattern(argument.name, type_name(argument.annotation), default).search(section), \
                f"{c.kind} {c.name}: argument {argument.describe()} is not in the reference"
        if not c.arguments:
            assert "No arguments." in section
        for injected in INJECTED.get(c.kind, ()):
            assert f"| `{injected}` |" not in section  # the kernel's, not YAML's


def test_every_argument_default_is_written_as_yaml_reads_it(gen, registry):
    for c in registry.all():
        for argument in c.arguments.values():
            if not argument.required and isinstance(argument.default, (bool, int, float, str, type(None), tuple)):
                written = yaml.safe_load(gen.yaml_value(argument.default))
                expected = list(argument.default) if isinstance(argument.default, tuple) else argument.default
                assert written == expected, f"{c.kind} {c.name}.{argument.name}"


def test_every_experiment_key_and_setting_is_in_the_reference(gen, page):
    top = block(page, "top-level-keys")
    for key, annotation in config.TOP_LEVEL.items():
        assert re.search(rf"^\| `{key}` \| `{re.escape(type_name(annotation))}` \|", top, re.M), key
    sections = {**config.SECTIONS, "sweep": launchers.LauncherConfig}
    for name, cls in sections.items():
        section = block(page, f"section-{name}")
        for field in attrs.fields(attrs.resolve_types(cls)):
            default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
            shown = "required" if default is attrs.NOTHING else f"`{gen.yaml_value(default)}`"
            assert row_pattern(field.name, type_name(field.type), shown).search(section), f"{name}.{field.name}"
    components = block(page, "component-sections")
    for kind in config.COMPONENT_DEFAULTS:
        assert f"| `{kind}` |" in components, kind


def test_notes_written_for_the_reference_name_keys_that_exist(gen):
    """The generator's own notes (for keys declared without a comment) must not outlive the key."""
    assert set(gen.TOP_LEVEL_NOTES) <= set(config.TOP_LEVEL)
    classes = {**config.SECTIONS, "launcher": launchers.LauncherConfig}
    for section, notes in gen.FIELD_NOTES.items():
        assert section in classes, section
        fields = {f.name for f in attrs.fields(classes[section])}
        assert set(notes) <= fields, f"notes on {section}.{sorted(set(notes) - fields)}, which no longer exist"


class Documented:
    """A stand-in SDE whose arguments are documented in three ways; ``mode`` picks one of them.

    Args:
        width: how wide it is, in
            two lines.
    """

    def __init__(self, width: int = 2, depth: float = 0.5,  # how deep it goes
                 mode: str = "a", hidden: bool = False):
        self.width = width


@hookimpl
def sdeflow_register_sdes(register):
    register("documented", Documented)


def test_the_reference_is_made_from_the_registry_it_is_given(gen):
    registry = build_registry([("docs-test", sys.modules[__name__])], entry_points=False, strict=True)
    page = gen.reference_markdown(registry)
    section = block(page, "sde-documented")
    assert "| `width` | `int` | `2` | how wide it is, in two lines. |" in section
    assert "| `depth` | `float` | `0.5` | how deep it goes |" in section
    assert "| `mode` | `str` | `a` | ``mode`` picks one of them. |" in section  # the clause that names it
    assert "| `hidden` | `bool` | `false` |  |" in section
    assert "Args:" not in section  # the docstring's argument section went into the table
    assert "{#sde-vp}" not in page and "No component of this kind is registered." in page


def test_argument_descriptions_from_docstrings(gen):
    numpy_doc = "Summary.\n\nParameters\n----------\nbeta : float\n    The slope.\nT : float\n    The end.\n"
    assert gen.docstring_arguments(numpy_doc) == {"beta": "The slope.", "T": "The end."}
    assert gen.sentences("One (a. B); Two et al. 2022. Three.") == ["One (a. B);", "Two et al. 2022.", "Three."]
    assert gen.markdown_docstring(":class:`sdeflow.SDE` and :func:`~x.y`") == "`sdeflow.SDE` and `y`"


def test_concepts_names_every_built_in_component(registry):
    """docs/concepts.md's table of built-in components is written by hand (with a word on each): it must
    name every component sdeflow's own plugins register, in the row of its kind."""
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", (DOCS / "concepts.md").read_text(), flags=re.M))
    missing = [f"{c.kind}: {c.name}" for c in registry.all()
               if c.plugin.distribution == "sdeflow" and f"`{c.name}`" not in rows.get(c.kind, "")]
    assert not missing, f"docs/concepts.md's table of built-in components does not name {missing}"


def test_measuring_describes_every_benchmark_script():
    text = (DOCS / "measuring.md").read_text()
    missing = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if f"`{p.name}" not in text]
    assert not missing, f"docs/measuring.md does not describe {missing}"


# --- the pages made from the repository's Markdown ------------------------------------------------


def test_site_pages_link_only_to_what_the_site_holds():
    pages = load("gen_pages").pages()
    assert set(pages) == {"index.md", "math.md", "contributing.md", "plugins.md"}
    for name, text in pages.items():
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            path = target.split("#")[0]
            assert not path or path.startswith("http") or path.endswith(".md"), f"{name} links to {target}"
            assert not path.startswith(("docs/", "../")), f"{name} links to {target}"
    assert "sdeflow_register_sdes" in pages["plugins.md"] and "## Writing a plugin" not in pages["plugins.md"]
    assert "{#s15}" in pages["math.md"]


def test_every_page_of_the_nav_exists_or_is_generated():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(item):
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                yield from pages(value)
        else:
            for value in item:
                yield from pages(value)

    generated = set(load("gen_pages").pages()) | {load("gen_reference").PAGE}
    missing = [p for p in pages(nav) if p not in generated and not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"


# --- the strict build -----------------------------------------------------------------------------

BUILD_MODULES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_gen_files")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_the_site_builds_strictly(tmp_path, registry, gen):
    absent = [m for m in BUILD_MODULES if not installed(m)]
    if absent:
        pytest.skip(f"the docs extra is not installed ({', '.join(absent)}): pip install -e \".[docs]\"")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = (site / "reference" / "yaml" / "index.html").read_text()
    for c in registry.all():
        assert f'id="{gen.anchor(c.kind, c.name)}"' in reference, f"{c.kind} {c.name}"
    for page in ("index.html", "math/index.html", "plugins/index.html", "contributing/index.html"):
        assert "made from the repository" not in (site / page).read_text(), f"{page}: the stub was not replaced"
    assert 'id="s15"' in (site / "math" / "index.html").read_text()
    api = (site / "api" / "python" / "index.html").read_text()
    for name in ("experiment", "component", "train", "open_run", "Run"):
        assert f'id="sdeflow.api.{name}"' in api, name
