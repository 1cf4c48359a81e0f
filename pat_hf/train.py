"""`python -m pat_hf.train` and `accelerate launch -m pat_hf.train`: the training command (pat_hf/cli/train.py)."""

from pat_hf.cli import train_command

if __name__ == "__main__":
    train_command()
