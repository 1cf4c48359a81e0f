"""Run by `accelerate launch` in test_ddp.py: one training process through the console script, which also
saves its own final student. For the failure tests, PAT_HF_TEST_FAIL=RANK:STEP makes that process raise at that
training step and PAT_HF_TEST_STALL=RANK:STEP makes it hang there; PAT_HF_TEST_INITIAL=PATH saves the
distiller's initial state (process 0)."""

import os
import sys
import time

from safetensors.torch import save_file

from pat_hf.cli import train as pat_train
from pat_hf.training.trainer import DistillationTrainer

train = DistillationTrainer.train
compute_loss = DistillationTrainer.compute_loss


def _at(variable: str, trainer: DistillationTrainer) -> bool:
    rank, step = (int(part) for part in os.environ.get(variable, "-1:-1").split(":"))
    return trainer.args.process_index == rank and trainer.state.global_step + 1 == step


def _state(module) -> dict:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def train_and_keep(self, *args, **kwargs):
    rank, world = self.args.process_index, self.args.world_size
    if os.environ.get("PAT_HF_TEST_INITIAL") and rank == 0:
        save_file(_state(self.distiller), os.environ["PAT_HF_TEST_INITIAL"])
    result = train(self, *args, **kwargs)
    save_file(_state(self.distiller.student), os.path.join(self.args.output_dir,
                                                           f"student_rank{rank}_of_{world}.safetensors"))
    return result


def compute_loss_or_fail(self, model, inputs, *args, **kwargs):
    if model.training and _at("PAT_HF_TEST_FAIL", self):
        raise RuntimeError(f"injected failure on rank {self.args.process_index} at step {self.state.global_step + 1}")
    if model.training and _at("PAT_HF_TEST_STALL", self):
        time.sleep(3600)
    return compute_loss(self, model, inputs, *args, **kwargs)


DistillationTrainer.train = train_and_keep
DistillationTrainer.compute_loss = compute_loss_or_fail
pat_train.cli(sys.argv[1:])
