"""The notebooks in notebooks/ run top to bottom (every cell; a failing cell or assertion fails the test) and
are stored without outputs. They share one folder for the built-in model, built on first use."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (scripts/install.sh installs it)")
nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (scripts/install.sh installs it)")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="session")
def notebook_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def test_there_are_four_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: cell {index} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, notebook_workdir, monkeypatch):
    monkeypatch.setenv("HALFBYTE_NOTEBOOK_DIR", str(notebook_workdir))  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(notebook_workdir)}}
    )
    try:
        client.execute()  # raises CellExecutionError naming the cell on the first failure
    finally:
        keep = os.environ.get("HALFBYTE_NOTEBOOK_OUTPUT_DIR")  # the GPU script keeps the executed notebooks
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, Path(keep) / path.name)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
