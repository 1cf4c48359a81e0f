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
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import IterableDataset
from torch.utils.data import DataLoader
from transformers import TrainerCallback, set_seed

from pat_hf.cli import train_command
from pat_hf.cli.evaluate import evaluate_student
from pat_hf.cli.export import ExportArguments, run_export
from pat_hf.cli.failures import advise_on_interrupt
from pat_hf.cli.parser import read_command_line
from pat_hf.config.arguments import RunArguments
from pat_hf.data.examples import attach_transform, training_set
from pat_hf.data.labels import (
    check_labels,
    class_names_of,
    kept_labels,
    resolve_num_classes,
    train_labels_of,
)
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
from pat_hf.distillers.base import check_data_support
from pat_hf.export.card import ModelCardInfo, run_card_info
from pat_hf.export.cost import add_cost_to_results, measure_costs, write_cost
from pat_hf.export.hub import prepare_push, push_student
from pat_hf.export.onnx import card_section
from pat_hf.export.student import export_trained_student, rewrite_card
from pat_hf.metrics import TopkMetrics, top_k_indices
from pat_hf.models.factory import create_student, create_teacher, exported_model_kwargs
from pat_hf.training.callbacks import MixupOffCallback
from pat_hf.training.checkpoints import latest_complete_checkpoint
from pat_hf.training.ema import ModelEmaCallback
from pat_hf.training.host_memory import keep_freed_host_memory
from pat_hf.training.memory_format import MemoryFormat
from pat_hf.training.meters import SUMMARY_FILE
from pat_hf.training.output_lock import hold_output_dir
from pat_hf.training.resume import identity_and_resume_checkpoint
from pat_hf.training.run_dir import check_output_dir, start_output_dir
from pat_hf.training.trainer import DistillationTrainer

logger = logging.getLogger("pat_hf")
PROG = "pat-hf-train"

def setup_logging(args: RunArguments) -> None:
    level = args.training.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    for library in (transformers, datasets):
        library.utils.logging.set_verbosity(level)


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
    # The run holds --output_dir from before its contents are checked until it ends (training/output_lock.py).
    with hold_output_dir(args.training, [PROG, *(sys.argv[1:] if argv is None else argv)]):
        return train_and_export(args, callbacks)


def train_and_export(args: RunArguments, callbacks: list[TrainerCallback] | None) -> dict[str, float]:
    """`main` once the arguments are checked and the output folder held."""
    check_output_dir(args.training.output_dir, resume=args.recipe.resume or bool(args.training.resume_from_checkpoint),
                     overwrite=args.training.overwrite_output_dir)
    identity, resume_from = identity_and_resume_checkpoint(args)
    hub_repo = prepare_push(args.training)

    distiller_cls = get_distiller_class(args.distill.distiller)
    check_data_support(distiller_cls, args.data)
    data_seed = args.training.subset_seed
    train_set, eval_set, source = load_splits(args.data, seed=data_seed)
    num_classes = resolve_num_classes(train_set, args.model.num_classes)
    check_labels(train_set, eval_set, num_classes, allow_unlabelled=args.data.allow_unlabelled)
    labelled = kept_labels(train_set, args.data, data_seed, announce=args.training.process_index == 0)
    student = create_student(args.model, num_classes)
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
                             rank=args.training.process_index, world_size=args.training.world_size,
                             labelled=labelled)
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
    advise_on_interrupt(lambda: resume_advice(args.training.output_dir))

    train_result = trainer.train(resume_from_checkpoint=resume_from)
    labelled_examples = None if labelled is None else int(labelled.sum())
    if labelled_examples is not None:
        train_result.metrics["train_labelled_examples"] = labelled_examples
    trainer.save_state()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)

    if trainer.is_world_process_zero():
        card = run_card_info(args, distiller_cls, source, eval_set, num_classes, data_config, metrics,
                             labelled_examples)
        exported = memory_format.for_export(ema.named_models()[0][1] if args.recipe.export_ema else distiller.student)
        student_dir = os.path.join(args.training.output_dir, "student")
        export_trained_student(
            exported, student_dir,
            model_kwargs=exported_model_kwargs(student, args.model.model_kwargs, args.model.img_size),
            data_config=data_config, class_names=class_names_of(train_set), card=card, pretrained=args.model.pretrained,
            summary_csv=os.path.join(args.training.output_dir, SUMMARY_FILE))
        print(f"pat-hf: exported the student to {student_dir}", flush=True)
        # The main process alone: a loader of its own, not the trainer's (sharded, synchronised) one.
        eval_loader = DataLoader(eval_set, batch_size=args.training.per_device_eval_batch_size, collate_fn=collate)
        add_deployment_facts(student_dir, card, exported, teacher, args, eval_loader, tuple(data_config["input_size"]))
        if hub_repo:
            url = push_student(student_dir, hub_repo, token=args.training.hub_token,
                               revision=args.training.hub_revision, create_pr=args.training.hub_create_pr)
            print(f"pat-hf: pushed the student to {url}", flush=True)
    return metrics


def resume_advice(output_dir: str) -> str:
    """What to do after an interrupt: --resume from the newest complete checkpoint, or start over without one."""
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint is None:
        return (f"no checkpoint in {output_dir} is complete yet; run the command again with "
                f"--overwrite_output_dir to start over")
    return f"continue with --resume (from {checkpoint})"


def add_deployment_facts(student_dir: str, card: ModelCardInfo, student: torch.nn.Module,
                         teacher: torch.nn.Module | None, args: RunArguments, eval_loader: DataLoader,
                         input_size: tuple[int, ...]) -> None:
    """What a deployer asks of the export, measured on the written folder: the cost of the student against its
    teacher (student/cost.json, the card, all_results.json) and, with --export-onnx, the checked ONNX files."""
    if args.recipe.cost_runs and teacher is not None:
        teacher_top1 = evaluate_student(teacher, eval_loader, progress_bar=False)["top1"]
        teacher_file = args.model.teacher_pretrained
        card.cost = measure_costs(
            student, teacher, input_size, student_name=args.model.model, teacher_name=args.model.teacher,
            student_weights=os.path.join(student_dir, "model.safetensors"),
            teacher_weights=teacher_file if os.path.isfile(teacher_file) else None,
            student_top1=card.metrics.get("eval_top1"), teacher_top1=teacher_top1, runs=args.recipe.cost_runs)
        write_cost(student_dir, card.cost)
        add_cost_to_results(args.training.output_dir, card.cost)
    if args.recipe.export_onnx:
        result = run_export(Path(student_dir), args.data, ExportArguments(int8=args.recipe.export_int8),
                            args.as_dict())
        print(result.summary(), flush=True)
        card.onnx_section = card_section(result)
    if card.cost or card.onnx_section:
        rewrite_card(student_dir, card)


def cli(argv: list[str] | None = None) -> None:
    """`pat-hf-train`: `main` under the failure contract of pat_hf/cli/failures.py."""
    train_command(argv)


if __name__ == "__main__":
    cli()
