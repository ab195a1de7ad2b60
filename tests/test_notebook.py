"""examples/notebooks/swissroll.ipynb runs top to bottom on the CPU (nbclient, a fresh kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "swissroll.ipynb"


def test_swissroll_notebook_runs_and_shows_its_figures():
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:  # the test extra installs both
        pytest.fail(f"the notebook test needs nbclient and ipykernel ({e}): pip install -e '.[test]'")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "the notebook is stored with outputs: clear them before committing"
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # the data, the training curves, the λ-family, Figure 5
    text = "".join(o.get("text", "") for o in outputs)
    assert "combined_elbo" in text and "bits/dim" in text
