"""The notebooks in examples/ run top to bottom, and are committed executed in full.

Each notebook's first code cell is tagged ``parameters`` and sets ``quick = False``.
As papermill does, the test inserts a cell after it that sets ``quick = True`` and
executes the notebook in a fresh kernel (nbclient), failing on any cell's error.
The kernel imports the ntkd of this repository (``PYTHONPATH`` = repo root), not
whatever copy is installed.
"""

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"need exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def inject_parameters(nb, source: str):
    """Adds (or replaces) the cell after the ``parameters`` cell, as papermill does."""
    i = _parameters_index(nb)
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nxt = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
    if nxt is not None and "injected-parameters" in nxt.metadata.get("tags", []):
        nb.cells[i + 1] = cell
    else:
        nb.cells.insert(i + 1, cell)
    return nb


def test_examples_exist():
    assert len(NOTEBOOKS) >= 3, f"expected the example notebooks in {ROOT / 'examples'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_ran_in_full(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    params = nb.cells[_parameters_index(nb)]
    assert "quick = False" in params.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in code)
    assert all(c.execution_count is not None for c in code), "commit the notebook executed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was committed with an error: {errors[0].get('ename')}"
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images or "plt." not in "".join(c.source for c in code), "figures did not display"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_quick(path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel inherits the environment
    nb = inject_parameters(nbformat.read(path, as_version=4), "quick = True")
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s with quick=True")
    first = next(c for c in nb.cells if c.cell_type == "code" and "import" in c.source)
    assert first.execution_count is not None
