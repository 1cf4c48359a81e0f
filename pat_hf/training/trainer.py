"""`DistillationTrainer`: the HF Trainer running a distiller with the reference's recipe.

It adds what the reference's train.py does and the Trainer does not: timm's optimizer and learning-rate
schedule (stepped per epoch), the loss and its components in the logs and `summary.csv` (pat_hf/loss_meters.py),
a stop at the first non-finite loss (pat_hf/nonfinite.py), and, from its mixins, evaluation of the EMA students
next to the raw one (pat_hf/ema_evaluation.py), checkpoints that carry the distiller's per-process state and
appear under their name only once complete (pat_hf/staged_checkpoints.py), and exact mid-epoch resumes
(pat_hf/exact_resume.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations import TensorBoardCallback

from pat_hf.config.arguments import RecipeArguments
from pat_hf.data.decoding import SKIPPED_IMAGES
from pat_hf.data.samplers import EpochRandomSampler, EpochSampler, InterleavedRepeatAugSampler
from pat_hf.data.stream_loader import streamed_training_loader
from pat_hf.data.streaming import StreamedTrainingSet
from pat_hf.distillers import Distiller
from pat_hf.training import checkpoints
from pat_hf.training.attributes import temporarily
from pat_hf.training.callbacks import CheckpointStateCallback
from pat_hf.training.ema_evaluation import EmaEvaluationTrainer
from pat_hf.training.memory_format import MemoryFormat
from pat_hf.training.meters import TrainingMeters, write_summary_row
from pat_hf.training.nonfinite import NonFiniteLossGuard, NonFiniteStepSkipper, check_finite_state
from pat_hf.training.resume import ExactResumeTrainer
from pat_hf.training.schedule import TimmLRSchedule, create_timm_optimizer, create_timm_scheduler, training_epochs
from pat_hf.training.staged_checkpoints import StagedCheckpointTrainer


class DistillationTrainer(EmaEvaluationTrainer, StagedCheckpointTrainer, ExactResumeTrainer):
    """Trains `model`, a `Distiller`: its forward is the whole distillation step, so DDP and autocast cover
    the student, the teacher and the distiller's modules alike. The loss it returns is a per-batch mean."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, recipe: RecipeArguments | None = None, train_data_collator: Callable | None = None,
                 run_identity: dict[str, Any] | None = None, aug_repeats: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe or RecipeArguments()
        self.memory_format = MemoryFormat(self.recipe.channels_last)
        # Training batches may be collated differently (mixup); evaluation always uses data_collator.
        self.train_data_collator = train_data_collator or self.data_collator
        self.run_identity = dict(run_identity or {})
        self.aug_repeats = aug_repeats
        self.meters = TrainingMeters(self.accelerator)
        self.nonfinite = NonFiniteLossGuard()
        self._step_skipper: NonFiniteStepSkipper | None = None
        self._train_lr: float | None = None
        self._updates_per_epoch = 1
        self._train_sampler: EpochSampler | StreamedTrainingSet | None = None
        for callback in self.callback_handler.callbacks:
            # Without a directory TensorBoard writes to ./runs; the reference logs under its output folder.
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, "runs")

    @property
    def distiller(self) -> Distiller:
        return self.accelerator.unwrap_model(self.model)

    def _checkpoint_callbacks(self) -> list[CheckpointStateCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointStateCallback)]

    # ---- optimizer, schedule, sampler ----

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """timm's optimizer over the student and the distiller's modules (the teacher is frozen, so it never
        enters)."""
        if self.optimizer is None:
            self.optimizer = create_timm_optimizer(self.distiller, self.recipe, self.args.learning_rate,
                                                   self.args.weight_decay)
            if self.recipe.skip_nonfinite_steps:
                self._step_skipper = NonFiniteStepSkipper(self.optimizer, self.recipe.skip_nonfinite_steps,
                                                          self.args.learning_rate)
        return self.optimizer

    def set_initial_training_values(self, args, dataloader):
        # The reference trains for timm's schedule length: --epochs plus --cooldown-epochs (docs/REFERENCE.md,
        # Recipe).
        with temporarily(args, "num_train_epochs", training_epochs(self.recipe, args.num_train_epochs)):
            values = super().set_initial_training_values(args, dataloader)
        self._updates_per_epoch = values[1]
        return values

    def create_scheduler(self, num_training_steps: int,
                         optimizer: torch.optim.Optimizer | None = None) -> TimmLRSchedule:
        """timm's schedule over --epochs, applied per epoch (or per update with --sched-on-updates)."""
        if self.lr_scheduler is None:
            scheduler, _ = create_timm_scheduler(optimizer or self.optimizer, self.recipe, self.args.num_train_epochs,
                                                 self._updates_per_epoch)
            self.lr_scheduler = TimmLRSchedule(scheduler, self._updates_per_epoch, lambda: self.state.global_step)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.aug_repeats:
            sampler = InterleavedRepeatAugSampler(dataset, num_replicas=self.args.world_size,
                                                  batch_size=self.args.per_device_train_batch_size,
                                                  num_repeats=self.aug_repeats)
        else:
            sampler = EpochRandomSampler(len(dataset), seed=self.args.data_seed or self.args.seed)
        self._use_training_order(sampler)
        return sampler

    def _use_training_order(self, order: EpochSampler | StreamedTrainingSet) -> None:
        """The sampler (or stream) whose epoch the trainer sets and whose RNG a checkpoint keeps."""
        self.track_fetch_rng(order)
        self._train_sampler = order

    def _get_dataloader(self, *args, is_training: bool = False, **kwargs):
        # drop_last is for training only (mixup pairs, PAT's feedback); evaluation must see every example.
        collate = self.fetch_rng_collate(self.train_data_collator) if is_training else self.data_collator
        if is_training and isinstance(kwargs.get("dataset"), StreamedTrainingSet):
            self._use_training_order(kwargs["dataset"])
            return streamed_training_loader(kwargs["dataset"], kwargs["batch_size"], collate, self.args)
        with temporarily(self.args, "dataloader_drop_last", self.args.dataloader_drop_last and is_training), \
                temporarily(self, "data_collator", collate):
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)

    # ---- training step, logging, epochs ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "pixel_values": self.memory_format.images(inputs["pixel_values"])}
        skipped_images = inputs.pop(SKIPPED_IMAGES, None)
        outputs = model(**inputs)
        if model.training:
            # The rate this step's optimizer update uses (summary.csv reports it per epoch).
            self._train_lr = self.optimizer.param_groups[0]["lr"]
            step = self.state.global_step + 1
            if self._step_skipper is None or not self._step_skipper.skips(step, outputs, self.accelerator):
                self.meters.add(outputs, inputs["pixel_values"].shape[0], skipped_images)
                self.nonfinite.observe(step, outputs)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _nonfinite_hint(self) -> str:
        return (f"Lower --lr (now {self.args.learning_rate:g}), or let up to N such steps pass without an update "
                f"with --skip-nonfinite-steps N (fp16 overflow)")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self.nonfinite.raise_if_bad(self.accelerator, self._nonfinite_hint())
            logs.update(self.meters.window_logs(self.args.device))
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        # A bad step after the last logging step and checkpoint: stop before the student is exported.
        self.nonfinite.raise_if_bad(self.accelerator, self._nonfinite_hint())
        return result

    def _run_epoch(self, model, epoch, *args, **kwargs):
        self.meters.reset_epoch()
        self.epoch_eval = {}
        if self._train_sampler is not None:
            # Under DDP, the loader accelerate rebuilds to skip the batches of an interrupted epoch does not pass
            # set_epoch on to the sampler, which would then replay epoch 0's order.
            self._train_sampler.set_epoch(epoch)
        resumed_batches = kwargs["steps_trained_in_current_epoch"] if (
            epoch == kwargs["epochs_trained"] and kwargs["resume_from_checkpoint"] is not None
            and not self.args.ignore_data_skip) else 0
        if isinstance(self._train_sampler, StreamedTrainingSet):
            # The Trainer drops the batches this epoch trained on before the interruption: they need not be decoded.
            self._train_sampler.resume_batches = resumed_batches
        super()._run_epoch(model, epoch, *args, **kwargs)
        if isinstance(self._train_sampler, StreamedTrainingSet):
            self._train_sampler.resume_batches = 0
        self.nonfinite.raise_if_bad(self.accelerator, self._nonfinite_hint())
        train_means = self.meters.epoch_summary(self.args.device)
        if self.args.should_save:
            write_summary_row(self.args.output_dir, float(self.state.epoch or 0), self._train_lr, train_means,
                              self.epoch_eval)

    # ---- evaluation ----

    def _determine_best_metric(self, metrics, trial) -> bool:
        is_new_best = super()._determine_best_metric(metrics, trial)
        if self.state.best_metric is not None:
            self.log({"best_metric": self.state.best_metric})
        return is_new_best

    # ---- checkpoints ----

    def check_before_checkpoint(self, step: int) -> None:
        self.nonfinite.raise_if_bad(self.accelerator, self._nonfinite_hint())
        check_finite_state(self.distiller.state_dict(), f"the model at step {step}")

    def write_checkpoint_extras(self, folder: str) -> None:
        """The distiller's per-process state, the data-order RNG and the callbacks' state."""
        checkpoints.save_process_state(folder, self.args.process_index, self.distiller.process_state_dict())
        self.save_fetch_rng(folder)
        for callback in self._checkpoint_callbacks():
            callback.save_to_checkpoint(folder, self.args.should_save)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # The Trainer pickles its arguments into training_args.bin: without the Hub token.
        with temporarily(self.args, "hub_token", None):
            super()._save(output_dir, self.memory_format.saveable_state(self.distiller, state_dict))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = checkpoints.load_process_state(resume_from_checkpoint, self.args.process_index)
        self.distiller.load_process_state_dict(state)
        for callback in self._checkpoint_callbacks():
            callback.load_from_checkpoint(resume_from_checkpoint)
        self.note_resume(resume_from_checkpoint)
