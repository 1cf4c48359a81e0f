"""`pat-hf-export`: an exported student folder to ONNX (and int8 ONNX), each file checked against PyTorch.

    pat-hf-export OUTPUT_DIR/student --format onnx [--int8] [--opset 18] [--eval-batches 4]

Writes model.onnx (model_int8.onnx with --int8) and onnx_check.json into the folder itself. The checks run on the
evaluation split of the run's data and static int8 calibrates on its training split: the data flags are the
training ones (see run_distill.py --help), their defaults the values the run used (OUTPUT_DIR/args.yaml next to
the student), as for pat-hf-evaluate. Images are preprocessed as the folder's config.json says.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from pat_hf.cli import export_command
from pat_hf.cli.evaluate import _run_args
from pat_hf.config.arguments import DataArguments, DistillTrainingArguments
from pat_hf.data.examples import attach_transform
from pat_hf.data.sources import load_splits, random_subset
from pat_hf.data.transforms import build_transforms, collate, resolve_data_config_for
from pat_hf.export.onnx import (
    DEFAULT_MIN_INT8_AGREEMENT,
    DEFAULT_OPSET,
    Batch,
    OnnxCheckError,
    OnnxExportResult,
    export_student_onnx,
    load_student_folder,
    read_preprocessing,
)

PROG = "pat-hf-export"


@dataclass
class ExportArguments:
    format: str = field(default="onnx", metadata={"help": "export format", "choices": ["onnx"]})
    int8: bool = field(default=False, metadata={"help": "also write model_int8.onnx (ONNX Runtime quantisation)"})
    int8_method: str = field(default="static", metadata={
        "help": "static: QDQ, calibrated on training images (fast for convolutions too); dynamic: no calibration, "
                "activation ranges at run time (pays for matmul-heavy models only)", "choices": ["static", "dynamic"]})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset"})
    eval_batches: int | None = field(default=None, metadata={
        "help": "check on the first N batches of the evaluation split (default: all of it)"})
    batch_size: int = field(default=32, metadata={"help": "images per checked batch"})
    calibration_samples: int = field(default=128, metadata={"help": "training images that calibrate static int8"})
    min_int8_agreement: float = field(default=DEFAULT_MIN_INT8_AGREEMENT, metadata={
        "help": "int8 passes when its top-1 agrees with PyTorch's on at least this share of the images"})
    workers: int = field(default=0, metadata={"help": "data loading workers"})
    debug: bool = field(default=False, metadata={"help": "show the traceback of an error"})


class _Parser(HfArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's exit status 2, in the one-line form of the script's other errors."""
        sys.stderr.write(f"{PROG}: {message} (see {PROG} --help)\n")
        sys.exit(2)


def _parser() -> _Parser:
    parser = _Parser([DataArguments, ExportArguments], prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="an exported student folder (config.json and model.safetensors)")
    return parser


def _batches(loader: DataLoader, limit: int | None) -> Iterator[Batch]:
    for batch in itertools.islice(loader, limit):
        yield batch["pixel_values"], batch["labels"]


def run_export(folder: Path, data: DataArguments, options: ExportArguments, run: dict[str, Any]) -> OnnxExportResult:
    read_preprocessing(folder)  # before loading any data: is this an exported folder at all?
    student = load_student_folder(folder)
    seed = DistillTrainingArguments.subset_seed_of(run.get("training", {}))
    train_set, eval_set, _ = load_splits(data, seed=seed)
    # The folder's own config (its pretrained_cfg) sets the input size, crop, mean/std and interpolation.
    _, transform = build_transforms(data, resolve_data_config_for(data, student, None, None))
    common = {"strict_images": data.strict_images, "num_classes": student.num_classes}
    examples = attach_transform(eval_set, transform, max_samples=data.max_eval_samples, **common)
    loader = DataLoader(examples, batch_size=options.batch_size, num_workers=options.workers, collate_fn=collate)
    calibration = None
    if options.int8 and options.int8_method == "static":
        if isinstance(train_set, Dataset):
            train_set = random_subset(train_set, min(options.calibration_samples, len(train_set)), seed)
        # Calibrated on deployment-like inputs: the evaluation preprocessing, not the training augmentation.
        calibration_set = attach_transform(train_set, transform, max_samples=options.calibration_samples,
                                           split="training", **common)
        calibration = torch.cat([batch["pixel_values"] for batch in DataLoader(
            calibration_set, batch_size=options.batch_size, num_workers=options.workers, collate_fn=collate)])
    return export_student_onnx(folder, _batches(loader, options.eval_batches), int8=options.int8,
                               opset=options.opset, int8_method=options.int8_method, calibration=calibration,
                               min_int8_agreement=options.min_int8_agreement)


def main(argv: list[str] | None = None) -> OnnxExportResult:
    """Parse the arguments, export and check; errors propagate (pat_hf/cli/failures.py prints them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    folder = Path(parser.parse_known_args(argv)[0].folder)
    if not folder.is_dir():
        parser.error(f"not a folder: {folder}")
    run = _run_args(folder)
    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    parser.set_defaults(**{k: v for k, v in run.get("data", {}).items() if k in data_fields})
    namespace = vars(parser.parse_args(argv))
    options = ExportArguments(**{f.name: namespace[f.name] for f in dataclasses.fields(ExportArguments)})
    for name in ("batch_size", "calibration_samples", "eval_batches"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
    try:
        data = DataArguments(**{k: namespace[k] for k in data_fields})
    except ValueError as error:
        parser.error(str(error))
    try:
        result = run_export(folder, data, options, run)
    except OnnxCheckError as error:
        print(error.result.summary())
        raise
    print(result.summary())
    return result


def cli(argv: list[str] | None = None) -> None:
    """`pat-hf-export`: `main` under the failure contract of pat_hf/cli/failures.py."""
    export_command(argv)


if __name__ == "__main__":
    cli()
