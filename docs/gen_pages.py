"""Site pages made from the repository's own Markdown at build time (mkdocs-gen-files), so nothing is copied.

- ``index.md``: README.md, the landing page;
- ``math.md``: MATH.md, each ``## N.`` section given the id ``sN`` (``math.md#s15``);
- ``plugins.md``: CONTRIBUTING.md's "Writing a plugin" section;
- ``contributing.md``: the rest of CONTRIBUTING.md.

Each replaces the stub of the same name in docs/, which points a reader of the repository to the source
file. Links are rewritten for the site: ``docs/x.md`` → ``x.md``, the three files above → their pages, a link to
any other file of the repository → its text (the site does not hold it), and "MATH.md §N" → a link to
that section.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SECTION = "Writing a plugin"

PAGES = {"README.md": "index.md", "MATH.md": "math.md", "CONTRIBUTING.md": "contributing.md"}
ANCHORED = {("CONTRIBUTING.md", "writing-a-plugin"): "plugins.md"}

LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")
MATH_SECTION = re.compile(r"MATH\.md §(\d+)")


def site_target(target: str) -> str | None:
    """Where a repository-relative link points in the site; None when the site does not hold the file."""
    if re.match(r"^[a-z]+://|^mailto:|^#", target):
        return target
    path, _, fragment = target.partition("#")
    path = path.removeprefix("./")
    if (path, fragment) in ANCHORED:
        return ANCHORED[(path, fragment)]
    if path in PAGES:
        return PAGES[path] + (f"#{fragment}" if fragment else "")
    if path.startswith("docs/") and path.endswith(".md"):
        return path.removeprefix("docs/") + (f"#{fragment}" if fragment else "")
    return None


def outside_code(line: str, start: int) -> bool:
    """Position ``start`` of ``line`` is not inside a code span."""
    return line[:start].count("`") % 2 == 0


def rewrite_line(line: str) -> str:
    def link(match: re.Match) -> str:
        target = site_target(match.group(2))
        return match.group(1) if target is None else f"[{match.group(1)}]({target})"

    line = LINK.sub(link, line)
    pieces, last = [], 0
    for match in MATH_SECTION.finditer(line):
        if outside_code(line, match.start()) and not line[max(0, match.start() - 1)] == "[":
            pieces += [line[last:match.start()], f"[MATH.md §{match.group(1)}](math.md#s{match.group(1)})"]
            last = match.end()
    return "".join(pieces) + line[last:]


LIST_ITEM = re.compile(r"^(?:[-*+]|\d+\.) ")


def indent_lists(text: str) -> str:
    """Nested list items and continued list paragraphs at Python-Markdown's 4 spaces, not GitHub's 2.

    Inside a list (from an item at the margin to the next line at the margin that is not one), every
    indented line's indentation is doubled: 2 → 4 for a nested item, 4 → 8 for its own continuation. A list
    that follows a paragraph line directly gets a blank line before it.
    """
    out, in_list, fenced = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):  # a code block at the margin ends any list and is copied as it is
            fenced, in_list = not fenced, False
        if fenced or line.startswith("```"):
            out.append(line)
            continue
        if line.strip() and not line[0].isspace():
            starts = bool(LIST_ITEM.match(line))
            if starts and not in_list and out and out[-1].strip():
                out.append("")  # Python-Markdown starts a list only after a blank line
            in_list = starts
        indent = len(line) - len(line.lstrip(" "))
        out.append(" " * indent + line if in_list and indent and line.strip() else line)
    return "\n".join(out) + "\n"


def for_site(text: str) -> str:
    """``text`` for the site: lists indented for Python-Markdown, links rewritten outside code blocks."""
    out, fenced = [], False
    for line in indent_lists(text).splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append(line if fenced else rewrite_line(line))
    return "\n".join(out) + "\n"


def split_section(text: str, title: str) -> tuple[str, str]:
    """(``text`` without the ``## title`` section, that section's body)."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    end = len(text) if end == -1 else end
    body = text[start + len(f"\n## {title}\n"):end]
    return text[:start] + text[end:], body


def escape_underscores(line: str) -> str:
    """``_`` as a literal outside code spans: MATH.md's prose writes subscripts (``E_{Y_t|x}``), which
    Markdown would read as emphasis."""
    parts = re.split(r"(`+[^`]*?`+)", line)
    return "".join(part if part.startswith("`") else part.replace("_", "\\_") for part in parts)


def math_page(text: str) -> str:
    """MATH.md with ids ``sN`` on its numbered sections and its prose's subscripts kept as written (lines
    indented 4 or more are formula blocks, left as they are)."""
    text = re.sub(r"^## (\d+)\. (.*)$", r"## \1. \2 {#s\1}", text, flags=re.M)
    lines = [line if line.startswith("    ") or line.startswith("#") else escape_underscores(line)
             for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """{site page: Markdown} for every page this script makes."""
    readme = for_site((ROOT / "README.md").read_text())
    contributing, plugin_section = split_section((ROOT / "CONTRIBUTING.md").read_text(), PLUGIN_SECTION)
    contributing = for_site(contributing).rstrip() + (
        f"\n\n## {PLUGIN_SECTION}\n\nSee [Writing a plugin](plugins.md), and the [YAML reference]"
        "(reference/yaml.md) for what every registered component accepts.\n")
    plugins = (f"# {PLUGIN_SECTION}\n\n*From CONTRIBUTING.md. The interfaces a plugin implements are in the "
               "[plugin API](api/plugins.md); what every registered component accepts is in the "
               "[YAML reference](reference/yaml.md).*\n" + for_site(plugin_section))
    return {
        "index.md": readme,
        "math.md": for_site(math_page((ROOT / "MATH.md").read_text())),
        "contributing.md": contributing,
        "plugins.md": plugins,
    }


def main() -> None:
    import mkdocs_gen_files

    sources = {"index.md": "README.md", "math.md": "MATH.md", "contributing.md": "CONTRIBUTING.md",
               "plugins.md": "CONTRIBUTING.md"}
    for page, text in pages().items():
        with mkdocs_gen_files.open(page, "w") as out:
            out.write(text)
        mkdocs_gen_files.set_edit_path(page, f"../{sources[page]}")


if __name__ in ("__main__", "<run_path>"):  # mkdocs-gen-files runs this file with runpy.run_path
    main()
