"""`python -m pat_hf.reference CKPT --distiller NAME`: convert a reference checkpoint (pat_hf/reference/convert.py).

The converter is imported under the failure contract (pat_hf/cli/failures.py), so that Ctrl-C during the imports
ends as the contract says too."""

from pat_hf.cli.failures import run_command

if __name__ == "__main__":
    run_command("python -m pat_hf.reference", "pat_hf.reference.convert:main")
