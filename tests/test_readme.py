"""README's Python section is run as written, so its code cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else None]


def test_readme_python_section_runs(monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", section("Python"), flags=re.S)
    assert blocks, "README's Python section has no python code block"
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository, like the CLI examples
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Python section)", "exec"), namespace)
    assert namespace["run"].step == 300
    assert namespace["fast"].shape == (1000, 2) and namespace["quality"]["swd"]["floor"] > 0
    out = capsys.readouterr().out
    assert re.search(r"\d\.\d{3} ± \d\.\d{3} bits/dim", out)
