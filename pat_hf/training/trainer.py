"""`DistillationTrainer`: the HF Trainer running a distiller with the reference's recipe, and the one place where
pat-hf changes how the Trainer behaves.

transformers: setup.cfg allows `transformers>=5.0,<6`; the methods below are pinned, with their parameter
names, against transformers 5.25 by tests/test_trainer_contract.py, which fails naming the method an upgrade
changed or removed.

Private Trainer methods overridden here:
    _get_train_sampler       the epoch-seeded sampler (or --aug-repeats' sampler) that a checkpoint can replay
    _get_dataloader          the training collate (mixup, RNG recording), the streamed loader, drop_last in training
    _run_epoch               the sampler's epoch, the epoch's meters and summary.csv row, a stream's resume skip
    _determine_best_metric   logs `best_metric`
    _save                    no Hub token in training_args.bin; contiguous tensors with --channels-last
    _save_checkpoint         staged checkpoints that appear only once complete
    _get_output_dir          the staging folder while the Trainer writes a checkpoint
    _load_from_checkpoint    the distiller's per-process state and the callbacks' state
    _load_rng_state          skipped where an exact mid-epoch resume restores the RNG itself
Undocumented public ones overridden: `set_initial_training_values`, `get_batch_samples`, `evaluation_loop`.
Relied on besides: `Trainer._load_rng_state` (called by the resume helper), `_created_lr_scheduler` (set by
`create_scheduler` as the Trainer's own does), `loss_is_scaled_for_ga`, and `_run_epoch`'s keyword arguments
`epochs_trained`, `steps_trained_in_current_epoch` and `resume_from_checkpoint`.

Each override is a few lines that delegate to a helper object the trainer owns: `meters` (training/meters.py:
the loss and its components in the logs and summary.csv), `nonfinite` (training/nonfinite.py: a stop at the
first non-finite loss), `ema_evaluation` (training/ema.py: the EMA students evaluated next to the raw one),
`checkpoints` (training/checkpoints.py: staged checkpoints and their files) and `resume` (training/resume.py:
exact mid-epoch resumes). timm's optimizer and schedule come from training/schedule.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import EvalLoopOutput

from pat_hf.config.arguments import RecipeArguments
from pat_hf.data.decoding import SKIPPED_IMAGES
from pat_hf.data.samplers import EpochRandomSampler, EpochSampler, InterleavedRepeatAugSampler
from pat_hf.data.streaming import StreamedTrainingSet, streamed_training_loader
from pat_hf.distillers import Distiller
from pat_hf.training import checkpoints
from pat_hf.training.attributes import temporarily
from pat_hf.training.checkpoints import StagedCheckpoints
from pat_hf.training.ema import EmaEvaluation
from pat_hf.training.memory_format import MemoryFormat
from pat_hf.training.meters import TrainingMeters, write_summary_row
from pat_hf.training.nonfinite import NonFiniteLossGuard, NonFiniteStepSkipper, check_finite_state
from pat_hf.training.resume import ExactResume
from pat_hf.training.schedule import TimmLRSchedule, create_timm_optimizer, create_timm_scheduler, training_epochs


class DistillationTrainer(Trainer):
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
        self.aug_repeats = aug_repeats
        self.meters = TrainingMeters(self.accelerator)
        self.nonfinite = NonFiniteLossGuard()
        self.ema_evaluation = EmaEvaluation(self.callback_handler)
        self.checkpoints = StagedCheckpoints(self.args, self.accelerator, run_identity or {})
        # The Trainer's own restore, bypassing the override below, which may skip it.
        self.resume = ExactResume(self.args, lambda checkpoint: Trainer._load_rng_state(self, checkpoint))
        self._step_skipper: NonFiniteStepSkipper | None = None
        self._train_lr: float | None = None
        self._updates_per_epoch = 1
        # The sampler (or stream) whose epoch the trainer sets and whose RNG a checkpoint keeps.
        self._training_order: EpochSampler | StreamedTrainingSet | None = None
        for callback in self.callback_handler.callbacks:
            # Without a directory TensorBoard writes to ./runs; the reference logs under its output folder.
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, "runs")

    @property
    def distiller(self) -> Distiller:
        # Without torch.compile's wrapper too (--torch_compile): its state dict would prefix every key.
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # ---- optimizer, schedule, sampler, loader ----

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
        self.resume.track(order)
        self._training_order = order

    def _get_dataloader(self, *args, is_training: bool = False, **kwargs):
        # drop_last is for training only (mixup pairs, PAT's feedback); evaluation must see every example.
        collate = self.resume.recording_collate(self.train_data_collator) if is_training else self.data_collator
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

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        self.resume.before_batch_fetch()
        return super().get_batch_samples(epoch_iterator, num_batches, device)

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
        self.ema_evaluation.start_epoch()
        if self._training_order is not None:
            # Under DDP, the loader accelerate rebuilds to skip the batches of an interrupted epoch does not pass
            # set_epoch on to the sampler, which would then replay epoch 0's order.
            self._training_order.set_epoch(epoch)
        resumed_batches = kwargs["steps_trained_in_current_epoch"] if (
            epoch == kwargs["epochs_trained"] and kwargs["resume_from_checkpoint"] is not None
            and not self.args.ignore_data_skip) else 0
        if isinstance(self._training_order, StreamedTrainingSet):
            # The Trainer drops the batches this epoch trained on before the interruption: they need not be decoded.
            self._training_order.resume_batches = resumed_batches
        super()._run_epoch(model, epoch, *args, **kwargs)
        if isinstance(self._training_order, StreamedTrainingSet):
            self._training_order.resume_batches = 0
        self.nonfinite.raise_if_bad(self.accelerator, self._nonfinite_hint())
        train_means = self.meters.epoch_summary(self.args.device)
        if self.args.should_save:
            write_summary_row(self.args.output_dir, float(self.state.epoch or 0), self._train_lr, train_means,
                              self.ema_evaluation.epoch_metrics)

    # ---- evaluation ----

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        with self.resume.rng_unchanged():
            return super().evaluate(*args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        trainer_loop = super().evaluation_loop
        return self.ema_evaluation.evaluation_loop(
            lambda loop_description, prefix: trainer_loop(dataloader, loop_description, prediction_loss_only,
                                                          ignore_keys, prefix),
            self.distiller, description, metric_key_prefix)

    def _determine_best_metric(self, metrics, trial) -> bool:
        is_new_best = super()._determine_best_metric(metrics, trial)
        if self.state.best_metric is not None:
            self.log({"best_metric": self.state.best_metric})
        return is_new_best

    # ---- checkpoints ----

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        self.nonfinite.raise_if_bad(self.accelerator, self._nonfinite_hint())
        check_finite_state(self.distiller.state_dict(), f"the model at step {step}")
        self.checkpoints.save(self.state, self._get_output_dir(trial),
                              lambda folder: self._write_checkpoint(model, trial, folder))

    def _write_checkpoint(self, model, trial, folder: str) -> None:
        """This process's part of the staged checkpoint `folder`: the Trainer's checkpoint (the staged
        checkpoints rotate, not the Trainer), the distiller's per-process state, the data-order RNG and the
        callbacks' state."""
        with temporarily(self.args, "save_total_limit", None):
            super()._save_checkpoint(model, trial)
        checkpoints.save_process_state(folder, self.args.process_index, self.distiller.process_state_dict())
        self.resume.save(folder)
        checkpoints.save_callback_states(self.callback_handler.callbacks, folder, self.args.should_save)

    def _get_output_dir(self, trial) -> str:
        return self.checkpoints.staging_output_dir or super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # The Trainer pickles its arguments into training_args.bin: without the Hub token.
        with temporarily(self.args, "hub_token", None):
            super()._save(output_dir, self.memory_format.saveable_state(self.distiller, state_dict))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = checkpoints.load_process_state(resume_from_checkpoint, self.args.process_index)
        self.distiller.load_process_state_dict(state)
        checkpoints.load_callback_states(self.callback_handler.callbacks, resume_from_checkpoint)
        self.resume.resuming_from(resume_from_checkpoint)

    def _load_rng_state(self, checkpoint) -> None:
        if not self.resume.skips_trainer_rng_load():
            super()._load_rng_state(checkpoint)
