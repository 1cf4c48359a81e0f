"""Reading the reference implementation's state: its distiller modules and its timm 0.6.5 model weights.

The reference (docs/REFERENCE.md) stores a distiller's own modules under its own names
(`attention_blending.projector_s`, `fb_aligner.mlp_d`, ...). `convert_distiller_state` renames them onto ours, so a
user holding a reference `checkpoint/` file, or a fixture the reference computed, can load it into a pat-hf distiller.
Most distillers need renames only; CRD also splits the memory's `params` buffer, and FitNet regroups its aligners'
weights, which needs the pair's pat-hf FitNet (its aligner kinds follow both models' stage layouts).

Reference names and layouts not written in docs/REFERENCE.md were read from the public sources: CRD from OFA-KD's
`distillers/crd.py` (Hao840/OFAKD, unchanged in PAT: docs/REFERENCE.md, Sources), whose `Embed`/`ContrastMemory` follow
HobbitLong/RepDistiller `crd/memory.py`; FitNet from PAT's rewritten `distillers/fitnet.py` and
`distillers/utils.py` (`TokenFilter`, `MyPatchMerging`, `Unpatchify`; jimmylin0979/PAT).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from pat_hf.cli.failures import run_command
from pat_hf.config.checks import OneLineArgumentParser, json_object
from pat_hf.distillers import DistillArguments, DistillContext, Distiller, get_distiller_class
from pat_hf.models.factory import create_model, read_state_dict, remap_legacy_keys
from pat_hf.models.safetensors_state import safetensors_ready
from pat_hf.modules.grid_aligner import grids_are_multiples
from pat_hf.training.atomic import cleaned_up_on_failure, fsync_file, fsync_folder, partial_path

CONVERT_PROG = "python -m pat_hf.reference"

# The reference's `contrast.params` buffer: [K, T, Z_v1, Z_v2, momentum]. Z_v1 divides the student embedding's
# scores (against memory_v2), Z_v2 the teacher's; both are -1 until the first batch sets them.
CRD_PARAMS_HYPERPARAMETERS = {0: "crd_k", 1: "crd_temperature", 4: "crd_momentum"}


def _renamed(distiller: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        for pattern, replacement in get_distiller_class(distiller).reference_renames:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def reference_crd_hyperparameters(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """--crd-k, --crd-temperature and --crd-momentum of the run that saved a reference CRD state."""
    params = state["contrast.params"]
    return {name: (int(params[i]) if name == "crd_k" else float(params[i]))
            for i, name in CRD_PARAMS_HYPERPARAMETERS.items()}


def _convert_crd(state: Mapping[str, torch.Tensor], target: Distiller | None) -> dict[str, torch.Tensor]:
    converted = _renamed("crd", state)
    params = converted.pop("contrast.params", None)
    if params is None:
        return converted
    converted["memory.normalisers"] = params[2:4].clone()
    if target is not None:
        for name, value in reference_crd_hyperparameters(state).items():
            ours = getattr(target.hparams, name)
            if abs(ours - value) > 1e-6 * abs(value):
                raise ValueError(f"the reference crd state was saved with --{name.replace('_', '-')} {value:g}, "
                                 f"this distiller has {ours:g}; build it with the reference's value")
    return converted


@dataclass(frozen=True)
class _ReferenceAligner:
    """Where one stage of the reference's FitNet keeps its aligner weights and how they are laid out.

    `layout`: "direct" (our conv's own layout), "unfold" (output channels grouped (p q c), p the row offset
    within the coarse cell, then the column offset, then the channel: MyPatchMerging's and Unpatchify's order;
    ours is (c p q)), or "merge" (input channels grouped (p q c) by MyPatchMerging; ours is a p x q kernel)."""

    prefix: str
    layout: str
    is_linear: bool
    bias: bool
    description: str


def _reference_fitnet_aligner(stage: int, student, teacher) -> _ReferenceAligner:
    """The reference FitNet's aligner for one stage, chosen from the two grids as its constructor chose it.

    The reference decides on token counts with the class token kept (timm 0.6.5 has no `num_tokens`); where it
    ran at all, that decision equals this one on the grids without prefix tokens (docs/REFERENCE.md, Distillers)."""
    pair = (f"{'sequence' if student.is_sequence else 'CNN'} student {student.height}x{student.width} -> "
            f"{'sequence' if teacher.is_sequence else 'CNN'} teacher {teacher.height}x{teacher.width}")
    where = f"reference fitnet stage {stage} ({pair})"
    if student.height != student.width or teacher.height != teacher.width:
        raise ValueError(f"{where}: the reference aligns square grids only, so it cannot have saved this stage")
    if not grids_are_multiples(student.size, teacher.size):
        raise ValueError(f"{where}: the grids are not integer multiples of each other, which the reference's "
                         "aligners cannot handle, so it cannot have saved this stage")
    if not student.is_sequence and not teacher.is_sequence:
        if student.size != teacher.size:
            raise ValueError(f"{where}: the reference's 1x1 conv keeps the student's grid, so it cannot have "
                             "trained this pair")
        return _ReferenceAligner("aligner.", "direct", False, False, "1x1 conv")
    if not student.is_sequence:
        if student.height >= teacher.height:
            return _ReferenceAligner("aligner.proj.", "direct", False, True, "PatchEmbed")
        return _ReferenceAligner("aligner.0.", "unfold", False, True, "1x1 conv to D_t*scale^2 channels")
    if not teacher.is_sequence:
        if teacher.height >= student.height:
            return _ReferenceAligner("aligner.0.", "unfold", True, True, "Linear + Unpatchify")
        return _ReferenceAligner("aligner.2.", "merge", False, True, "MyPatchMerging + 1x1 conv")
    if teacher.height > student.height:
        ratio = teacher.height // student.height
        raise ValueError(f"{where}: the reference's Linear-then-reshape aligner lays each student token's "
                         f"{ratio * ratio} outputs along a teacher grid row, which GridAligner (one {ratio}x{ratio} "
                         "block per token) cannot express")
    return _ReferenceAligner("aligner.1.", "merge", True, True, "MyPatchMerging + Linear")


def _convert_fitnet_aligner(stage: int, state: Mapping[str, torch.Tensor], student, teacher,
                            target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One stage's reference aligner weights (keys under `projector.<stage>.`) as our GridAligner's `proj`."""
    kind = _reference_fitnet_aligner(stage, student, teacher)
    where = f"reference fitnet stage {stage} ({kind.description})"
    expected = {kind.prefix + "weight", *([kind.prefix + "bias"] if kind.bias else [])}
    if set(state) != expected:
        raise ValueError(f"{where}: expected {sorted(expected)} under projector.{stage}., found {sorted(state)}")
    ratio = teacher.height // student.height if kind.layout == "unfold" else student.height // teacher.height
    weight, ours = state[kind.prefix + "weight"], target["proj.weight"]
    out_channels, in_channels = ours.shape[:2]
    pointwise = () if kind.is_linear else (1, 1)
    shape = {"direct": tuple(ours.shape), "unfold": (out_channels, in_channels, *pointwise),
             "merge": (out_channels, ratio * ratio * in_channels, *pointwise)}[kind.layout]
    if tuple(weight.shape) != shape:
        raise ValueError(f"{where}: weight of shape {tuple(weight.shape)}, the pair needs {shape} "
                         "(another pair, stage selection or --img-size?)")
    if kind.layout == "unfold":
        weight = rearrange(weight.reshape(out_channels, in_channels), "(p q c) i -> (c p q) i 1 1", p=ratio, q=ratio)
    elif kind.layout == "merge":
        weight = rearrange(weight.reshape(out_channels, -1), "o (p q i) -> o i p q", p=ratio, q=ratio)
    converted = {"proj.weight": weight}
    if kind.bias:
        bias = state[kind.prefix + "bias"]
        converted["proj.bias"] = (rearrange(bias, "(p q c) -> (c p q)", p=ratio, q=ratio)
                                  if kind.layout == "unfold" else bias)
    return converted


def reference_fitnet_stages(state: Mapping[str, torch.Tensor]) -> list[int]:
    """The stages a reference FitNet state aligns (`projector.<stage>.*`)."""
    return sorted({int(match.group(1)) for key in state if (match := re.match(r"projector\.(\d+)\.", key))})


def _convert_fitnet(state: Mapping[str, torch.Tensor], target: Distiller | None) -> dict[str, torch.Tensor]:
    if target is None:
        raise ValueError("a reference fitnet state converts only against the pair's FitNet (its aligners follow "
                         "both models' stage layouts); pass the teacher (--teacher NAME)")
    stages, ours = reference_fitnet_stages(state), sorted(int(stage) for stage in target.aligners)
    if stages != ours:
        raise ValueError(f"the reference fitnet state aligns stages {stages}, this FitNet aligns {ours}; "
                         f"build it with --fitnet-stages {' '.join(map(str, stages))}")
    foreign = sorted(key for key in state if not key.startswith("projector."))
    if foreign:
        raise ValueError(f"unexpected keys in the reference fitnet state: {foreign[:5]}")
    converted = {}
    for stage in stages:
        aligner = _convert_fitnet_aligner(stage, split_prefixed(state, f"projector.{stage}."),
                                          target.student_grids[stage], target.teacher_grids[stage],
                                          target.aligners[str(stage)].state_dict())
        converted.update({f"aligners.{stage}.{key}": value for key, value in aligner.items()})
    return converted


_CONVERTERS = {"crd": _convert_crd, "fitnet": _convert_fitnet}


def convert_distiller_state(distiller: str, state: Mapping[str, torch.Tensor],
                            target: Distiller | None = None) -> dict[str, torch.Tensor]:
    """A reference distiller's own state (keys without the `extra.<distiller>.` prefix) in our names and layouts.

    `target`: the pat-hf distiller the state is for; needed by FitNet, and where given, hyper-parameters that
    the state records (CRD's) are checked against it."""
    converter = _CONVERTERS.get(distiller)
    return converter(state, target) if converter else _renamed(distiller, state)


def split_prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def load_reference_model_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load timm 0.6.5 weights (fp16-stored fixtures are upcast) into a timm 1.x model, strictly."""
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(remap_legacy_keys(model, state), strict=True)


def load_reference_distiller_state(module: nn.Module, distiller: str, state: Mapping[str, torch.Tensor]) -> None:
    """Load a reference distiller's own modules into ours, strictly (the student and teacher excluded)."""
    converted = convert_distiller_state(distiller, state, module)
    extras = {name: child for name, child in module.named_children() if name not in ("student", "teacher")}
    expected = {f"{name}.{key}" for name, child in extras.items() for key in child.state_dict()}
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(f"reference {distiller} state does not fit: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, child in extras.items():
        child_state = {key: value.to(child.state_dict()[key].dtype) for key, value in
                       split_prefixed(converted, name + ".").items()}
        child.load_state_dict(child_state, strict=True)


def fitnet_for_reference_state(student: nn.Module, teacher: nn.Module, state: Mapping[str, torch.Tensor],
                               input_size: tuple[int, int, int]) -> Distiller:
    """The pat-hf FitNet a reference FitNet state (reference names, no prefix) converts onto: same stages."""
    fitnet = get_distiller_class("fitnet")
    return fitnet(student, teacher, DistillArguments(distiller="fitnet"),
                  fitnet.Arguments(fitnet_stages=reference_fitnet_stages(state)),
                  DistillContext(input_size=input_size, num_classes=student.num_classes))


def convert_reference_checkpoint(whole: Mapping[str, torch.Tensor], distiller: str, student: nn.Module,
                                 teacher: nn.Module | None = None,
                                 input_size: tuple[int, int, int] = (3, 224, 224)) -> dict[str, torch.Tensor]:
    """The state of a reference `checkpoint/*.pth.tar` (timm CheckpointSaver: `state_dict` = the student,
    `state_dict_ema` = the whole distiller, docs/REFERENCE.md, Checkpoints;
    read with `read_state_dict(path, use_ema=True)`) as a
    pat-hf distiller state: `student.*` in timm 1.x names plus the distiller's modules in ours. The frozen teacher
    is left out, as in pat-hf checkpoints; FitNet needs its architecture (`teacher`) and the run's `input_size`,
    which decide its aligners' layout."""
    student_state = split_prefixed(whole, "student.")
    if not student_state:  # a file without the distiller's state: the student alone
        student_state, whole = whole, {}
    student_state = remap_legacy_keys(student, student_state)
    student.load_state_dict(student_state, strict=True)
    extras = {k: v for k, v in whole.items() if not k.startswith(("student.", "teacher."))}
    target = None
    if extras and distiller == "fitnet":
        if teacher is None:
            raise ValueError("converting a reference fitnet state needs the teacher's architecture "
                             "(--teacher NAME): its aligners follow both models' stage layouts")
        target = fitnet_for_reference_state(student, teacher, extras, input_size)
    converted = {f"student.{k}": v for k, v in student_state.items()}
    converted.update(convert_distiller_state(distiller, extras, target))
    return converted


def write_together(files: dict[Path, dict[str, torch.Tensor]]) -> None:
    """Write each state to its safetensors file, all or none (training/atomic.py's partial names, fsync and
    rename): every file is written and flushed under its `.partial` name before any is renamed, so that a failed
    write (a full disk) leaves no half-written file and no student without its distiller, and the files of an
    earlier conversion in the folder stay as they were."""
    partials = {path: partial_path(path) for path in files}
    with contextlib.ExitStack() as cleanup:
        for path, state in files.items():
            cleanup.enter_context(cleaned_up_on_failure(partials[path]))
            save_file(state, str(partials[path]))
            fsync_file(partials[path])
    for path, partial in partials.items():
        os.replace(partial, path)
    fsync_folder(next(iter(files)).parent)


def main(argv: list[str] | None = None) -> None:
    """python -m pat_hf.reference.convert CHECKPOINT --distiller NAME --model NAME --num-classes N --output DIR"""
    parser = OneLineArgumentParser(
        prog=CONVERT_PROG, description="Convert a reference (OFA-KD/PAT) training checkpoint: writes "
                                       "DIR/student.safetensors (timm 1.x names, for --initial-checkpoint or "
                                       "evaluation) and DIR/distiller.safetensors (pat-hf names).")
    parser.add_argument("checkpoint")
    parser.add_argument("--distiller", required=True, help="the reference run's --distiller")
    parser.add_argument("--model", required=True, help="the student's timm name")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs of the student")
    parser.add_argument("--teacher", help="the teacher's timm name (needed for fitnet)")
    parser.add_argument("--teacher-kwargs", default="{}", help="JSON kwargs of the teacher")
    parser.add_argument("--img-size", type=int, default=224, help="the reference run's input size (fitnet)")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.distiller == "fitnet" and not args.teacher:
        parser.error("--distiller fitnet needs --teacher NAME: its aligners follow both models' stage layouts")
    student = create_model(args.model, args.num_classes, json_object(args.model_kwargs, "--model-kwargs"))
    teacher = (create_model(args.teacher, args.num_classes, json_object(args.teacher_kwargs, "--teacher-kwargs"),
                            kwargs_flag="--teacher-kwargs") if args.teacher else None)
    whole = read_state_dict(args.checkpoint, use_ema=True)
    state = convert_reference_checkpoint(whole, args.distiller, student, teacher, (3, args.img_size, args.img_size))
    args.output.mkdir(parents=True, exist_ok=True)
    ready = safetensors_ready(state)
    write_together({
        args.output / "student.safetensors": {k.removeprefix("student."): v for k, v in ready.items()
                                              if k.startswith("student.")},
        args.output / "distiller.safetensors": ready,
    })
    print(f"wrote {args.output / 'student.safetensors'} and {args.output / 'distiller.safetensors'}")
    if args.distiller == "crd" and "contrast.params" in whole:
        # The converted state keeps the memory's Z; K, T and the momentum are training flags.
        hyperparameters = reference_crd_hyperparameters(whole)
        print("train on with the reference's " + " ".join(f"--{name.replace('_', '-')} {value:g}"
                                                          for name, value in hyperparameters.items()))


def command(argv: list[str] | None = None) -> None:
    """`main` under the failure contract of the commands (pat_hf/cli/failures.py)."""
    run_command(CONVERT_PROG, main, argv)


if __name__ == "__main__":
    command()
