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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import HfArgumentParser

from pat_hf.cli import evaluate_command
from pat_hf.config.arguments import DataArguments, DistillTrainingArguments
from pat_hf.data.examples import attach_transform
from pat_hf.data.labels import num_classes_of
from pat_hf.data.sources import load_splits
from pat_hf.data.transforms import build_transforms, collate, resolve_data_config_for
from pat_hf.metrics import load_topk_accuracy, top_k_indices
from pat_hf.models.factory import create_model

STUDENT_PREFIX = "student."


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


def _run_args(path: Path) -> dict[str, Any]:
    """The training run's resolved arguments (OUTPUT_DIR/args.yaml), if next to `path`."""
    for folder in (path, *path.parents[:2]):
        args_file = folder / "args.yaml"
        if args_file.is_file():
            return yaml.safe_load(args_file.read_text()) or {}
    return {}


def _checkpoint_state(path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    folder = path.parent if path.is_file() else path
    if use_ema:
        ema_file = folder / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"--use-ema: {ema_file} not found (the run was trained without --model-ema)")
        return load_file(str(ema_file))
    weights = path if path.is_file() else folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no model.safetensors in {folder}")
    state = {k.removeprefix(STUDENT_PREFIX): v for k, v in load_file(str(weights)).items()
             if k.startswith(STUDENT_PREFIX)}
    if not state:
        raise ValueError(f"{weights} holds no student.* weights: is it a pat-hf training checkpoint?")
    return state


def load_student(path: Path, options: EvaluateArguments, run: dict[str, Any],
                 num_classes: int) -> tuple[nn.Module, bool]:
    """The student and whether it carries its own data config (an exported folder does)."""
    if (path / "config.json").is_file():
        if options.use_ema:
            raise ValueError("--use-ema applies to training checkpoints; an exported student is already final")
        # Its config.json fixes the architecture and the number of classes.
        return timm.create_model(f"local-dir:{path}", pretrained=True), True
    model_args = run.get("model", {})
    name = options.model or model_args.get("model")
    if not name:
        raise ValueError(f"no args.yaml next to {path}: pass --model NAME (and --model_kwargs) for its student")
    kwargs = json.loads(options.model_kwargs) if options.model else model_args.get("model_kwargs", {})
    student = create_model(name, num_classes, kwargs, img_size=None if options.model else model_args.get("img_size"))
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser([DataArguments, EvaluateArguments])
    parser.add_argument("path", help="an exported student folder, or a checkpoint folder / its model.safetensors")
    path = Path(parser.parse_known_args(argv)[0].path)
    if not path.exists():
        parser.error(f"not found: {path}")
    run = _run_args(path)
    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    parser.set_defaults(**{k: v for k, v in run.get("data", {}).items() if k in data_fields})
    namespace = vars(parser.parse_args(argv))
    data = DataArguments(**{k: namespace[k] for k in data_fields})
    options = EvaluateArguments(**{f.name: namespace[f.name] for f in dataclasses.fields(EvaluateArguments)})

    # The run's --max-eval-samples subset: drawn with its seed.
    training = run.get("training", {})
    seed = training.get("seed", DistillTrainingArguments.seed) if training.get("data_seed") is None \
        else training["data_seed"]
    train_set, eval_set, source = load_splits(data, seed=seed)
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
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    evaluate_command()
