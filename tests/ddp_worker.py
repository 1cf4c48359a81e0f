"""Run by `accelerate launch` in test_ddp.py: one training process that also saves its own final student."""

import os
import sys

from safetensors.torch import save_file

from pat_hf import train as pat_train
from pat_hf.trainer import DistillationTrainer

trained = {}
train = DistillationTrainer.train


def train_and_keep(self, *args, **kwargs):
    trained["trainer"] = self
    return train(self, *args, **kwargs)


DistillationTrainer.train = train_and_keep
pat_train.main(sys.argv[1:])
trainer = trained["trainer"]
rank, world = trainer.args.process_index, trainer.args.world_size
student = {k: v.contiguous() for k, v in trainer.distiller.student.state_dict().items()}
save_file(student, os.path.join(trainer.args.output_dir, f"student_rank{rank}_of_{world}.safetensors"))
pat_train.shutdown()
