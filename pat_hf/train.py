"""`python -m pat_hf.train` and `accelerate launch -m pat_hf.train`: the training entry point, pat_hf/cli/train.py."""

from pat_hf.cli.train import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
