"""Execute the notebooks headless in one of their offline modes; the offline mode's outputs are the stored ones.

    python scripts/execute_notebooks.py                                    # smoke mode: a check, nothing written
    python scripts/execute_notebooks.py --mode offline                     # every notebook, outputs stored
    python scripts/execute_notebooks.py --mode offline notebooks/02_*.ipynb --no-write

- smoke (PAT_HF_SMOKE=1): the digits data, a dozen optimizer steps per run, seconds per notebook; the test
  suite executes it (tests/test_notebooks.py). Its numbers are chance, so its outputs are never stored.
- offline (PAT_HF_OFFLINE=1): the digits data at the distillation study's budget (teacher 6 epochs, students
  48), minutes to an hour per notebook on a CPU; what a visitor reads in the stored notebooks.

Each notebook runs in a fresh kernel of this Python (so of this environment), in a temporary directory, with
this checkout's pat_hf first on the path and one torch thread; a cell that raises fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "pat-hf-offline"
MODES = {"smoke": "PAT_HF_SMOKE", "offline": "PAT_HF_OFFLINE"}
# A cell that runs longer has hung: a smoke cell takes seconds; the offline mode's longest cell (four students
# of 48 epochs, one after another) takes under an hour on one core.
CELL_TIMEOUT_S = {"smoke": 600, "offline": 4 * 3600}


def _kernel_spec_dir(parent: Path) -> Path:
    """A Jupyter data directory whose only kernel is this interpreter (not whatever `python3` is elsewhere)."""
    spec = parent / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pat-hf offline", "language": "python"}))
    return parent


def execute_notebook(path: Path, workdir: Path, mode: str = "smoke") -> tuple[nbformat.NotebookNode, float]:
    """Run `path` in `mode` (a key of MODES) in `workdir`; returns the executed notebook and the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    kernelspec = dict(notebook.metadata.get("kernelspec", {}))
    jupyter_data = _kernel_spec_dir(Path(tempfile.mkdtemp(prefix="pat-hf-kernel-")))
    # Exactly one mode's variable is set: the other one, inherited from this shell, would change the mode.
    environment = {
        **{variable: "1" if name == mode else None for name, variable in MODES.items()},
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline", "JUPYTER_PATH": str(jupyter_data),
        # Tiny models on a shared CPU: a second intra-op thread makes them several times slower, not faster.
        "OMP_NUM_THREADS": "1",
        # tqdm.auto's notice that ipywidgets is missing (Colab has them) is noise in the stored outputs.
        "PYTHONWARNINGS": "ignore:IProgress not found",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    previous = {key: os.environ.get(key) for key in environment}
    for key, value in environment.items():  # the kernel inherits this process's environment
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S[mode],
                                resources={"metadata": {"path": str(workdir)}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    # Stored for Colab and Jupyter users, who run it with their own `python3` kernel.
    notebook.metadata["kernelspec"] = kernelspec
    return notebook, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--mode", choices=sorted(MODES), default="smoke",
                        help="smoke: a quick check, outputs never stored; offline: the stored outputs")
    parser.add_argument("--no-write", action="store_true", help="offline mode: execute only, store nothing")
    args = parser.parse_args()
    store = args.mode == "offline" and not args.no_write
    for path in args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb")):
        with tempfile.TemporaryDirectory(prefix="pat-hf-notebook-") as workdir:
            notebook, seconds = execute_notebook(path, Path(workdir), args.mode)
        if store:
            partial = path.with_suffix(".ipynb.partial")
            nbformat.write(notebook, partial)
            partial.replace(path)
        print(f"{path.name}: executed in {args.mode} mode in {seconds:.0f} s{', outputs stored' if store else ''}",
              flush=True)


if __name__ == "__main__":
    main()
