"""Execute the notebooks headless in smoke mode (PAT_HF_SMOKE=1: offline, digits data, tiny models) and store
the outputs of that execution in them.

    python scripts/execute_notebooks.py                    # every notebooks/*.ipynb, outputs written back
    python scripts/execute_notebooks.py notebooks/02_*.ipynb --no-write

Each notebook runs in a fresh kernel of this Python (so of this environment), in a temporary directory, with
this checkout's pat_hf first on the path; a cell that raises fails the run.
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
KERNEL_NAME = "pat-hf-smoke"
CELL_TIMEOUT_S = 600


def _kernel_spec_dir(parent: Path) -> Path:
    """A Jupyter data directory whose only kernel is this interpreter (not whatever `python3` is elsewhere)."""
    spec = parent / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pat-hf smoke", "language": "python"}))
    return parent


def execute_notebook(path: Path, workdir: Path) -> tuple[nbformat.NotebookNode, float]:
    """Run `path` in smoke mode in `workdir`; returns the executed notebook and the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    kernelspec = dict(notebook.metadata.get("kernelspec", {}))
    jupyter_data = _kernel_spec_dir(Path(tempfile.mkdtemp(prefix="pat-hf-kernel-")))
    environment = {
        "PAT_HF_SMOKE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline", "JUPYTER_PATH": str(jupyter_data),
        # Tiny models on a shared CPU: a second intra-op thread makes them several times slower, not faster.
        "OMP_NUM_THREADS": "1",
        # tqdm.auto's notice that ipywidgets is missing (Colab has them) is noise in the stored outputs.
        "PYTHONWARNINGS": "ignore:IProgress not found",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
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
    parser.add_argument("--no-write", action="store_true", help="execute only; leave the stored outputs alone")
    args = parser.parse_args()
    for path in args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb")):
        with tempfile.TemporaryDirectory(prefix="pat-hf-notebook-") as workdir:
            notebook, seconds = execute_notebook(path, Path(workdir))
        if not args.no_write:
            partial = path.with_suffix(".ipynb.partial")
            nbformat.write(notebook, partial)
            partial.replace(path)
        print(f"{path.name}: executed in smoke mode in {seconds:.0f} s{'' if args.no_write else ', outputs stored'}")


if __name__ == "__main__":
    main()
