"""`DistillationTrainer`: the HF Trainer running a distiller with the reference's recipe.

It adds what the reference's train.py does and the Trainer does not: timm's optimizer and learning-rate
schedule (stepped per epoch), evaluation of the EMA students next to the raw one with the best metric taken
over both, the loss and its components in the logs and `summary.csv` (pat_hf/loss_meters.py), a stop at the
first non-finite loss (pat_hf/nonfinite.py), checkpoints that carry the distiller's per-process state and the
callbacks' state and appear under their name only once all of it is written and flushed to the disk
(pat_hf/checkpoints.py), and exact mid-epoch resumes (pat_hf/exact_resume.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers.integrations import TensorBoardCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, seed_worker

from pat_hf import checkpoints
from pat_hf.arguments import RecipeArguments
from pat_hf.atomic import remove_stale_partials
from pat_hf.callbacks import CheckpointStateCallback, ModelEmaCallback
from pat_hf.data import SKIPPED_IMAGES, StreamedTrainingSet
from pat_hf.distillers import Distiller
from pat_hf.exact_resume import ExactResumeTrainer
from pat_hf.loss_meters import TrainingMeters, write_summary_row
from pat_hf.memory_format import MemoryFormat
from pat_hf.nonfinite import (
    NonFiniteError,
    NonFiniteLossGuard,
    SkippableOptimizerStep,
    check_finite_state,
    describe_losses,
    loss_components,
)
from pat_hf.samplers import EpochRandomSampler, EpochSampler, InterleavedRepeatAugSampler
from pat_hf.schedule import TimmLRSchedule, create_timm_optimizer, create_timm_scheduler, training_epochs

logger = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, lost permissions); the earlier ones are intact."""


@contextlib.contextmanager
def _instead_of_method(obj, name: str, function: Callable):
    """`obj.name` is `function` within the block (an instance attribute over the class's method)."""
    setattr(obj, name, function)
    try:
        yield
    finally:
        delattr(obj, name)


@contextlib.contextmanager
def _temporarily(obj, name: str, value):
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


class DistillationTrainer(ExactResumeTrainer):
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
        self._skippable_step: SkippableOptimizerStep | None = None
        self._skipped_steps = 0
        self._epoch_eval: dict[str, float] = {}
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

    @property
    def ema_callback(self) -> ModelEmaCallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, ModelEmaCallback)), None)

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
                self._skippable_step = SkippableOptimizerStep(self.optimizer)
        return self.optimizer

    def set_initial_training_values(self, args, dataloader):
        # The reference trains for timm's schedule length: --epochs plus --cooldown-epochs (docs/REFERENCE.md,
        # Recipe).
        with _temporarily(args, "num_train_epochs", training_epochs(self.recipe, args.num_train_epochs)):
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
        self.track_fetch_rng(sampler)
        self._train_sampler = sampler
        return sampler

    def _get_dataloader(self, *args, is_training: bool = False, **kwargs):
        # drop_last is for training only (mixup pairs, PAT's feedback); evaluation must see every example.
        collate = self.fetch_rng_collate(self.train_data_collator) if is_training else self.data_collator
        if is_training and isinstance(kwargs.get("dataset"), StreamedTrainingSet):
            return self._streamed_training_loader(kwargs["dataset"], kwargs["batch_size"], collate)
        with _temporarily(self.args, "dataloader_drop_last", self.args.dataloader_drop_last and is_training), \
                _temporarily(self, "data_collator", collate):
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)

    def _streamed_training_loader(self, stream: StreamedTrainingSet, batch_size: int, collate: Callable):
        """The loader of a streamed training split, which already splits it between processes and workers:
        accelerate places the batches on the device but must not shard the stream again (it would keep a
        1/processes of each process's share) nor read it on one process and dispatch it."""
        self.track_fetch_rng(stream)
        self._train_sampler = stream
        args = self.args
        workers = args.dataloader_num_workers
        loader = DataLoader(
            stream, batch_size=batch_size, collate_fn=collate, drop_last=True, num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=bool(args.dataloader_persistent_workers and workers > 0),
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index))
        return prepare_data_loader(loader, args.device, num_processes=1, process_index=0, put_on_device=True,
                                   dispatch_batches=False, rng_types=None, non_blocking=args.dataloader_pin_memory)

    # ---- training step, logging, epochs ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "pixel_values": self.memory_format.images(inputs["pixel_values"])}
        skipped_images = inputs.pop(SKIPPED_IMAGES, None)
        outputs = model(**inputs)
        if model.training:
            # The rate this step's optimizer update uses (summary.csv reports it per epoch).
            self._train_lr = self.optimizer.param_groups[0]["lr"]
            step = self.state.global_step + 1
            if not self._skipped_for_nonfinite_loss(step, outputs):
                self.meters.add(outputs, inputs["pixel_values"].shape[0], skipped_images)
                self.nonfinite.observe(step, outputs)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _nonfinite_hint(self) -> str:
        return (f"Lower --lr (now {self.args.learning_rate:g}), or let up to N such steps pass without an update "
                f"with --skip-nonfinite-steps N (fp16 overflow)")

    def _skipped_for_nonfinite_loss(self, step: int, outputs: dict[str, torch.Tensor]) -> bool:
        """--skip-nonfinite-steps N: whether this step's loss is not finite on some process, in which case its
        optimizer update is skipped; the (N+1)-th such step stops the run. Reads the loss every step."""
        if self._skippable_step is None:
            return False
        components = loss_components(outputs)
        values = torch.stack([v.detach().float().reshape(()) for v in components.values()])
        bad = self.accelerator.reduce((~torch.isfinite(values)).any().float(), reduction="sum")
        if not bad.item():
            return False
        self._skipped_steps += 1
        limit = self.recipe.skip_nonfinite_steps
        losses = describe_losses(dict(zip(components, values.tolist())))
        if self._skipped_steps > limit:
            raise NonFiniteError(f"the training loss is not finite at step {step}: {losses}; that is more than "
                                 f"--skip-nonfinite-steps {limit} such steps, so the run stopped and saved nothing "
                                 f"from that step on. Lower --lr (now {self.args.learning_rate:g})")
        self._skippable_step.skip_next = True
        logger.warning("step %d: %s; its update is skipped (%d of --skip-nonfinite-steps %d)", step, losses,
                       self._skipped_steps, limit)
        return True

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
        self._epoch_eval = {}
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
                              self._epoch_eval)

    # ---- evaluation ----

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Evaluate the raw student, then each EMA student in its place (metrics `<prefix>_ema_top1`, ...),
        and report the higher top-1 of them as `<prefix>_max_top1`, the reference's selection metric."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        top1 = [output.metrics.get(f"{metric_key_prefix}_top1")]
        for name, module in self.ema_callback.named_models() if self.ema_callback else []:
            prefix = f"{metric_key_prefix}_{name}"
            with _temporarily(self.distiller, "student", module):
                ema_output = super().evaluation_loop(dataloader, f"{description} ({name})", prediction_loss_only,
                                                     ignore_keys, prefix)
            output.metrics.update(ema_output.metrics)
            top1.append(ema_output.metrics.get(f"{prefix}_top1"))
        top1 = [value for value in top1 if value is not None]
        if top1:
            output.metrics[f"{metric_key_prefix}_max_top1"] = max(top1)
        if metric_key_prefix == "eval":
            self._epoch_eval = dict(output.metrics)
        return output

    def _determine_best_metric(self, metrics, trial) -> bool:
        is_new_best = super()._determine_best_metric(metrics, trial)
        if self.state.best_metric is not None:
            self.log({"best_metric": self.state.best_metric})
        return is_new_best

    # ---- checkpoints ----

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint plus the distiller's per-process state and the callbacks' state, written
        under `checkpoint-N.partial/` and published as `checkpoint-N` (complete, flushed to the disk) once every
        process has written everything; only then are older checkpoints rotated out. Refused for a model that
        is not finite; a failed write (full disk) removes what it wrote and leaves the earlier checkpoints."""
        step = self.state.global_step
        self.nonfinite.raise_if_bad(self.accelerator, self._nonfinite_hint())
        check_finite_state(self.distiller.state_dict(), f"the model at step {step}")
        run_dir = self._get_output_dir(trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        staging = checkpoints.staging_root(run_dir, step)
        folder = str(staging / os.path.basename(final))
        if self.args.should_save:
            remove_stale_partials(run_dir)
            if os.path.isdir(final):
                # Left by a run that was interrupted after this step and resumed from an earlier checkpoint.
                shutil.rmtree(final)
        self.accelerator.wait_for_everyone()
        try:
            with _temporarily(self.args, "save_total_limit", None), \
                    _instead_of_method(self, "_get_output_dir", lambda trial=None: str(staging)):
                super()._save_checkpoint(model, trial)
            checkpoints.save_process_state(folder, self.args.process_index, self.distiller.process_state_dict())
            self.save_fetch_rng(folder)
            for callback in self._checkpoint_callbacks():
                callback.save_to_checkpoint(folder, self.args.should_save)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._record_best_checkpoint(run_dir, folder)
                checkpoints.publish_checkpoint(folder, {**self.run_identity, "global_step": step})
        except OSError as error:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointWriteError(
                f"could not write {final}: {error.strerror or error}; nothing of it was kept and the earlier "
                f"checkpoints are intact: free space (or restore write access) and continue with --resume") from error
        if self.args.should_save:
            checkpoints.rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _record_best_checkpoint(self, run_dir: str, folder: str) -> None:
        """The Trainer looked for the best checkpoint beside the staged one; point it at the published name."""
        best_step = self.state.best_global_step
        if not best_step:
            return
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best
            self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # The Trainer pickles its arguments into training_args.bin: without the Hub token.
        with _temporarily(self.args, "hub_token", None):
            super()._save(output_dir, self.memory_format.saveable_state(self.distiller, state_dict))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = checkpoints.load_process_state(resume_from_checkpoint, self.args.process_index)
        self.distiller.load_process_state_dict(state)
        for callback in self._checkpoint_callbacks():
            callback.load_from_checkpoint(resume_from_checkpoint)
        self.note_resume(resume_from_checkpoint)
