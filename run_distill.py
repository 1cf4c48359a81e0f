"""Distil a timm teacher into a timm student: the script the README uses, a thin wrapper of `pat_hf.cli.train`.

    accelerate launch run_distill.py --config configs/smoke.yaml --output_dir runs/smoke

The same runs as `accelerate launch -m pat_hf.cli.train ...` or `pat-hf-train ...` from a pip install.
"""

from pat_hf.cli.train import cli, main, shutdown

__all__ = ["cli", "main", "shutdown"]

if __name__ == "__main__":
    cli()
