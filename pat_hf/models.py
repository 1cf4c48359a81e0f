"""Creating timm teachers and students and loading their weights (safetensors, timm / OFA-KD .pth, Hub)."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
from collections.abc import Mapping
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

# Besides tensors and plain values, timm CheckpointSaver files (OFA-KD/PAT teachers) hold the run's argparse
# Namespace under "args"; that is the only class we let `weights_only` loading build.
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]
STATE_DICT_KEYS = ("state_dict", "model", "module")
EMA_STATE_DICT_KEYS = ("state_dict_ema", "model_ema")


class _CapturedBuild(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


def _create_with_overridden_defaults(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """Build a variant whose entrypoint hard-codes the keys we override (timm's Mixer/ResMLP do:
    `dict(embed_dim=768, **kwargs)` raises on a second `embed_dim`). We run the entrypoint with no overrides
    to capture the arguments it would hand to `build_model_with_cfg`, apply the overrides, and build."""
    entrypoint = timm.models.model_entrypoint(name)
    module = importlib.import_module(entrypoint.__module__)
    real_builder = module.build_model_with_cfg

    def capture(*args, **captured_kwargs):
        raise _CapturedBuild(args, captured_kwargs)

    module.build_model_with_cfg = capture
    try:
        entrypoint(pretrained=False, num_classes=num_classes)
    except _CapturedBuild as captured:
        args, built_kwargs = captured.args, captured.kwargs
    finally:
        module.build_model_with_cfg = real_builder
    return real_builder(*args, **{**built_kwargs, **kwargs})


def create_model(name: str, num_classes: int, kwargs: Mapping[str, Any] | None = None,
                 pretrained: bool = False) -> nn.Module:
    """`timm.create_model`, with a clear error for unknown names and overridable variant defaults."""
    kwargs = dict(kwargs or {})
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the available names")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as error:
        if "multiple values for keyword argument" not in str(error) or pretrained:
            raise
        return _create_with_overridden_defaults(name, num_classes, kwargs)


def _torch_load(path: str) -> Any:
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds objects other than weights, refused by safe loading; re-save its "
                         f"state_dict alone (e.g. as .safetensors): {str(error).splitlines()[0]}") from None


def read_state_dict(path: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights in a .safetensors file or a timm/OFA-KD/PAT checkpoint (.pth, .pth.tar, .bin)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = load_file(path) if path.endswith(".safetensors") else _torch_load(path)
    if isinstance(checkpoint, dict):
        for key in (EMA_STATE_DICT_KEYS if use_ema else ()) + STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"no weights found in {path}")
    return state


def remap_legacy_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the model family's timm checkpoint filter (e.g. Swin's timm 0.6.5 downsample layout)."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn else state


def _check_classifier(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    classifier = model.get_classifier()
    weight = getattr(classifier, "weight", None)
    if weight is None:
        return
    prefix = next((name for name, module in model.named_modules() if module is classifier), "")
    stored = state.get(f"{prefix}.weight")
    if stored is not None and stored.shape[0] != weight.shape[0]:
        raise ValueError(f"{path} has a {stored.shape[0]}-class classifier but the model has {weight.shape[0]} "
                         f"classes; pass --num-classes {stored.shape[0]} or a matching checkpoint")


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> nn.Module:
    state = remap_legacy_keys(model, read_state_dict(path, use_ema))
    _check_classifier(model, state, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model


def create_teacher(name: str, checkpoint: str, num_classes: int, kwargs: Mapping[str, Any] | None = None,
                   use_ema: bool = False) -> nn.Module:
    """A frozen teacher in eval mode: from a local checkpoint, or from `hf-hub:` / `local-dir:` weights."""
    if checkpoint.startswith(("hf-hub:", "local-dir:")):
        teacher = create_model(checkpoint, num_classes, kwargs, pretrained=True)
    else:
        if not checkpoint:
            raise ValueError(f"--teacher {name} needs --teacher-pretrained FILE (or --teacher '' for no teacher)")
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"teacher checkpoint not found: {checkpoint}")
        teacher = load_weights(create_model(name, num_classes, kwargs), checkpoint, use_ema)
    teacher.requires_grad_(False)
    return teacher.eval()
