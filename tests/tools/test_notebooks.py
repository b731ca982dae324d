"""The notebooks in notebooks/: checked in without outputs, and each one executes top to bottom (nbclient, a fresh
kernel per notebook, offline, in a tmp working directory). The notebooks assert their own claims (identical logits
after reloading, falling loss, constant cache size, ...), so executing them checks those too."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED = ["01_quickstart.ipynb", "02_fine_tuning.ipynb", "03_long_context.ipynb", "04_publishing.ipynb"]
CELL_TIMEOUT = 240  # seconds per cell


def test_the_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_checked_in_notebook_has_no_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs before committing"
    assert book.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes(name, tmp_path, monkeypatch):
    # a fresh kernel inherits this environment: offline, one thread per op (tiny models on a shared 2-core box), and a
    # private modules cache for the trust_remote_code load of the publishing notebook
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the plots as PNG
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and its traceback) when a cell fails
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if name in ("02_fine_tuning.ipynb", "03_long_context.ipynb"):  # the plots were drawn
        assert any("image/png" in o.get("data", {}) for c in book.cells if c.cell_type == "code" for o in c.outputs)
