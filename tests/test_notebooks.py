"""The exploration notebooks in notebooks/: stored without outputs, and each runs from top
to bottom without an error, its check cells (asserts followed by a "check passed" print)
included.

The notebooks run in a Jupyter kernel started with this very interpreter (a kernel spec
written to a temporary folder and put first on JUPYTER_PATH), so they see the funcnet and the
packages of the environment running the tests, whatever kernels the machine has installed.
"""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = [
    "01_backprop_by_hand.ipynb",
    "02_forward_reverse_and_accumulation_order.ipynb",
    "03_training_on_digits.ipynb",
    "04_inside_a_training_run.ipynb",
    "05_per_example_gradients.ipynb",
    "06_convolution_backward.ipynb",
    "07_curvature.ipynb",
]
MARKER = "check passed"
KERNEL_NAME = "funcnet-tests"
TIMEOUT_S = 600  # per cell; the seven notebooks together take about three minutes


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_every_notebook_is_listed():
    assert sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(_code_cells(nb)):
        assert cell.outputs == [], f"{name}: code cell {index} has stored outputs; clear them"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel spec for the interpreter running the tests, first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "funcnet tests",
        "language": "python",
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root))
        patch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # no debugger warnings from ipykernel
        yield KERNEL_NAME


def _text(cell):
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_its_checks_pass(name, kernel):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=kernel,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    cells = _code_cells(nb)
    errors = [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert not errors
    checks = [cell for cell in cells if f'print("{MARKER}' in cell.source]
    assert checks, f"{name} has no check cell"
    for cell in checks:  # the marker is printed after the cell's asserts, so they all held
        assert MARKER in _text(cell), f"{name}: a check cell did not report:\n{cell.source}"
    assert all(cell.execution_count is not None for cell in cells)
