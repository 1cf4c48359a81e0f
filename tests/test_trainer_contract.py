"""The transformers `Trainer` internals that pat_hf/training/trainer.py overrides or calls, pinned against the
installed transformers: an upgrade that renames, removes or re-signs one fails here, naming the method, instead
of somewhere deep in a training run."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer

from pat_hf.training.trainer import DistillationTrainer

# Each method's parameter names as transformers 5.25 declares them (the first, `self`, included).
PINNED_METHODS = {
    # private methods overridden
    "_get_train_sampler": ["self", "train_dataset"],
    "_get_dataloader": ["self", "dataset", "description", "batch_size", "sampler_fn", "is_training",
                        "dataloader_key"],
    "_run_epoch": ["self", "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch",
                   "trial", "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
                   "steps_trained_in_current_epoch"],
    "_determine_best_metric": ["self", "metrics", "trial"],
    "_save": ["self", "output_dir", "state_dict"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_get_output_dir": ["self", "trial"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_load_rng_state": ["self", "checkpoint"],
    # undocumented public methods overridden
    "set_initial_training_values": ["self", "args", "dataloader"],
    "get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
    "evaluation_loop": ["self", "dataloader", "description", "prediction_loss_only", "ignore_keys",
                        "metric_key_prefix"],
    # documented public methods overridden
    "create_optimizer": ["self", "model"],
    "create_scheduler": ["self", "num_training_steps", "optimizer"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    "log": ["self", "logs", "start_time"],
    "train": ["self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"],
    "evaluate": ["self", "eval_dataset", "ignore_keys", "metric_key_prefix"],
}


@pytest.mark.parametrize("name", sorted(PINNED_METHODS))
def test_trainer_method_keeps_its_signature(name):
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone: pat_hf/training/trainer.py overrides or calls it"
    parameters = list(inspect.signature(method).parameters)
    assert parameters == PINNED_METHODS[name], (
        f"transformers.Trainer.{name} now takes {parameters}, pat_hf/training/trainer.py was written for "
        f"{PINNED_METHODS[name]}: review its override")


def test_every_override_is_pinned():
    overridden = {name for name, value in vars(DistillationTrainer).items()
                  if callable(value) and hasattr(Trainer, name) and not name.startswith("__")}
    unpinned = sorted(overridden - set(PINNED_METHODS))
    assert not unpinned, f"DistillationTrainer overrides {unpinned} without pinning them in this test"


def test_trainer_attributes_the_trainer_relies_on():
    # create_scheduler sets the flag the Trainer's own create_scheduler sets (the Trainer reads it in train()).
    assert "_created_lr_scheduler" in inspect.getsource(Trainer.create_scheduler), (
        "transformers.Trainer.create_scheduler no longer sets _created_lr_scheduler: review "
        "DistillationTrainer.create_scheduler")
    assert hasattr(Trainer, "loss_is_scaled_for_ga"), (
        "transformers.Trainer.loss_is_scaled_for_ga is gone: DistillationTrainer's per-batch-mean loss relies on it")
