"""The notebooks run headless in smoke mode (offline, tiny models) without a cell error, and are stored as Colab
users need them: a badge, an install cell, and outputs of a real execution."""

import time

import nbformat
import pytest

from scripts.execute_notebooks import NOTEBOOKS, execute_notebook

INSTALL = 'pip", "install", "-q", "pat-hf @ git+https://github.com/pat-hf/pat-hf"'
# What each notebook leaves in its working directory.
PRODUCTS = {
    "01_quickstart_distill.ipynb": ["runs/teacher/student/model.safetensors", "runs/pat/student/README.md",
                                    "runs/pat/student/training_curves.png", "runs/pat/summary.csv"],
    "02_use_a_distilled_student.ipynb": ["runs/kd/student/config.json"],
    "03_compare_distillers.ipynb": [f"runs/{name}/summary.csv" for name in ("vanilla", "kd", "ofa", "pat")],
}


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PRODUCTS)


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_stored_notebook_has_a_badge_an_install_cell_and_executed_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    badge = f"https://colab.research.google.com/github/pat-hf/pat-hf/blob/main/notebooks/{name}"
    assert badge in notebook.cells[0].source
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert INSTALL in code[0].source and "if not OFFLINE:" in code[0].source
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not any(output.output_type == "error" for cell in code for output in cell.outputs)
    assert sum(len(cell.outputs) for cell in code) >= len(code) // 2
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    start = time.perf_counter()
    executed, _ = execute_notebook(NOTEBOOKS / name, tmp_path)
    print(f"{name}: {time.perf_counter() - start:.0f} s in smoke mode")
    for product in PRODUCTS[name]:
        assert (tmp_path / product).is_file(), product
    outputs = "".join(output.get("text", "") for cell in executed.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert "pat-hf: exported the student to runs/" in outputs
