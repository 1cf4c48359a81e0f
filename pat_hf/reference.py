"""Reading the reference implementation's state: its distiller modules and its timm 0.6.5 model weights.

The reference (docs/REFERENCE.md) stores a distiller's own modules under its own names
(`attention_blending.projector_s`, `fb_aligner.mlp_d`, ...). `convert_distiller_state` renames them onto ours, so
a user holding a reference `checkpoint/` file, or a fixture in ../shared/golden, can load it into a pat-hf
distiller.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pat_hf.models import create_model, read_state_dict, remap_legacy_keys

# (pattern, replacement) pairs applied in order to the keys of each distiller's reference state.
REFERENCE_RENAMES: dict[str, list[tuple[str, str]]] = {
    "pat": [
        (r"\.fb_aligner\.", ".feedback_aligner."),
        (r"\.fusion_block\.", ".fusion."),
        (r"\.prompt_block\.", ".prompt."),
        (r"^attention_blending\.projector_s\.(\d+)\.projector\.proj\.", r"region_attention.projectors.\1.proj."),
        (r"^attention_blending\.positional_encodings$", "region_attention.positional_encoding"),
        (r"^attention_blending\.", "region_attention."),
        (r"\.conv\.(\d)\.", r".proj.\1."),
        (r"\.mlp_d\.", ".channel_proj."),
        (r"\.mlp_l\.", ".token_proj."),
    ],
    "ofa": [
        # Map heads: `projector.<stage>.<block>.op.<layer>` separable downsampling blocks.
        (r"^projector\.(\d+)\.(\d+)\.op\.0\.", r"branch_heads.\1.features.\2.downsample_dw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.1\.", r"branch_heads.\1.features.\2.downsample_pw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.2\.", r"branch_heads.\1.features.\2.downsample_bn."),
        (r"^projector\.(\d+)\.(\d+)\.op\.4\.", r"branch_heads.\1.features.\2.mix_dw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.5\.", r"branch_heads.\1.features.\2.mix_pw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.6\.", r"branch_heads.\1.features.\2.mix_bn."),
        # Token heads: patch mergers inside a token-bypass wrapper, then ViT blocks.
        (r"^projector\.(\d+)\.0\.fn\.", r"branch_heads.\1.downsample."),
        (r"^projector\.(\d+)\.1\.(\d+)\.", r"branch_heads.\1.blocks.\2."),
        # The last stage's map head starts with a 1x1 conv; every head ends with its classifier.
        (r"^projector\.(\d+)\.0\.", r"branch_heads.\1.features.0."),
        (r"^projector\.(\d+)\.\d+\.", r"branch_heads.\1.classifier."),
    ],
    "correlation": [
        (r"^embed_s\.linear\.", "embed_student."),
        (r"^embed_t\.linear\.", "embed_teacher."),
    ],
}

# Our top-level module names -> the reference's, for reporting gradient norms by module.
REFERENCE_MODULE_NAMES: dict[str, dict[str, str]] = {
    "pat": {"region_attention": "attention_blending"},
    "ofa": {"branch_heads": "projector"},
    "correlation": {"embed_student": "embed_s", "embed_teacher": "embed_t"},
}


def convert_distiller_state(distiller: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a reference distiller's own state (keys without the `extra.<distiller>.` prefix) onto ours."""
    converted = {}
    for key, value in state.items():
        for pattern, replacement in REFERENCE_RENAMES.get(distiller, []):
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def split_prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def load_reference_model_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load timm 0.6.5 weights (fp16-stored fixtures are upcast) into a timm 1.x model, strictly."""
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(remap_legacy_keys(model, state), strict=True)


def load_reference_distiller_state(module: nn.Module, distiller: str, state: Mapping[str, torch.Tensor]) -> None:
    """Load a reference distiller's own modules into ours, strictly (the student and teacher excluded)."""
    converted = convert_distiller_state(distiller, state)
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


def convert_reference_checkpoint(path: str, distiller: str, student: nn.Module) -> dict[str, torch.Tensor]:
    """A reference `checkpoint/*.pth.tar` (timm CheckpointSaver: `state_dict` = the student, `state_dict_ema` =
    the whole distiller, docs/REFERENCE.md, Checkpoints) as a pat-hf distiller state: `student.*` in timm 1.x
    names plus the distiller's modules in ours. The frozen teacher is left out, as in pat-hf checkpoints."""
    whole = read_state_dict(path, use_ema=True)
    student_state = split_prefixed(whole, "student.")
    if not student_state:  # a file without the distiller's state: the student alone
        student_state, whole = whole, {}
    student_state = remap_legacy_keys(student, student_state)
    student.load_state_dict(student_state, strict=True)
    extras = {k: v for k, v in whole.items() if not k.startswith(("student.", "teacher."))}
    converted = {f"student.{k}": v for k, v in student_state.items()}
    converted.update(convert_distiller_state(distiller, extras))
    return converted


def main(argv: list[str] | None = None) -> None:
    """python -m pat_hf.reference CHECKPOINT --distiller NAME --model NAME --num-classes N --output DIR"""
    parser = argparse.ArgumentParser(description="Convert a reference (OFA-KD/PAT) training checkpoint: writes "
                                                 "DIR/student.safetensors (timm 1.x names, for --initial-checkpoint "
                                                 "or evaluation) and DIR/distiller.safetensors (pat-hf names).")
    parser.add_argument("checkpoint")
    parser.add_argument("--distiller", required=True, help="the reference run's --distiller")
    parser.add_argument("--model", required=True, help="the student's timm name")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs of the student")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    student = create_model(args.model, args.num_classes, json.loads(args.model_kwargs))
    state = convert_reference_checkpoint(args.checkpoint, args.distiller, student)
    args.output.mkdir(parents=True, exist_ok=True)
    save_file({k.removeprefix("student."): v.contiguous() for k, v in state.items() if k.startswith("student.")},
              str(args.output / "student.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(args.output / "distiller.safetensors"))
    print(f"wrote {args.output / 'student.safetensors'} and {args.output / 'distiller.safetensors'}")


if __name__ == "__main__":
    main()
