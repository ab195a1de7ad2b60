"""Fixtures shared by the test suite (kept small: add what several test files need)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from sdeflow.components.registry import DISABLE_ENV, ENTRY_POINT_GROUP, STRICT_ENV, reset_default_registry

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    """The repository's root folder."""
    return REPO_ROOT


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch):
    """No plugin block list, no strict mode, and a default registry rebuilt before and after the test.

    Yields ``monkeypatch`` so the test can set ``SDEFLOW_*`` variables that are undone afterwards.
    """
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(STRICT_ENV, raising=False)
    reset_default_registry()
    yield monkeypatch
    reset_default_registry()


@pytest.fixture
def install_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``install(dist, version, {entry_point: module_source or None})`` fakes an installed distribution.

    It writes ``DIST-VERSION.dist-info/`` (METADATA + entry_points.txt in the ``sdeflow`` group) and one
    module per entry point to a temporary folder put on sys.path, so ``importlib.metadata`` finds it
    exactly as it finds an installed package. A ``None`` source names a module that does not exist.
    """
    modules: list[str] = []

    def install(dist: str, version: str, plugins: dict[str, str | None]) -> None:
        site = tmp_path / f"site-{dist}"  # one folder each, so no metadata cache can go stale
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = [f"[{ENTRY_POINT_GROUP}]"]
        for entry_point, source in plugins.items():
            module = f"_fake_{uuid.uuid4().hex}"  # unique, so sys.modules never serves an old one
            if source is not None:
                (site / f"{module}.py").write_text(textwrap.dedent(source))
                modules.append(module)
            lines.append(f"{entry_point} = {module}")
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(site))

    yield install
    for module in modules:
        sys.modules.pop(module, None)
