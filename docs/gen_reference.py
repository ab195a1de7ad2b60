"""The YAML reference page, generated at build time (mkdocs-gen-files) so that it cannot drift.

Everything on the page is read from the kernel's public objects: the experiment's top-level keys and run
settings from ``sdeflow.experiment.config`` (``TOP_LEVEL``, ``SECTIONS``, the ``Experiment`` attrs class and the
comments beside their fields), the launcher section from ``sdeflow.sweeps.launchers.LauncherConfig``, and every
kind, hook and component with its arguments from the registry (``sdeflow.components.registry``,
``sdeflow.components.schema``),
exactly as ``sdeflow components`` lists them. An argument's description is, in this order, its entry in an
``Args:``/``Parameters`` section of the factory's docstring, the comment beside it in the signature, or
the sentences of the docstring that name it in backquotes.

The page replaces the stub docs/reference/yaml.md. ``tests/test_docs.py`` imports this file and compares
the page with the registry.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import textwrap
import tokenize
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import yaml

PAGE = "reference/yaml.md"

# Notes for keys whose declaration carries no comment: the comment in the code wins where there is one, and
# tests/test_docs.py fails on a note whose key no longer exists, so a rename cannot leave one behind.
TOP_LEVEL_NOTES = {
    "name": "the run's name: the default run folder is `runs/<name>`",
    "seed": "the initial weights, the order of the batches, every training step's draws and every evaluation's",
    "device": "`auto` takes a GPU when there is one",
    "precision": "`bf16`: bfloat16 autocast on a CUDA device that supports it (elsewhere fp32, with a notice)",
    "ablations": "named sets of dotted overrides, each a variant of a sweep (see below)",
    "sweep": "a grid of dotted keys to lists of values, crossed with every ablation (see below)",
}
FIELD_NOTES = {
    "train": {
        "steps": "updates in all; a resumed run continues up to this count",
        "batch_size": "the global batch, split evenly across DDP ranks",
        "ema": "decay of the EMA weights that every evaluation and sample uses (0: a copy of the weights)",
        "ema_warmup": "decay min(ema, (1 + k)/(10 + k)) at update k, so that a short run's EMA is not stale",
        "grad_clip": "the largest gradient norm, above which gradients are scaled down (null: no clipping)",
        "log_every": "steps between records in metrics.jsonl and TensorBoard (0: none)",
        "eval_every": "steps between evaluations on val during training (0: only the final evaluation)",
        "sample_every": "steps between sample figures during training (0: none before the end)",
        "checkpoint_every": "steps between checkpoints; the last step always writes one",
        "compile": "torch.compile the network (see Training at scale)",
        "channels_last": "the network in channels-last memory layout: the fastest U-net on a CPU",
        "num_workers": "DataLoader worker processes for the training batches",
    },
    "eval": {
        "max_examples": "only the first N examples of a split (null: all of them)",
        "batch_size": "examples a batch",
        "samples_per_example": "K: draws of (t, ε) averaged per example",
        "probe": "the divergence: Hutchinson with Rademacher or Gaussian probes, or exact (D backward passes)",
        "time_sampler": "the time sampler of the ELBO estimators, e.g. uniform or debiased",
        "pilot_examples": "training examples of the pilot pass (fitted proposals, combined_elbo's weights)",
        "proposal_bins": "log-t bins of the fitted time proposal and of combined_elbo's weights",
        "ode_t0": "the time the ODE likelihood starts from (MATH.md §7)",
        "ode_rtol": "relative tolerance of the ODE solver",
        "ode_atol": "absolute tolerance of the ODE solver",
        "ode_method": "the torchdiffeq solver of the ODE likelihood",
    },
    "sample": {
        "num": "samples drawn after training and by sdeflow sample (and by swd and mmd)",
        "steps": "sampler steps (null: the sampler's own)",
        "lam": "λ of the λ-family, 0 reverse SDE … 1 ODE (null: the sampler's own); needs a sampler with lam",
        "trajectories": "2-D data: also draw the paths for λ = 0 and λ = 1 (the paper's Figure 5)",
    },
    "logging": {
        "tensorboard": "write TensorBoard events beside metrics.jsonl",
        "progress": "show a progress bar while training",
    },
    "launcher": {
        "name": "sequential (one after another here), local (several at once on this machine) or slurm",
        "partition": "SLURM partition",
        "account": "SLURM account",
        "time_minutes": "SLURM time limit of each job, in minutes",
        "nodes": "SLURM nodes per job",
        "cpus_per_task": "SLURM CPUs per task",
        "mem_gb": "SLURM memory per node, in GB",
    },
}


# --------------------------------------------------------------------------- source comments


def line_comments(source: str) -> dict[int, str]:
    """{line number: the text of the ``#`` comment that ends it} in ``source`` (1-based lines)."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each annotated field of a class body (``lr: float = 1e-4  # ...``)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        (node,) = ast.parse(source).body
    except (OSError, TypeError, SyntaxError, ValueError):
        return {}
    comments = line_comments(source)
    return {item.target.id: comments[item.lineno] for item in node.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.lineno in comments}


def dict_comments(module: Any, variable: str) -> dict[str, str]:
    """The comment beside each string key of the module-level dict literal ``variable``."""
    source = inspect.getsource(module)
    comments = line_comments(source)
    for node in ast.parse(source).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == variable for t in targets) and isinstance(node.value, ast.Dict):
            return {key.value: comments[key.lineno] for key in node.value.keys
                    if isinstance(key, ast.Constant) and key.lineno in comments}
    return {}


def signature_comments(function: Callable[..., Any]) -> dict[str, str]:
    """The comment at the end of a line of ``function``'s signature, for the last parameter on that line."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):  # no source, or a lambda's line that is no statement
        return {}
    definition = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if definition is None:
        return {}
    comments = line_comments(source)
    arguments = definition.args
    last_on_line = {a.lineno: a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}
    return {name: comments[line] for line, name in last_on_line.items() if line in comments}


# --------------------------------------------------------------------------- docstrings

SECTION_HEADERS = re.compile(r"^(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):\s*$")
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def markdown_docstring(text: str) -> str:
    """A docstring as Markdown: Sphinx roles (``:class:`X```) become code spans, ``~`` keeping the last name
    (as docs/griffe_roles.py does for the API reference)."""
    return ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


def docstring_arguments(doc: str) -> dict[str, str]:
    """Entries of an ``Args:`` (Google: ``name (type): text``) or ``Parameters`` (NumPy: ``name : type``, the
    text indented below) section: {name: description}."""
    lines = doc.splitlines()
    notes: dict[str, str] = {}
    for i, line in enumerate(lines):
        numpy = line.strip() == "Parameters" and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        if not (SECTION_HEADERS.match(line.strip()) or numpy):
            continue
        indent, name = None, None
        for raw in lines[i + (2 if numpy else 1):]:
            if not raw.strip():
                continue
            depth = len(raw) - len(raw.lstrip())
            indent = depth if indent is None else indent
            if depth < indent:
                break
            if depth == indent:
                pattern = r"(\w+)\s*:.*$" if numpy else r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$"
                match = re.match(pattern, raw.strip())
                if not match:
                    break
                name = match.group(1)
                notes[name] = "" if numpy else match.group(2).strip()
            elif name:
                notes[name] = f"{notes[name]} {raw.strip()}".strip()
    return notes


def sentences(text: str) -> list[str]:
    """``text`` cut after each ``.`` or ``;`` that ends a clause: outside brackets and code, and followed
    by a space and a capital, a backquote or a bracket (so "et al. 2022" and "e.g. x" stay whole)."""
    out, start, depth, code = [], 0, 0, False
    for i, char in enumerate(text):
        if char == "`":
            code = not code
        elif not code and char in "([{":
            depth += 1
        elif not code and char in ")]}":
            depth = max(0, depth - 1)
        elif (not code and depth == 0 and char in ".;" and text[i + 1:i + 2] == " "
              and re.match(r"[A-Z`(\[]", text[i + 2:i + 3])):
            out.append(text[start:i + 1].strip())
            start = i + 1
    out.append(text[start:].strip())
    return [s for s in out if s]


def mentioning_sentences(doc: str, names: Iterable[str]) -> str:
    """The sentences of ``doc``'s prose (indented blocks left out) that show one of ``names`` as code."""
    prose = " ".join(line.strip() for line in doc.splitlines() if line.strip() and not line.startswith("    "))
    patterns = [re.compile(rf"`{re.escape(name)}`|`{re.escape(name)}(?=[:=\s·])") for name in names]
    return " ".join(s for s in sentences(prose) if any(p.search(s) for p in patterns))


def literal_values(annotation: Any) -> list[str]:
    """The string values of a ``Literal[...]`` annotation (also inside ``X | None``)."""
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return [a for a in typing.get_args(annotation) if isinstance(a, str)]
    return [v for a in typing.get_args(annotation) for v in literal_values(a)]


def argument_notes(factory: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, str]:
    """A description of each argument (``{name: schema.Argument}``): its entry in the docstring's ``Args:``
    section, the comment beside it in the signature, or the docstring's sentences that name it (or, for a
    ``Literal`` argument, one of its values)."""
    doc = inspect.getdoc(factory) or ""
    target = factory.__init__ if inspect.isclass(factory) else factory
    from_section = {**docstring_arguments(inspect.getdoc(target) or ""), **docstring_arguments(doc)}
    from_comments = signature_comments(target)
    prose = summary_of(doc)
    notes = {}
    for name, argument in arguments.items():
        notes[name] = (from_section.get(name) or from_comments.get(name) or mentioning_sentences(prose, [name])
                       or mentioning_sentences(prose, literal_values(argument.annotation)))
    return notes


def first_paragraph(component: Any) -> str:
    """A component's summary: the description it was registered with, else its docstring's first paragraph."""
    doc = inspect.getdoc(component.factory) or ""
    first_line = doc.split("\n", 1)[0].strip()
    if component.description and component.description != first_line:
        return component.description
    return " ".join(doc.split("\n\n", 1)[0].split())


def summary_of(doc: str) -> str:
    """A docstring without its ``Args:``/``Parameters`` section (those go in the argument table)."""
    kept = []
    skipping = False
    for i, line in enumerate(doc.splitlines()):
        numpy = line.strip() == "Parameters" and i + 1 < len(doc.splitlines()) and \
            set(doc.splitlines()[i + 1].strip()) == {"-"}
        if SECTION_HEADERS.match(line.strip()) or numpy:
            skipping = True
            continue
        if skipping and line.strip() and not line.startswith((" ", "-")):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept).strip()


# --------------------------------------------------------------------------- rendering helpers


def yaml_value(value: Any) -> str:
    """A default as it is written in YAML (``null``, ``true``, ``[1, 2]``, ``0.001``)."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
    except yaml.YAMLError:
        return repr(value)
    return text.strip().removesuffix("...").strip()


def cell(text: str) -> str:
    """Text that fits in one Markdown table cell: one line, ``|`` escaped outside code spans (Python-Markdown
    does not split a row at a ``|`` inside one, and would show the backslash there)."""
    parts = re.split(r"(`+[^`]*?`+)", " ".join(str(text).split()))
    return "".join(part if part.startswith("`") else part.replace("|", "\\|") for part in parts)


def code(text: str) -> str:
    """A code span for a table cell."""
    text = " ".join(str(text).split())
    ticks = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def anchor(kind: str, name: str) -> str:
    """The stable id of a component's heading, ``sde-vp``."""
    return re.sub(r"[^a-z0-9]+", "-", f"{kind}-{name}".lower()).strip("-")


# --------------------------------------------------------------------------- the experiment


def attrs_rows(cls: type, section: str) -> list[list[str]]:
    """One row per field of an attrs class: key, type, default, the comment beside it (or its note)."""
    from sdeflow.components.schema import type_name

    comments = {**FIELD_NOTES.get(section, {}), **field_comments(cls)}
    rows = []
    for field in attrs.fields(attrs.resolve_types(cls)):
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        shown = "required" if default is attrs.NOTHING else code(yaml_value(default))
        rows.append([code(field.name), code(type_name(field.type)), shown, cell(comments.get(field.name, ""))])
    return rows


def experiment_reference() -> str:
    """The experiment file: top-level keys, run-setting sections and component sections."""
    from sdeflow.components.schema import type_name
    from sdeflow.core import hookspecs
    from sdeflow.experiment import config

    experiment_fields = {f.name: f for f in attrs.fields(config.Experiment)}
    notes = {**TOP_LEVEL_NOTES, **dict_comments(config, "TOP_LEVEL")}
    rows = []
    for key, annotation in config.TOP_LEVEL.items():
        field = experiment_fields.get(key)
        default = field.default if field is not None else attrs.NOTHING
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        shown = "the file's name" if key == "name" else ("—" if default is attrs.NOTHING else code(yaml_value(default)))
        rows.append([code(key), code(type_name(annotation)), shown, cell(notes.get(key, ""))])
    out = ["## The experiment file {#the-experiment-file}", "",
           "An experiment is one YAML mapping. Its top-level keys are of three sorts: settings of the whole "
           "run, sections of run settings (checked against the attrs classes below), and one section per "
           "component kind, `{name: <registered name>, <its arguments>}`. An unknown key anywhere is an error "
           "that names the file, the dotted key and what is accepted. Every key can be overridden on the "
           "command line with a dotted path (`train.batch_size=64`).", "",
           "### Top-level keys {#top-level-keys}", "", table(["key", "type", "default", "notes"], rows), ""]
    for section, cls in config.SECTIONS.items():
        doc = inspect.getdoc(cls) if cls.__doc__ else ""
        out += [f"### `{section}:` {{#section-{section}}}", ""]
        if doc and not doc.startswith(f"{cls.__name__}("):
            out += [markdown_docstring(doc), ""]
        out += [f"Checked against `sdeflow.experiment.config.{cls.__name__}`.", "",
                table(["key", "type", "default", "notes"], attrs_rows(cls, section)), ""]
    out += component_sections_reference(config.COMPONENT_DEFAULTS, hookspecs.KINDS,
                                        dict_comments(config, "COMPONENT_DEFAULTS"))
    out += sweep_reference()
    return "\n".join(out)


def component_sections_reference(defaults: dict[str, Any], kinds: dict[str, str], notes: dict[str, str]
                                 ) -> list[str]:
    rows = []
    for kind, default in defaults.items():
        shown = "required" if default is None else code("{" + ", ".join(f"{k}: {v}" for k, v in default.items()) + "}")
        link = f"[every {kind}](#kind-{anchor(kind, '')})" if kind in kinds else ""
        rows.append([code(kind), shown, link, cell(notes.get(kind, ""))])
    return ["### Component sections {#component-sections}", "",
            "Each is `{name: <registered name>, <its arguments>}` (a bare name is short for `{name: ...}`); "
            "the arguments are checked against the component's signature before anything runs. A section "
            "left out takes its default. Setting only arguments (`loss.weighting=likelihood`) keeps the "
            "default's name. Where two plugins register the same name, write `plugin:name`.", "",
            table(["section", "default", "components", "notes"], rows), ""]


def sweep_reference() -> list[str]:
    from sdeflow.sweeps import launchers

    example = textwrap.dedent("""\
        ablations:                  # one variant each, besides the experiment's own settings (`base`)
          - {name: debiased, set: {time_sampler.name: debiased, loss.weighting: likelihood}}
        sweep:                      # a grid, crossed with every ablation: 2 × 3 variants here
          parameterization.name: [drift, score, noise]
        launcher: {name: local, jobs: 2}
        """)
    return ["### `ablations:`, `sweep:` and `launcher:` {#section-sweep}", "",
            "Read by `sdeflow sweep` (see [Sweeps and clusters](../sweeps.md)). Precedence, lowest first: "
            "the file, the variant's ablation `set`, its sweep grid values, and the command line's overrides. "
            "A variant's name (the ablation's name, then the grid values joined by `-`) becomes the name of "
            "its run folder, so it may hold letters, digits, `.`, `_` and `-` only.", "",
            "```yaml", example.rstrip(), "```", "",
            "The `launcher:` section is checked against `sdeflow.sweeps.launchers.LauncherConfig` "
            "(`--launcher` and `--jobs` override it):", "",
            table(["key", "type", "default", "notes"], attrs_rows(launchers.LauncherConfig, "launcher")), ""]


# --------------------------------------------------------------------------- the components


def plugin_label(component: Any) -> str:
    plugin = component.plugin
    origin = f"{plugin.distribution} {plugin.version}" if plugin.distribution else "not installed"
    return f"plugin `{plugin.name}` ({origin})"


def component_reference(component: Any, injected: Iterable[str]) -> str:
    """One component: heading, plugin, docstring, example spec and the table of its arguments."""
    from sdeflow.components.schema import type_name
    from sdeflow.experiment import config

    arguments = component.arguments
    doc = inspect.getdoc(component.factory) or component.description or ""
    notes = argument_notes(component.factory, arguments)
    out = [f"### `{component.name}` {{#{anchor(component.kind, component.name)}}}", "",
           f"*{component.kind}* from {plugin_label(component)}.", ""]
    if doc:
        out += [markdown_docstring(summary_of(doc)), ""]
    if component.kind in config.COMPONENT_DEFAULTS:
        spec = ", ".join([f"name: {component.name}"] + [
            f"{a.name}: " + (f"<{type_name(a.annotation)}>" if a.required else yaml_value(a.default))
            for a in arguments.values()])
        out += ["```yaml", f"{component.kind}: {{{spec}}}", "```", ""]
    if arguments:
        rows = [[code(a.name), code(type_name(a.annotation)), "required" if a.required else code(yaml_value(a.default)),
                 cell(markdown_docstring(notes.get(a.name, "")))] for a in arguments.values()]
        out += [table(["argument", "type", "default", "description"], rows), ""]
    else:
        out += ["No arguments.", ""]
    passed = [name for name in injected if name in inspect.signature(component.factory).parameters]
    if passed:
        out += ["Passed by the kernel, not set in YAML: " + ", ".join(f"`{n}`" for n in passed) + ".", ""]
    return "\n".join(out)


def kinds_reference(registry: Any) -> str:
    from sdeflow.components.registry import INJECTED
    from sdeflow.core import hookspecs
    from sdeflow.experiment import config

    out = ["## Components {#components}", "",
           "Every kind, the hook that registers it, and every component registered when this page was built, "
           "with its arguments. `sdeflow components KIND` lists the same for the plugins installed where you "
           "run it.", ""]
    for kind, hook in hookspecs.KINDS.items():
        spec = getattr(hookspecs, hook)
        where = f"the `{kind}:` section" if kind in config.COMPONENT_DEFAULTS else "not a section of its own"
        components = registry.all(kind)
        out += [f"### Kind `{kind}` {{#kind-{anchor(kind, '')}}}", "",
                f"Registered by `{hook}`; {where}. " + markdown_docstring(inspect.getdoc(spec) or ""), ""]
        if INJECTED.get(kind):
            out += ["The kernel passes " + ", ".join(f"`{n}`" for n in INJECTED[kind]) + " itself.", ""]
        out += [table(["name", "plugin", "summary"],
                      [[f"[`{c.name}`](#{anchor(kind, c.name)})", code(c.plugin.name),
                        cell(markdown_docstring(first_paragraph(c)))] for c in components]) if components
                else "No component of this kind is registered.", ""]
    out += ["## Every component {#every-component}", ""]
    for kind in hookspecs.KINDS:
        out += [f"## `{kind}` components {{#components-{anchor(kind, '')}}}", ""]
        for component in registry.all(kind):
            out.append(component_reference(component, INJECTED.get(kind, ())))
    return "\n".join(out)


def plugins_reference(registry: Any) -> str:
    rows = [[code(p.name), cell(f"{p.distribution} {p.version}" if p.distribution else "—"),
             cell(", ".join(h.removeprefix("sdeflow_register_") for h in p.hooks))] for p in registry.plugins]
    return "\n".join(["## Plugins this page was built with {#plugins}", "",
                      table(["plugin", "distribution", "hooks"], rows), ""])


def reference_markdown(registry: Any = None) -> str:
    """The whole YAML reference page for ``registry`` (default: every installed plugin, strictly loaded)."""
    from sdeflow.components.registry import build_registry

    if registry is None:
        registry = build_registry(strict=True)  # a plugin that fails to load must fail the build, not vanish
    head = ["# YAML reference", "",
            "*Generated from the registry and `sdeflow.experiment.config` when the site is built: it lists exactly "
            "what the "
            "code accepts.*", "",
            "On this page: [the experiment file](#the-experiment-file), "
            "[its component sections](#component-sections), [sweeps](#section-sweep), "
            "[every kind](#components) and [every component](#every-component).", ""]
    return "\n".join(head + [experiment_reference(), kinds_reference(registry), plugins_reference(registry)])


def main() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as page:
        page.write(reference_markdown())
    mkdocs_gen_files.set_edit_path(PAGE, "gen_reference.py")


if __name__ in ("__main__", "<run_path>"):  # mkdocs-gen-files runs this file with runpy.run_path
    main()
