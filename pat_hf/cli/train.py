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

import logging
import os
import sys
import traceback
from typing import Any

import datasets
import torch
import transformers
from transformers import TrainerCallback, set_seed

from pat_hf.config.arguments import DataArguments, RunArguments
from pat_hf.config.parser import parse_arguments
from pat_hf.data.examples import attach_transform, training_set
from pat_hf.data.labels import check_labels, class_names_of, resolve_num_classes, train_labels_of
from pat_hf.data.sources import DatasetSource, load_splits
from pat_hf.data.transforms import (
    MixupCollator,
    build_criterion,
    build_mixup,
    build_transforms,
    collate,
    collate_training,
    resolve_data_config_for,
)
from pat_hf.distillers import DistillContext, get_distiller_class
from pat_hf.export.card import ModelCardInfo
from pat_hf.export.hub import HubPushError, prepare_repo, push_student
from pat_hf.export.student import export_student
from pat_hf.metrics import TopkMetrics, top_k_indices
from pat_hf.models.factory import create_model, create_teacher, exported_model_kwargs, load_weights
from pat_hf.training.callbacks import MixupOffCallback
from pat_hf.training.ema import ModelEmaCallback
from pat_hf.training.host_memory import keep_freed_host_memory
from pat_hf.training.memory_format import MemoryFormat
from pat_hf.training.meters import SUMMARY_FILE
from pat_hf.training.nonfinite import NonFiniteError, check_finite_state
from pat_hf.training.resume import identity_and_resume_checkpoint
from pat_hf.training.run_dir import check_output_dir, start_output_dir
from pat_hf.training.trainer import DistillationTrainer

logger = logging.getLogger("pat_hf")
PROG = "pat-hf-train"

# timm optimizers that take --momentum.
MOMENTUM_OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "lars")


def setup_logging(args: RunArguments) -> None:
    level = args.training.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    for library in (transformers, datasets):
        library.utils.logging.set_verbosity(level)


def prepare_push(args: RunArguments) -> str | None:
    """With --push-to-hub: the Hub repository, created and checked for write access before any training."""
    training = args.training
    if not training.push_student_to_hub or training.process_index != 0:
        return None
    repo_id = training.hub_model_id or os.path.basename(os.path.normpath(training.output_dir))
    return prepare_repo(repo_id, private=training.hub_private_repo, token=training.hub_token,
                        revision=training.hub_revision)


def dataset_card_name(data: DataArguments, source: DatasetSource | None) -> str:
    """The dataset as the model card names it: its Hub id, or a local folder's name."""
    if source:
        return source.path
    local = data.data_dir or (data.dataset if os.path.isdir(data.dataset) else None)
    return os.path.basename(os.path.normpath(local)) if local else data.dataset


def evaluated_split(eval_set: datasets.Dataset, data: DataArguments, source: DatasetSource | None) -> str | None:
    return data.val_split or (str(eval_set.split) if eval_set.split else None) or (source and source.eval_split)


def distiller_settings(args: RunArguments, distiller_cls: type) -> dict[str, Any]:
    """The distillation hyper-parameters of this run's distiller (a teacher-less one has no KD weight)."""
    settings = {k: v for k, v in args.distiller_hyperparameters().items() if k != "distiller"}
    if not distiller_cls.requires_teacher:
        settings = {k: v for k, v in settings.items() if not k.startswith("kd_")}
    return settings


def recipe_settings(args: RunArguments) -> dict[str, Any]:
    """The recipe values that shaped this run: a step schedule's decay only with --sched step, EMA decays
    only with --model-ema, ...; switches that are off and unset values are left out."""
    recipe = args.recipe
    unused = {"resume"}
    if recipe.sched != "step":
        unused.add("decay_epochs")
    if recipe.sched not in ("step", "poly"):  # poly's power is --decay-rate
        unused.add("decay_rate")
    if not recipe.model_ema:
        unused.update({"model_ema_decay", "export_ema"})
    if not recipe.amp:
        unused.add("amp_dtype")
    if not any(name in recipe.opt for name in MOMENTUM_OPTIMIZERS):
        unused.add("momentum")
    return {k: v for k, v in args.recipe_summary().items()
            if k not in unused and v is not None and v is not False and v != []}


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict[str, float]:
    """Train, evaluate and export; `callbacks` are extra TrainerCallbacks. Returns the final eval metrics."""
    args = parse_arguments(argv)
    setup_logging(args)
    keep_freed_host_memory()
    set_seed(args.training.seed)
    if args.data.aug_repeats and args.training.world_size < 2:
        raise ValueError("--aug-repeats needs a distributed run (as in the reference): launch several processes")
    check_output_dir(args.training.output_dir, resume=args.recipe.resume or bool(args.training.resume_from_checkpoint),
                     overwrite=args.training.overwrite_output_dir)
    identity, resume_from = identity_and_resume_checkpoint(args)
    hub_repo = prepare_push(args)

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
        card = ModelCardInfo(
            student=args.model.model, teacher=args.model.teacher, teacher_weights=args.model.teacher_pretrained,
            distiller=args.distill.distiller, dataset=dataset_card_name(args.data, source),
            eval_split=evaluated_split(eval_set, args.data, source), dataset_config=args.data.dataset_config_name,
            num_classes=num_classes, input_size=tuple(data_config["input_size"]),
            exported_ema=args.recipe.export_ema, distiller_settings=distiller_settings(args, distiller_cls),
            recipe=recipe_settings(args), metrics=metrics)
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


def shutdown() -> None:
    """Leave without running interpreter teardown under torch.distributed: CPU/gloo processes otherwise abort
    there about one run in five ("terminate called without an active exception") after all work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


def error_line(error: BaseException) -> str:
    """An error as the one line pat-hf-train prints: our own errors say what is wrong and what to do; another
    kind is named, with the way to its traceback."""
    message = " ".join(str(error).split()) or repr(error)
    if isinstance(error, ValueError | OSError | NonFiniteError | HubPushError):
        return message[:2000]
    return f"{type(error).__name__}: {message[:2000]} (--debug shows the traceback)"


def _distributed_rank() -> int | None:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized and torch.distributed.get_world_size() > 1 else None


def distributed_error_line(error: BaseException, rank: int) -> str:
    """One process's error in a distributed run, named by its rank; a collective that timed out is the
    symptom of another process that failed or hung, whose own error (if any) is on its own line."""
    if isinstance(error, RuntimeError) and any(word in str(error).lower() for word in ("timed out", "timeout")):
        return (f"process {rank}: no answer from the other processes within --ddp_timeout (one of them failed or "
                f"hung): {error_line(error)}")
    return f"process {rank}: {error_line(error)}"


def _wants_traceback(argv: list[str]) -> bool:
    return any(arg == "--debug" or arg.split("=", 1) in (["--debug", v] for v in ("true", "True", "1", "yes"))
               for arg in argv)


def _exit(status: int, message: str | None = None) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tearing down with the process group alive can hang or abort; the other processes see this one leave.
        if message:
            print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    raise SystemExit(message or status)  # a message: printed on stderr, status 1


def cli(argv: list[str] | None = None) -> None:
    """The `pat-hf-train` console script: an error is one line on stderr and exit status 1 (argument errors:
    status 2); --debug on the command line prints the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume from the last complete checkpoint", file=sys.stderr)
        _exit(130)
    except Exception as error:  # every failure ends in one line, not a traceback
        if _wants_traceback(argv):
            traceback.print_exc()
            _exit(1)
        rank = _distributed_rank()
        _exit(1, f"{PROG}: {error_line(error) if rank is None else distributed_error_line(error, rank)}")
    shutdown()


if __name__ == "__main__":
    cli()
