"""`DistillationTrainer`: the HF Trainer running a distiller with the reference's recipe.

Besides the loss components in the logs it adds what the reference's train.py does and the Trainer does not:
timm's optimizer and learning-rate schedule (stepped per epoch), evaluation of the EMA students next to the raw
one with the best metric taken over both, `summary.csv`, and checkpoints that carry the distiller's
per-process state and the callbacks' state and are marked complete only once all of it is written.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput

from pat_hf.arguments import RecipeArguments
from pat_hf.callbacks import CheckpointStateCallback, ModelEmaCallback
from pat_hf.checkpoints import mark_complete, restore_rng, rng_snapshot, rotate_checkpoints
from pat_hf.distillers import Distiller
from pat_hf.samplers import EpochRandomSampler, EpochSampler, InterleavedRepeatAugSampler
from pat_hf.schedule import TimmLRSchedule, create_timm_scheduler, training_epochs

PROCESS_STATE_FILE = "distiller_state_rank{rank}.safetensors"
FETCH_RNG_FILE = "rng_state_fetch_rank{rank}.pth"
SUMMARY_FILE = "summary.csv"
# Evaluation metrics that go into summary.csv: loss, top-1 and top-5 of the raw and of every EMA student.
_SUMMARY_EVAL_KEY = re.compile(r"^eval_(ema\d*_)?(loss|top1|top5)$|^eval_max_top1$")


@contextlib.contextmanager
def _temporarily(obj, name: str, value):
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


class DistillationTrainer(Trainer):
    """Trains `model`, a `Distiller`: its forward is the whole distillation step, so DDP and autocast cover
    the student, the teacher and the distiller's modules alike. The loss it returns is a per-batch mean."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, recipe: RecipeArguments | None = None, train_data_collator: Callable | None = None,
                 run_identity: dict[str, Any] | None = None, aug_repeats: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe or RecipeArguments()
        # Training batches may be collated differently (mixup); evaluation always uses data_collator.
        self.train_data_collator = train_data_collator or self.data_collator
        self.run_identity = dict(run_identity or {})
        self.aug_repeats = aug_repeats
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_steps = 0
        self._images_seen = 0
        self._last_log_time = time.perf_counter()
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_steps = 0
        self._epoch_eval: dict[str, float] = {}
        self._train_lr: float | None = None
        self._updates_per_epoch = 1
        self._train_sampler: EpochSampler | None = None
        # RNG bookkeeping for exact mid-epoch resumes (see "exact mid-epoch resume" below).
        self._resumed_from: str | None = None
        self._rng_before_next_fetch: dict[str, Any] | None = None
        self._rng_before_latest_fetch: dict[str, Any] | None = None
        self._restore_before_first_fetch: dict[str, Any] | None = None
        self._restore_after_first_fetch: str | None = None
        self._skip_next_rng_load = False
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

    # ---- optimizer and schedule ----

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """timm's optimizer over the student and the distiller's modules, with the reference's weight-decay rule:
        none for parameters with ndim <= 1 or named `.bias` (the teacher is frozen, so it never enters)."""
        if self.optimizer is None:
            recipe = self.recipe
            extra = {"eps": recipe.opt_eps} if recipe.opt_eps is not None else {}
            if recipe.opt_betas:
                extra["betas"] = tuple(recipe.opt_betas)
            self.optimizer = create_optimizer_v2(self.distiller, opt=recipe.opt, lr=self.args.learning_rate,
                                                 weight_decay=self.args.weight_decay, momentum=recipe.momentum,
                                                 **extra)
        return self.optimizer

    def set_initial_training_values(self, args, dataloader):
        # The reference trains for timm's schedule length: --epochs plus --cooldown-epochs (SPEC §1.5).
        epochs = training_epochs(self.recipe, args.num_train_epochs)
        with _temporarily(args, "num_train_epochs", epochs):
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
        if self._tracks_fetch_rng:
            sampler.on_pass_start = self._on_sampler_pass_start
        self._train_sampler = sampler
        return sampler

    # ---- training step and logging ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            logits = model(pixel_values=self._memory_format(inputs["pixel_values"]))["logits"]
            loss = F.cross_entropy(logits.float(), inputs["labels"])
            return (loss, {"logits": logits}) if return_outputs else loss
        inputs = dict(inputs)
        inputs["pixel_values"] = self._memory_format(inputs["pixel_values"])
        # The rate this step's optimizer update will use (summary.csv reports it per epoch).
        self._train_lr = self.optimizer.param_groups[0]["lr"]
        outputs = model(**inputs)
        self._accumulate_components(outputs, inputs["pixel_values"].shape[0])
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.recipe.channels_last else images

    def _accumulate_components(self, outputs: dict[str, torch.Tensor], batch_size: int) -> None:
        for key, value in outputs.items():
            if not key.startswith("loss"):
                continue
            value = value.detach().float()
            if key != "loss":
                total = self._component_sums.get(key)
                self._component_sums[key] = value if total is None else total + value
            epoch_total = self._epoch_sums.get(key)
            self._epoch_sums[key] = value if epoch_total is None else epoch_total + value
        self._component_steps += 1
        self._epoch_steps += 1
        self._images_seen += batch_size

    def _mean_over_processes(self, sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        keys = sorted(sums)
        means = torch.stack([sums[k] for k in keys]) / steps
        means = self.accelerator.reduce(means, reduction="mean")
        return {k: float(v) for k, v in zip(keys, means)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_steps:
            logs.update({k: round(v, 6) for k, v in
                         self._mean_over_processes(self._component_sums, self._component_steps).items()})
            images = self.accelerator.reduce(torch.tensor(float(self._images_seen), device=self.args.device), "sum")
            now = time.perf_counter()
            logs["train_images_per_second"] = round(float(images) / max(now - self._last_log_time, 1e-9), 2)
            self._component_sums, self._component_steps, self._images_seen = {}, 0, 0
            self._last_log_time = now
        super().log(logs, start_time)

    def _get_dataloader(self, *args, is_training: bool = False, **kwargs):
        # drop_last is for training only (mixup pairs, PAT's feedback); evaluation must see every example.
        if is_training:
            collate = self._training_collate if self._tracks_fetch_rng else self.train_data_collator
        else:
            collate = self.data_collator
        with _temporarily(self.args, "dataloader_drop_last", self.args.dataloader_drop_last and is_training), \
                _temporarily(self, "data_collator", collate):
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)

    def _run_epoch(self, model, epoch, *args, **kwargs):
        self._epoch_sums, self._epoch_steps, self._epoch_eval = {}, 0, {}
        if self._train_sampler is not None:
            # Under DDP, the loader accelerate rebuilds to skip the batches of an interrupted epoch does not pass
            # set_epoch on to the sampler, which would then replay epoch 0's order.
            self._train_sampler.set_epoch(epoch)
        super()._run_epoch(model, epoch, *args, **kwargs)
        self._write_summary_row()

    def _write_summary_row(self) -> None:
        """One row of OUTPUT_DIR/summary.csv per epoch: epoch-mean training losses, the rate, and the epoch's
        evaluation of the raw and EMA students. Rows of epochs that a resumed run repeats are replaced."""
        train = self._mean_over_processes(self._epoch_sums, self._epoch_steps) if self._epoch_steps else {}
        if not self.args.should_save:
            return
        epoch = round(float(self.state.epoch or 0), 4)
        row = {"epoch": epoch, "lr": self._train_lr,
               **{("train_loss" if k == "loss" else k): v for k, v in train.items()},
               **{k: v for k, v in self._epoch_eval.items() if _SUMMARY_EVAL_KEY.match(k)}}
        path = os.path.join(self.args.output_dir, SUMMARY_FILE)
        header, rows = list(row), []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or []) + [k for k in row if k not in (reader.fieldnames or [])]
                rows = [r for r in reader if float(r["epoch"]) < epoch]
        partial = path + ".partial"
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows([*rows, row])
        os.replace(partial, path)

    # ---- evaluation ----

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        # Evaluation draws from the global generators (the loader's base seed); leaving them as they were keeps
        # training independent of when it evaluates, so a resumed run, which does not repeat an evaluation that
        # followed its checkpoint, still draws what the uninterrupted run drew.
        state = rng_snapshot()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            restore_rng(state)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Evaluate the raw student, then each EMA student in its place (metrics `<prefix>_ema_top1`, ...),
        and report the higher top-1 of them as `<prefix>_max_top1`, the reference's selection metric."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        top1 = [output.metrics.get(f"{metric_key_prefix}_top1")]
        if self.ema_callback is not None:
            for name, module in self.ema_callback.named_models():
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
        """The Trainer's checkpoint plus the distiller's per-process state and the callbacks' state, marked
        complete once every process has written everything; only then are older checkpoints rotated out."""
        run_dir = self._get_output_dir(trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            # Left by a run that was interrupted after this step and resumed from an earlier checkpoint.
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        with _temporarily(self.args, "save_total_limit", None):
            super()._save_checkpoint(model, trial)
        state = self.distiller.process_state_dict()
        if state:
            path = os.path.join(folder, PROCESS_STATE_FILE.format(rank=self.args.process_index))
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)
        if self._rng_before_latest_fetch is not None:
            torch.save(self._rng_before_latest_fetch,
                       os.path.join(folder, FETCH_RNG_FILE.format(rank=self.args.process_index)))
        for callback in self._checkpoint_callbacks():
            callback.save_to_checkpoint(folder, self.args.should_save)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(folder, {**self.run_identity, "global_step": self.state.global_step})
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if self.recipe.channels_last:
            # safetensors stores contiguous tensors only; channels-last weights are not.
            state = state_dict if state_dict is not None else self.distiller.state_dict()
            state_dict = {k: v.contiguous() for k, v in state.items()}
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROCESS_STATE_FILE.format(rank=self.args.process_index))
        self.distiller.load_process_state_dict(load_file(path) if os.path.isfile(path) else {})
        for callback in self._checkpoint_callbacks():
            callback.load_from_checkpoint(resume_from_checkpoint)
        self._resumed_from = resume_from_checkpoint

    # ---- exact mid-epoch resume ----
    # accelerate's loader fetches, and so augments, one batch ahead: when a checkpoint is saved after update u,
    # batch u+1 has already been drawn with the RNG, and transformers' saved RNG state is the one batch u+2 is
    # drawn in. transformers restores it only after the resumed run has drawn batch u+1 (in whatever state the
    # generators were), so that batch's augmentation differs. With an in-process loader (--workers 0) we record
    # the state each training batch is drawn in, save the one of the batch drawn ahead with the checkpoint, and on
    # resume restore it before batch u+1 is drawn and transformers' state right after. Resuming at an epoch
    # boundary needs none of this: transformers restores its state before the epoch's first batch.

    @property
    def _tracks_fetch_rng(self) -> bool:
        # Worker processes draw with their own generators, which no checkpoint captures.
        return self.args.dataloader_num_workers == 0

    def _on_sampler_pass_start(self) -> None:
        if self._restore_before_first_fetch is not None:
            restore_rng(self._restore_before_first_fetch)
            self._restore_before_first_fetch = None
        self._rng_before_next_fetch = rng_snapshot()

    def _training_collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.train_data_collator(examples)
        self._rng_before_latest_fetch = self._rng_before_next_fetch
        if self._restore_after_first_fetch is not None:
            super()._load_rng_state(self._restore_after_first_fetch)
            self._restore_after_first_fetch = None
        self._rng_before_next_fetch = rng_snapshot()
        return batch

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self._resumed_from is not None:
            # Still set: transformers did not restore the RNG at an epoch start, so this resume is mid-epoch.
            path = os.path.join(self._resumed_from, FETCH_RNG_FILE.format(rank=self.args.process_index))
            if self._tracks_fetch_rng and os.path.isfile(path):
                self._restore_before_first_fetch = torch.load(path, weights_only=True)
                self._restore_after_first_fetch = self._resumed_from
                self._skip_next_rng_load = True
            self._resumed_from = None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _load_rng_state(self, checkpoint) -> None:
        self._resumed_from = None
        if self._skip_next_rng_load:
            self._skip_next_rng_load = False
            return
        super()._load_rng_state(checkpoint)
