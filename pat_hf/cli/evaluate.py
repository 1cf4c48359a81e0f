"""Top-1/top-5 of a distilled student on a dataset split (the reference's validate.py).

    python -m pat_hf.cli.evaluate OUTPUT_DIR/student                   # an exported student
    python -m pat_hf.cli.evaluate OUTPUT_DIR/checkpoint-N [--use-ema]  # a training checkpoint (raw or EMA student)
    python -m pat_hf.cli.evaluate PATH --dataset cifar100 --val-split test --json result.json

The data flags are the training ones (see run_distill.py --help). Their defaults are the values the run used,
read from OUTPUT_DIR/args.yaml next to the student or checkpoint, so the evaluation sees the same data and
preprocessing; an exported student carries its own preprocessing (input size, crop, mean/std, interpolation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pat_hf.cli import evaluate_command
from pat_hf.cli.parser import OneLineErrorParser
from pat_hf.config.arguments import DataArguments, DistillTrainingArguments
from pat_hf.config.checks import UsageError, check_count, json_object
from pat_hf.data.examples import attach_transform
from pat_hf.data.labels import num_classes_of
from pat_hf.data.sources import load_splits
from pat_hf.data.transforms import build_transforms, collate, resolve_data_config_for
from pat_hf.export.cost import cost_table, measure_costs, model_cost, write_cost
from pat_hf.metrics import load_topk_accuracy, top_k_indices
from pat_hf.models.factory import create_model, create_teacher, read_state_dict

PROG = "pat-hf-evaluate"
STUDENT_PREFIX = "student."
PARTIAL_SUFFIX = ".partial"  # a folder being written (an export or checkpoint that a kill interrupted)


@dataclass
class EvaluateArguments:
    use_ema: bool = field(default=False, metadata={"help": "a checkpoint's EMA student (ema.safetensors)"})
    batch_size: int = field(default=128, metadata={"help": "images per batch"})
    workers: int = field(default=0, metadata={"help": "data loading workers"})
    amp: bool = field(default=False, metadata={"help": "mixed precision: fp16 on CUDA, bf16 on the CPU"})
    json: str | None = field(default=None, metadata={"help": "also write the result to this JSON file"})
    model: str | None = field(default=None, metadata={"help": "student name, for a checkpoint without args.yaml"})
    model_kwargs: str = field(default="{}", metadata={"help": "JSON kwargs of that student"})
    num_classes: int | None = field(default=None, metadata={"help": "classes (default: the run's / dataset's)"})
    progress_bar: bool = field(default=True, metadata={"help": "show a progress bar (--no_progress_bar hides it)"})
    benchmark: bool = field(default=False, metadata={
        "help": "also measure the student's cost against the run's teacher (parameters, size, GMACs, CPU latency at "
                "batch 1 and 32): printed, in --json, and written to an exported folder's cost.json"})
    benchmark_runs: int = field(default=20, metadata={"help": "--benchmark: timed passes per batch size"})

    def __post_init__(self):
        check_count(self.batch_size, "batch_size", flag="--batch_size")
        check_count(self.workers, "workers", at_least=0, flag="--workers")
        check_count(self.num_classes, "num_classes", at_least=2, none_means="the run's", flag="--num_classes")
        check_count(self.benchmark_runs, "benchmark_runs", flag="--benchmark_runs")


def _run_args(path: Path) -> dict[str, Any]:
    """The training run's resolved arguments (OUTPUT_DIR/args.yaml), if next to `path`."""
    for folder in (path, *path.parents[:2]):
        args_file = folder / "args.yaml"
        if args_file.is_file():
            return yaml.safe_load(args_file.read_text()) or {}
    return {}


def check_model_path(path: Path, use_ema: bool) -> bool:
    """What `path` is, before any data is read: True for an exported student, False for a training checkpoint
    (or its weights file); anything else is one line saying what to pass."""
    if path.name.endswith(PARTIAL_SUFFIX):
        final = path.with_name(path.name.removesuffix(PARTIAL_SUFFIX))
        if final.name != "student":  # a checkpoint whose save was interrupted: the next start removes it
            raise ValueError(f"{path} is an unfinished checkpoint (the run stopped while saving it): evaluate a "
                             f"complete checkpoint-N of the run, or its student")
        raise ValueError(f"{path} is an unfinished export (the run stopped while writing it): run the training "
                         f"command again with --resume to finish {final.name}, then evaluate {final}")
    if path.is_dir() and (path / "config.json").is_file():
        if use_ema:
            raise UsageError("--use-ema applies to training checkpoints; an exported student is already final")
        return True
    folder = path.parent if path.is_file() else path
    if path.is_file() and path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a checkpoint's model.safetensors: pass an exported student folder "
                         f"(OUTPUT_DIR/student) or a checkpoint folder (OUTPUT_DIR/checkpoint-N)")
    if use_ema and not (folder / "ema.safetensors").is_file():
        raise FileNotFoundError(f"--use-ema: {folder / 'ema.safetensors'} not found (the run was trained without "
                                f"--model-ema); drop --use-ema to evaluate the raw student")
    if not path.is_file() and not (folder / "model.safetensors").is_file():
        inside = sorted(p.name for p in folder.iterdir() if p.name == "student" or p.name.startswith("checkpoint-"))
        hint = f" (it holds {', '.join(inside[:4])}: pass one of them)" if inside else ""
        raise ValueError(f"{path} is neither an exported student (no config.json) nor a training checkpoint (no "
                         f"model.safetensors){hint}; pass OUTPUT_DIR/student or OUTPUT_DIR/checkpoint-N")
    return False


def check_json_path(path: str | None) -> None:
    """--json: a file this user can create, checked before evaluating (its missing folders are created then)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--json {path} is a folder; pass a file name, e.g. {target / 'result.json'}")
    existing = next(p for p in (target.parent.absolute(), *target.parent.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--json {path} cannot be written: {existing} is not a folder this user may write into; "
                         f"choose another path")


def _checkpoint_state(path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    folder = path.parent if path.is_file() else path
    if use_ema:
        return read_state_dict(str(folder / "ema.safetensors"))
    weights = path if path.is_file() else folder / "model.safetensors"
    state = {k.removeprefix(STUDENT_PREFIX): v for k, v in read_state_dict(str(weights)).items()
             if k.startswith(STUDENT_PREFIX)}
    if not state:
        raise ValueError(f"{weights} holds no student.* weights: is it a pat-hf training checkpoint?")
    return state


def load_student(path: Path, options: EvaluateArguments, run: dict[str, Any],
                 num_classes: int) -> tuple[nn.Module, bool]:
    """The student and whether it carries its own data config (an exported folder does)."""
    if check_model_path(path, options.use_ema):
        # Its config.json fixes the architecture and the number of classes.
        try:
            return timm.create_model(f"local-dir:{path}", pretrained=True), True
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{path} is a damaged export ({type(error).__name__}: {error}); export the student "
                             f"again (pat-hf-train ... --resume)") from None
    model_args = run.get("model", {})
    name = options.model or model_args.get("model")
    kwargs = json_object(options.model_kwargs, "--model_kwargs") if options.model \
        else model_args.get("model_kwargs", {})
    student = create_model(name, num_classes, kwargs, img_size=None if options.model else model_args.get("img_size"),
                           kwargs_flag="--model_kwargs" if options.model else "model_kwargs in args.yaml")
    missing, unexpected = student.load_state_dict(_checkpoint_state(path, options.use_ema), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return student, False


@torch.no_grad()
def evaluate_student(student: nn.Module, loader: DataLoader, amp: bool = False,
                     progress_bar: bool = True) -> dict[str, float]:
    device = next(student.parameters()).device
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    student.eval()
    predictions, labels = [], []
    for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress_bar):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = student(batch["pixel_values"].to(device))
        predictions.append(top_k_indices(logits.float()).cpu())
        labels.append(batch["labels"])
    metric = load_topk_accuracy()
    references = torch.cat(labels).tolist()
    return {**metric.compute(predictions=torch.cat(predictions).tolist(), references=references),
            "images": len(references)}


def _run_teacher(run: dict[str, Any], num_classes: int, input_size: tuple[int, ...]) -> nn.Module | None:
    """The run's teacher, when args.yaml names one whose weights can be read from here; else None (said why)."""
    model = run.get("model", {})
    name, weights = model.get("teacher"), model.get("teacher_pretrained") or ""
    if not name:
        return None
    if not weights.startswith(("hf-hub:", "local-dir:")) and not Path(weights).is_file():
        print(f"--benchmark: the run's teacher weights ({weights or 'none'}) are not readable from here; "
              f"measuring the student alone", flush=True)
        return None
    return create_teacher(name, weights, num_classes, model.get("teacher_kwargs") or {},
                          use_ema=bool(model.get("use_ema_teacher")), img_size=tuple(input_size[1:]),
                          dataset_classes=num_classes)


def benchmark(student: nn.Module, run: dict[str, Any], loader: DataLoader, num_classes: int,
              input_size: tuple[int, ...], student_top1: float, options: EvaluateArguments,
              exported_folder: Path | None) -> dict[str, Any]:
    """--benchmark: the student's cost facts against the run's teacher (evaluated on the same images), printed
    as the model card's table; written to an exported folder's cost.json."""
    weights = exported_folder / "model.safetensors" if exported_folder else None
    teacher = _run_teacher(run, num_classes, input_size)
    if teacher is None:
        cost = {"student": model_cost(student, input_size, weights_file=weights, top1=student_top1,
                                      runs=options.benchmark_runs)}
        print(json.dumps(cost["student"], indent=2))
    else:
        teacher.to(next(student.parameters()).device)
        teacher_top1 = evaluate_student(teacher, loader, options.amp, options.progress_bar)["top1"]
        teacher_file = run["model"]["teacher_pretrained"]
        cost = measure_costs(student, teacher, input_size, student_name=run.get("model", {}).get("model"),
                             teacher_name=run["model"]["teacher"], student_weights=weights,
                             teacher_weights=teacher_file if Path(teacher_file).is_file() else None,
                             student_top1=student_top1, teacher_top1=teacher_top1, runs=options.benchmark_runs)
        print(cost_table(cost))
    if exported_folder is not None:
        write_cost(exported_folder, cost)
    return cost


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineErrorParser([DataArguments, EvaluateArguments], prog=PROG)
    parser.add_argument("path", help="an exported student folder, or a checkpoint folder / its model.safetensors")
    early = parser.parse_known_args(argv)[0]
    path = Path(early.path)
    if not path.exists():
        parser.error(f"not found: {path}")
    run = _run_args(path)
    # What the path is, before any data is read.
    exported = check_model_path(path, use_ema=early.use_ema)
    if not exported and not run and not early.model:
        raise UsageError(f"no args.yaml next to {path}: pass --model NAME (and --model_kwargs) for its student")
    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    parser.set_defaults(**{k: v for k, v in run.get("data", {}).items() if k in data_fields})
    namespace = vars(parser.parse_args(argv))
    data = DataArguments(**{k: namespace[k] for k in data_fields})
    options = EvaluateArguments(**{f.name: namespace[f.name] for f in dataclasses.fields(EvaluateArguments)})
    check_json_path(options.json)

    # The run's --max-eval-samples subset: drawn with its seed.
    train_set, eval_set, source = load_splits(data, seed=DistillTrainingArguments.subset_seed_of(
        run.get("training", {})))
    num_classes = options.num_classes or run.get("model", {}).get("num_classes") or num_classes_of(train_set)
    student, exported = load_student(path, options, run, num_classes)
    student.to("cuda" if torch.cuda.is_available() else "cpu")
    img_size = None if exported else run.get("model", {}).get("img_size") or \
        run.get("model", {}).get("model_kwargs", {}).get("img_size")
    # An exported student's own config already holds the dataset's mean/std and interpolation.
    data_config = resolve_data_config_for(data, student, img_size, None if exported else source)
    _, eval_transform = build_transforms(data, data_config)
    examples = attach_transform(eval_set, eval_transform, strict_images=data.strict_images, num_classes=num_classes,
                                max_samples=data.max_eval_samples)
    loader = DataLoader(examples, batch_size=options.batch_size, num_workers=options.workers, collate_fn=collate)
    metrics = evaluate_student(student, loader, options.amp, options.progress_bar)
    result = {**metrics, "model": str(path), "ema": options.use_ema, "dataset": data.dataset,
              "split": data.val_split}
    split = f", split {data.val_split}" if data.val_split else ""
    print(f"{path}{' (EMA)' if options.use_ema else ''}: top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
          f"({metrics['images']} images of {data.dataset}{split})")
    if options.benchmark:
        result["cost"] = benchmark(student, run, loader, num_classes, tuple(data_config["input_size"]),
                                   metrics["top1"], options, path if exported else None)
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    evaluate_command()
