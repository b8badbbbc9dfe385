"""The tutorial notebooks run top to bottom (smoke mode: CI set, fewer steps), are stored
without outputs, open with what they teach and end with what to try next."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_there_are_eight_tutorials_in_the_notes_order():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 9)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    """Pyro's convention: the notebook reads CI and takes fewer steps; an error fails it."""
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    """Outputs are never committed (they would go stale); the test suite regenerates them."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_says_what_it_teaches_and_what_to_try_next(path):
    notebook = nbformat.read(path, as_version=4)
    first, last = notebook.cells[0], notebook.cells[-1]
    assert first.cell_type == "markdown" and "**What this teaches.**" in first.source
    assert re.search(r"\*\*Notes:\*\* §\d", first.source)
    assert last.cell_type == "markdown" and last.source.startswith("## What to try next")


def test_readme_links_the_tutorials_in_order():
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"\(tutorials/(\d\d_[a-z_]+\.ipynb)\)", readme)
    assert linked == [p.name for p in NOTEBOOKS]
