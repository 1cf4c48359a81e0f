"""`python -m pat_hf.train` and `accelerate launch -m pat_hf.train`: the training command (pat_hf/cli/train.py).

`from pat_hf.train import main` still gives the command's `main`; it is imported on first use, so that running
this module reaches the failure contract (pat_hf/cli/failures.py) before torch is loaded.
"""

from typing import Any

from pat_hf.cli import train_command


def __getattr__(name: str) -> Any:
    if name in ("main", "cli"):
        from pat_hf.cli import train

        return getattr(train, name)
    raise AttributeError(f"module 'pat_hf.train' has no attribute {name!r}")


if __name__ == "__main__":
    train_command()
