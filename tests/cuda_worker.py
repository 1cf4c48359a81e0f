"""Run by `accelerate launch` in test_cuda.py: pat_hf.cli.train.main with a callback that writes the device and the
autocast dtype of the student's forward to $CUDA_PROBE, and kills the process (SIGKILL) right after the
checkpoint of step $KILL_AFTER_SAVE_STEP is complete."""

import json
import os
import signal
import sys

import torch
from transformers import TrainerCallback

from pat_hf.cli import train

# The same kernels in the interrupted and the uninterrupted run.
torch.backends.cudnn.benchmark = False
torch.backends.cudnn.deterministic = True
torch.use_deterministic_algorithms(True, warn_only=True)


class Probe(TrainerCallback):
    def __init__(self, probe_file: str, kill_after_step: int):
        self.probe_file, self.kill_after_step, self.seen = probe_file, kill_after_step, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, inputs, output):
            enabled = torch.is_autocast_enabled("cuda")
            self.seen["autocast"] = str(torch.get_autocast_dtype("cuda")) if enabled else None

        model.student.register_forward_hook(record)
        self.seen["device"] = next(model.parameters()).device.type

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, args, state, control, **kwargs):
        with open(self.probe_file, "w") as f:
            json.dump(self.seen, f)


train.main(sys.argv[1:], callbacks=[Probe(os.environ["CUDA_PROBE"], int(os.environ.get("KILL_AFTER_SAVE_STEP", "0")))])
