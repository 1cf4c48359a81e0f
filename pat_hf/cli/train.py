"""Distil a timm teacher into a timm student with one of pat-hf's distillers: the training entry point.

    accelerate launch -m pat_hf.cli.train --config smoke --output_dir runs/smoke      # or: pat-hf-train ...
    accelerate launch run_distill.py --model deit_tiny_patch16_224 --teacher convnext_tiny \
        --teacher-pretrained convnext_tiny_cifar100.pth --distiller pat --dataset cifar100 \
        --config cifar/vit_mlp --output_dir runs/convnext_deit_pat

`--config` takes a YAML path or the name of a config shipped with the package (`cifar/cnn`, `smoke`, ...).

Every input is checked before anything is written (with --push-to-hub, the Hub repository is created and the
token's write access checked before training); at the end OUTPUT_DIR/student holds the student alone in timm's
Hub format with its model card and training curves, and train_results.json / eval_results.json / all_results.json
the final metrics. `pat-hf-train` reports an error as one line on stderr (--debug: the traceback) and exits with
status 1; README.md, "Failure handling", says what each fault leaves behind.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
from typing import Any

import datasets
import torch
import transformers
import yaml
from datasets import IterableDataset
from transformers import TrainerCallback, set_seed

from pat_hf.cli import train_command
from pat_hf.config.arguments import RunArguments
from pat_hf.config.parser import read_command_line
from pat_hf.data.examples import attach_transform, training_set
from pat_hf.data.labels import check_labels, class_names_of, resolve_num_classes, train_labels_of
from pat_hf.data.samplers import check_aug_repeats
from pat_hf.data.sources import Split, load_splits
from pat_hf.data.transforms import (
    MixupCollator,
    build_criterion,
    build_mixup,
    build_transforms,
    collate,
    collate_training,
    mixup_active,
    resolve_data_config_for,
)
from pat_hf.distillers import DistillContext, get_distiller_class
from pat_hf.export.card import run_card_info
from pat_hf.export.hub import prepare_push, push_student
from pat_hf.export.student import export_student
from pat_hf.metrics import TopkMetrics, top_k_indices
from pat_hf.models.factory import create_model, create_teacher, exported_model_kwargs, load_weights, require_file
from pat_hf.training.atomic import remove_stale_partials, write_text_atomically
from pat_hf.training.callbacks import MixupOffCallback, ModelEmaCallback
from pat_hf.training.checkpoints import check_resumable, file_sha256, latest_complete_checkpoint, trained_epochs
from pat_hf.training.host_memory import keep_freed_host_memory
from pat_hf.training.memory_format import MemoryFormat
from pat_hf.training.meters import SUMMARY_FILE
from pat_hf.training.nonfinite import check_finite_state
from pat_hf.training.run_dir import check_output_dir, clear_run
from pat_hf.training.schedule import training_epochs
from pat_hf.training.trainer import DistillationTrainer

logger = logging.getLogger("pat_hf")
PROG = "pat-hf-train"

def setup_logging(args: RunArguments) -> None:
    level = args.training.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    for library in (transformers, datasets):
        library.utils.logging.set_verbosity(level)


def teacher_weights_id(args: RunArguments) -> str | None:
    """The teacher's weights by content (the sha256 of the file) for the checkpoints' identity; a Hub name as
    given. A missing file is an error here, before any data is read."""
    path = args.model.teacher_pretrained
    if not args.model.teacher or not path or path.startswith(("hf-hub:", "local-dir:")):
        return path or None
    require_file(path, "teacher checkpoint")
    return file_sha256(path)


def check_epochs_left(args: RunArguments, checkpoint: str) -> None:
    """A resumed run may train longer than the checkpoint's run planned, not stop before where it got to."""
    trained = trained_epochs(checkpoint)
    planned = training_epochs(args.recipe, args.training.num_train_epochs)
    if args.training.max_steps <= 0 and trained > planned + 1e-9:
        cooldown = planned - args.training.num_train_epochs
        raise ValueError(f"{checkpoint} has already trained {trained:g} epochs, more than --epochs "
                         f"{args.training.num_train_epochs:g} plans; pass --epochs {math.ceil(trained - cooldown)} "
                         f"or more")


def find_resume_checkpoint(args: RunArguments, identity: dict) -> str | None:
    """--resume: the newest complete checkpoint in --output_dir (or --resume_from_checkpoint PATH), which must
    come from a run of the same models, distiller and settings, and leave epochs to train."""
    output_dir = args.training.output_dir
    checkpoint = args.training.resume_from_checkpoint
    if not checkpoint and args.recipe.resume:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint-* folder in {output_dir} (a run saved "
                                    f"without checkpoints, or stopped before its first); start it again with "
                                    f"--overwrite_output_dir")
    if not checkpoint:
        return None
    ignored = check_resumable(checkpoint, identity, args.recipe.resume_ignore_changes)
    if ignored:
        logger.warning("--resume-ignore-changes: continuing %s with this run's settings (%s)", checkpoint,
                       "; ".join(ignored))
    check_epochs_left(args, str(checkpoint))
    return str(checkpoint)


def check_one_batch(train_set: Split, args: RunArguments) -> None:
    """With --dataloader_drop_last (the default) a process trains only whole batches: a training split smaller
    than one batch per process would train no step at all. Streams are checked when their epochs are cut."""
    if isinstance(train_set, IterableDataset) or not args.training.dataloader_drop_last:
        return
    batch_size, processes = args.training.per_device_train_batch_size, args.training.world_size
    per_process = math.ceil(len(train_set) / processes)
    if per_process >= batch_size:
        return
    fitting = per_process - per_process % 2 if mixup_active(args.data) else per_process  # mixup pairs examples
    each = f" for each of {processes} processes" if processes > 1 else ""
    subset = " (--max-train-samples)" if args.data.max_train_samples else ""
    smaller = f"pass --batch-size {fitting} or less, or " if fitting else ""
    raise ValueError(f"the training split has {len(train_set)} examples{subset}, fewer than one batch of "
                     f"--batch-size {batch_size}{each}, so no step would be trained: {smaller}give it more "
                     f"training examples")


def start_output_dir(args: RunArguments) -> None:
    """Once every input is checked: clear the old run (--overwrite_output_dir) or what a kill left half-written,
    and write args.yaml (without the Hub token: TrainingArguments masks it)."""
    training = args.training
    with training.main_process_first(desc="preparing the output folder"):
        if training.process_index == 0:
            if training.overwrite_output_dir:
                removed = clear_run(training.output_dir)
                if removed:
                    logger.info("--overwrite_output_dir: removed %s", ", ".join(p.name for p in removed))
            remove_stale_partials(training.output_dir)  # writes that a kill interrupted
            os.makedirs(training.output_dir, exist_ok=True)
            write_text_atomically(os.path.join(training.output_dir, "args.yaml"),
                                  yaml.safe_dump(args.as_dict(), sort_keys=False))


def start_cpu_process_group(values: dict[str, Any]) -> None:
    """A distributed run on CPUs: start the gloo process group with --ddp_timeout before transformers sets up the
    devices, which would start it with torch's default of 30 minutes (it hands the timeout on GPUs only)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = values.get("use_cpu") or not torch.cuda.is_available()
    if distributed and on_cpu and torch.distributed.is_available() and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=values["ddp_timeout"]))


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict[str, float]:
    """Train, evaluate and export; `callbacks` are extra TrainerCallbacks. Returns the final eval metrics."""
    command_line = read_command_line(argv)
    start_cpu_process_group(command_line.values)
    args = command_line.build()
    setup_logging(args)
    keep_freed_host_memory()
    set_seed(args.training.seed)
    check_aug_repeats(args.data.aug_repeats, args.training.world_size)
    check_output_dir(args.training.output_dir, resume=args.recipe.resume or bool(args.training.resume_from_checkpoint),
                     overwrite=args.training.overwrite_output_dir)
    identity = args.run_identity(teacher_weights_id(args))
    resume_from = find_resume_checkpoint(args, identity)
    hub_repo = prepare_push(args.training)

    distiller_cls = get_distiller_class(args.distill.distiller)
    indexed_data = distiller_cls.needs_train_labels or "index" in distiller_cls.batch_keys
    if args.data.streaming and indexed_data:
        raise ValueError(f"--distiller {args.distill.distiller} needs the index and label of every training example, "
                         f"which a stream does not give; drop --streaming")
    data_seed = args.training.data_seed if args.training.data_seed is not None else args.training.seed
    train_set, eval_set, source = load_splits(args.data, seed=data_seed)
    num_classes = resolve_num_classes(train_set, args.model.num_classes)
    check_labels(train_set, eval_set, num_classes)
    student_kwargs = {"drop_rate": args.model.drop, **args.model.model_kwargs}
    if args.model.drop_path is not None:
        student_kwargs["drop_path_rate"] = args.model.drop_path
    student = create_model(args.model.model, num_classes, student_kwargs, pretrained=args.model.pretrained,
                           img_size=args.model.img_size)
    if args.model.initial_checkpoint:
        load_weights(student, args.model.initial_checkpoint)
    img_size = args.model.img_size or args.model.model_kwargs.get("img_size")
    data_config = resolve_data_config_for(args.data, student, img_size, source)
    # The teacher sees the student's inputs, so it is built for their size too (--img-size or the student's).
    input_height, input_width = data_config["input_size"][1:]
    teacher = None
    if args.model.teacher:
        teacher = create_teacher(args.model.teacher, args.model.teacher_pretrained, num_classes,
                                 args.model.teacher_kwargs, use_ema=args.model.use_ema_teacher,
                                 img_size=(input_height, input_width), dataset_classes=num_classes)
    # After the models' own checks (their flags come first), before anything is written.
    check_one_batch(train_set, args)
    batch_size = args.training.per_device_train_batch_size
    mixup = build_mixup(args.data, num_classes, batch_size)
    train_labels = train_labels_of(train_set) if distiller_cls.needs_train_labels else None
    context = DistillContext(input_size=tuple(data_config["input_size"]), num_classes=num_classes,
                             train_labels=train_labels,
                             criterion=build_criterion(args.data, bce_loss=args.data.bce_loss))
    memory_format = MemoryFormat(args.recipe.channels_last)
    distiller = memory_format.apply(distiller_cls(student, teacher, args.distill, args.hparams, context))
    callbacks = list(callbacks or [])
    ema = ModelEmaCallback(distiller.student, args.recipe.model_ema_decay) if args.recipe.model_ema else None
    if ema is not None:
        callbacks.append(ema)
    if mixup is not None and args.data.mixup_off_epoch:
        callbacks.append(MixupOffCallback(mixup, args.data.mixup_off_epoch))

    train_transform, eval_transform = build_transforms(args.data, data_config)
    train_set = training_set(args.data, train_set, train_transform, num_classes=num_classes,
                             with_index="index" in distiller_cls.batch_keys, batch_size=batch_size,
                             rank=args.training.process_index, world_size=args.training.world_size)
    eval_set = attach_transform(eval_set, eval_transform, strict_images=args.data.strict_images,
                                num_classes=num_classes, max_samples=args.data.max_eval_samples)
    args.training.per_device_eval_batch_size = args.data.validation_batch_size or batch_size

    trainer = DistillationTrainer(
        model=distiller, args=args.training, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=collate, compute_metrics=TopkMetrics(), preprocess_logits_for_metrics=top_k_indices,
        callbacks=callbacks, recipe=args.recipe,
        train_data_collator=MixupCollator(mixup) if mixup else collate_training,
        run_identity=identity, aug_repeats=args.data.aug_repeats)
    start_output_dir(args)

    train_result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)

    if trainer.is_world_process_zero():
        card = run_card_info(args, distiller_cls, source, eval_set, num_classes, data_config, metrics)
        exported = memory_format.for_export(ema.named_models()[0][1] if args.recipe.export_ema else distiller.student)
        check_finite_state(exported.state_dict(), "the student")
        student_dir = os.path.join(args.training.output_dir, "student")
        try:
            export_student(exported, student_dir,
                           model_kwargs=exported_model_kwargs(student, args.model.model_kwargs, args.model.img_size),
                           data_config=data_config, class_names=class_names_of(train_set), card=card,
                           pretrained=args.model.pretrained,
                           summary_csv=os.path.join(args.training.output_dir, SUMMARY_FILE))
        except OSError as error:
            raise OSError(f"could not write the student to {student_dir}: {error.strerror or error}; nothing of it "
                          f"was kept and the checkpoints are intact: free space (or restore write access) and "
                          f"export it with --resume") from error
        print(f"pat-hf: exported the student to {student_dir}", flush=True)
        if hub_repo:
            url = push_student(student_dir, hub_repo, token=args.training.hub_token,
                               revision=args.training.hub_revision, create_pr=args.training.hub_create_pr)
            print(f"pat-hf: pushed the student to {url}", flush=True)
    return metrics


def cli(argv: list[str] | None = None) -> None:
    """`pat-hf-train`: `main` under the failure contract of pat_hf/cli/failures.py."""
    train_command(argv)


if __name__ == "__main__":
    cli()
