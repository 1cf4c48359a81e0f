"""Distil a timm teacher into a timm student: the script the README uses, a thin wrapper of `pat_hf.cli.train`.

    accelerate launch run_distill.py --config configs/smoke.yaml --output_dir runs/smoke

The same runs as `accelerate launch -m pat_hf.train ...` or `pat-hf-train ...` from a pip install.
"""

from pat_hf.cli import train_command

if __name__ == "__main__":
    train_command()
