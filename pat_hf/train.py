"""Distil a timm teacher into a timm student with one of pat-hf's distillers: the training entry point.

    accelerate launch -m pat_hf.train --config smoke --output_dir runs/smoke      # or: pat-hf-train ...
    accelerate launch run_distill.py --model deit_tiny_patch16_224 --teacher convnext_tiny \
        --teacher-pretrained convnext_tiny_cifar100.pth --distiller pat --dataset cifar100 \
        --config cifar/vit_mlp --output_dir runs/convnext_deit_pat

`--config` takes a YAML path or the name of a config shipped with the package (`cifar/cnn`, `smoke`, ...).

Every input is checked before anything is written; at the end OUTPUT_DIR/student holds the student alone in
timm's Hub format (and on the Hub with --push-to-hub).
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import torch
import transformers
import yaml
from transformers import TrainerCallback, set_seed

from pat_hf.arguments import RunArguments, parse_arguments
from pat_hf.callbacks import MixupOffCallback, ModelEmaCallback
from pat_hf.checkpoints import check_resumable, checkpoint_folders, latest_complete_checkpoint
from pat_hf.data import (
    MixupCollator,
    attach_transform,
    build_criterion,
    build_mixup,
    build_transforms,
    class_names_of,
    collate,
    load_splits,
    num_classes_of,
    resolve_data_config_for,
)
from pat_hf.distillers import DistillContext, get_distiller_class
from pat_hf.hub import ModelCardInfo, export_student, push_student
from pat_hf.metrics import TopkMetrics, top_k_indices
from pat_hf.models import create_model, create_teacher, exported_model_kwargs, load_weights
from pat_hf.trainer import DistillationTrainer

logger = logging.getLogger("pat_hf")


def setup_logging(args: RunArguments) -> None:
    level = args.training.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    for library in (transformers, datasets):
        library.utils.logging.set_verbosity(level)


def find_resume_checkpoint(args: RunArguments) -> str | None:
    """--resume: the newest complete checkpoint in --output_dir (or --resume_from_checkpoint PATH), which must
    come from a run of the same models and distiller. Without it, refuse to write over an earlier run."""
    output_dir = args.training.output_dir
    checkpoint = args.training.resume_from_checkpoint
    if not checkpoint and args.recipe.resume:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint-* folder in {output_dir}")
    if checkpoint:
        check_resumable(checkpoint, args.run_identity())
        return str(checkpoint)
    if checkpoint_folders(output_dir):
        raise FileExistsError(f"{output_dir} already holds checkpoints; pass --resume to continue that run "
                              f"or choose another --output_dir")
    return None


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict[str, float]:
    """Train, evaluate and export; `callbacks` are extra TrainerCallbacks. Returns the final eval metrics."""
    args = parse_arguments(argv)
    setup_logging(args)
    set_seed(args.training.seed)
    if args.data.aug_repeats and args.training.world_size < 2:
        raise ValueError("--aug-repeats needs a distributed run (as in the reference): launch several processes")
    resume_from = find_resume_checkpoint(args)

    train_set, eval_set, source = load_splits(args.data)
    dataset_classes = num_classes_of(train_set)
    num_classes = args.model.num_classes or dataset_classes
    if num_classes < dataset_classes:
        raise ValueError(f"--num-classes {num_classes} is fewer than the {dataset_classes} classes of the dataset; "
                         f"drop --num-classes to use the dataset's")
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
                                 img_size=(input_height, input_width))
    batch_size = args.training.per_device_train_batch_size
    mixup = build_mixup(args.data, num_classes, batch_size)
    distiller_cls = get_distiller_class(args.distill.distiller)
    context = DistillContext(input_size=tuple(data_config["input_size"]), num_classes=num_classes,
                             train_labels=torch.tensor(train_set["label"]),
                             criterion=build_criterion(args.data, bce_loss=args.data.bce_loss))
    distiller = distiller_cls(student, teacher, args.distill, args.hparams, context)
    if args.recipe.channels_last:
        distiller.to(memory_format=torch.channels_last)
    callbacks = list(callbacks or [])
    ema = ModelEmaCallback(distiller.student, args.recipe.model_ema_decay) if args.recipe.model_ema else None
    if ema is not None:
        callbacks.append(ema)
    if mixup is not None and args.data.mixup_off_epoch:
        callbacks.append(MixupOffCallback(mixup, args.data.mixup_off_epoch))

    train_transform, eval_transform = build_transforms(args.data, data_config)
    train_set = attach_transform(train_set, train_transform, with_index="index" in distiller_cls.batch_keys)
    eval_set = attach_transform(eval_set, eval_transform)
    args.training.per_device_eval_batch_size = args.data.validation_batch_size or batch_size

    trainer = DistillationTrainer(
        model=distiller, args=args.training, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=collate, compute_metrics=TopkMetrics(), preprocess_logits_for_metrics=top_k_indices,
        callbacks=callbacks, recipe=args.recipe, train_data_collator=MixupCollator(mixup) if mixup else None,
        run_identity=args.run_identity(),
        aug_repeats=args.data.aug_repeats)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.training.output_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(args.as_dict(), f, sort_keys=False)

    train_result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()
    trainer.log_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)

    if trainer.is_world_process_zero():
        card = ModelCardInfo(
            student=args.model.model, teacher=args.model.teacher, distiller=args.distill.distiller,
            dataset=args.data.dataset, hyperparameters=args.distiller_hyperparameters(),
            recipe=args.recipe_summary(),
            metrics={k: v for k, v in metrics.items() if k.startswith(("eval_top", "eval_ema_top"))})
        exported = ema.named_models()[0][1] if args.recipe.export_ema else distiller.student
        if args.recipe.channels_last:
            exported.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
        student_dir = export_student(
            exported, os.path.join(args.training.output_dir, "student"),
            model_kwargs=exported_model_kwargs(student, args.model.model_kwargs, args.model.img_size),
            data_config=data_config,
            class_names=class_names_of(train_set), card=card)
        logger.info("exported the student to %s", student_dir)
        if args.training.push_student_to_hub:
            repo_id = args.training.hub_model_id or os.path.basename(os.path.normpath(args.training.output_dir))
            logger.info("pushed the student: %s", push_student(student_dir, repo_id, args.training.hub_private_repo,
                                                              args.training.hub_token))
    return metrics


def shutdown() -> None:
    """Leave without running interpreter teardown under torch.distributed: CPU/gloo processes otherwise abort
    there about one run in five ("terminate called without an active exception") after all work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


def cli() -> None:
    """The `pat-hf-train` console script."""
    main()
    shutdown()


if __name__ == "__main__":
    cli()
