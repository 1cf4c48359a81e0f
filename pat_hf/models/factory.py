"""Creating timm teachers and students and loading their weights (safetensors, timm / OFA-KD .pth, Hub)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import pickle
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file
from torch import nn

from pat_hf.config.checks import UsageError
from pat_hf.models.dry_run import dry_run

if TYPE_CHECKING:
    from pat_hf.config.arguments import ModelArguments

# Besides tensors and plain values, timm CheckpointSaver files (OFA-KD/PAT teachers) hold the run's argparse
# Namespace under "args"; that is the only class we let `weights_only` loading build.
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]
STATE_DICT_KEYS = ("state_dict", "model", "module")
EMA_STATE_DICT_KEYS = ("state_dict_ema", "model_ema")
BATCH_COUNTER = "num_batches_tracked"  # BatchNorm's buffer, filled in by load_state_dict when a checkpoint lacks it


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


ImageSize = int | tuple[int, int]


def _as_pair(size: ImageSize | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def exported_model_kwargs(model: nn.Module, kwargs: Mapping[str, Any], img_size: ImageSize | None) -> dict[str, Any]:
    """The kwargs that rebuild `model` from an exported config: with `img_size` where its class is built for an
    input size (ViT, Swin, Mixer, ...; most CNNs are not)."""
    if img_size is None or "img_size" not in inspect.signature(type(model).__init__).parameters:
        return dict(kwargs)
    return {**kwargs, "img_size": img_size}


def _unknown_kwarg(error: TypeError) -> str | None:
    found = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    return found.group(1) if found else None


def _build(name: str, num_classes: int, kwargs: dict[str, Any], pretrained: bool,
           kwargs_flag: str = "--model-kwargs") -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as error:
        key = _unknown_kwarg(error)
        if key is not None and key in kwargs and key != "img_size":
            raise UsageError(f"{kwargs_flag}: {name} takes no argument {key!r}; drop it or check its spelling "
                             f"against the arguments of timm's {name}") from None
        if "multiple values for keyword argument" not in str(error) or pretrained:
            raise
        return _create_with_overridden_defaults(name, num_classes, kwargs)


def _build_for_size(name: str, num_classes: int, kwargs: dict[str, Any], pretrained: bool,
                    img_size: ImageSize, kwargs_flag: str) -> nn.Module:
    """timm's `img_size` where the model takes one (a pretrained ViT's position embeddings are resampled);
    a model that takes none (most CNNs) is built as it is and must simply run at that size."""
    height, width = _as_pair(img_size)
    if "img_size" in kwargs:
        if _as_pair(kwargs["img_size"]) != (height, width):
            raise ValueError(f"{name}: img_size {kwargs['img_size']} in its kwargs contradicts the run's input size "
                             f"{height}x{width} (--img-size); drop one of them")
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    size_arg = height if height == width else (height, width)
    try:
        try:
            model = _build(name, num_classes, {**kwargs, "img_size": size_arg}, pretrained, kwargs_flag)
        except TypeError as error:
            if "'img_size'" not in str(error):
                raise
            model = _build(name, num_classes, kwargs, pretrained, kwargs_flag)
        dry_run(model, (3, height, width))
    except UsageError:
        raise
    except (AssertionError, RuntimeError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{name} cannot run at an input size of {height}x{width} (--img-size): {message}") from None
    return model


def _unloadable(name: str, error: OSError) -> ValueError:
    """Weights from the Hub (or a local-dir: export) that cannot be had, as one line saying what to pass."""
    if name.startswith("local-dir:"):
        reason = error.strerror or _first_line(error)
        return ValueError(f"cannot load {name}: {reason}; pass the folder of an exported student (config.json and "
                          f"model.safetensors) or a local weights file")
    if hub_constants.HF_HUB_OFFLINE:
        reason = "the Hugging Face Hub is not reachable in offline mode (HF_HUB_OFFLINE=1) and the weights are " \
                 "not in the local cache"
    else:
        reason = f"the Hugging Face Hub did not give its weights ({_first_line(error)})"
    return ValueError(f"cannot load {name}: {reason}; go online once to cache them, or pass a local weights file "
                      f"or local-dir:DIR")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@torch.no_grad()
def create_model(name: str, num_classes: int, kwargs: Mapping[str, Any] | None = None,
                 pretrained: bool = False, img_size: ImageSize | None = None,
                 kwargs_flag: str = "--model-kwargs") -> nn.Module:
    """`timm.create_model`, with a clear error for unknown names, unknown kwargs (named with `kwargs_flag`) and
    unreachable Hub weights, and overridable variant defaults.

    `img_size`: build the model for that input size (int or (height, width)) and check that it runs there."""
    kwargs = dict(kwargs or {})
    external = name.startswith(("hf-hub:", "local-dir:"))
    if not external and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the available names"
        raise ValueError(f"unknown timm model {name!r}; {hint}")
    try:
        if img_size is None:
            return _build(name, num_classes, kwargs, pretrained, kwargs_flag)
        return _build_for_size(name, num_classes, kwargs, pretrained, img_size, kwargs_flag)
    except OSError as error:
        if not external:
            raise
        raise _unloadable(name, error) from None


def _unreadable(path: str, error: Exception) -> ValueError:
    lines = str(error).strip().splitlines()
    # torch's weights-only message opens with advice to load unsafely; its cause is on a later line.
    cause = next((line.split("error:", 1)[1] for line in lines if "WeightsUnpickler error:" in line), None)
    reason = (cause or (lines[0] if lines else type(error).__name__)).strip().split(". ")[0]
    return ValueError(f"{path} is not a readable checkpoint (truncated, or not a PyTorch or safetensors file: "
                      f"{reason}); download or save it again")


def _torch_load(path: str) -> Any:
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            raise _unreadable(path, error) from None
        raise ValueError(f"{path} holds a pickled object outside the allow-list ({refused.group(1)}), refused by "
                         f"safe loading and never run; re-save its state_dict alone (e.g. as .safetensors)") from None
    except Exception as error:  # a truncated or foreign file fails in many ways (zip, pickle, EOF, ...)
        raise _unreadable(path, error) from None


def _safetensors_load(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # SafetensorError: a truncated or foreign file
        raise _unreadable(path, error) from None


def require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def read_state_dict(path: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights in a .safetensors file or a timm/OFA-KD/PAT checkpoint (.pth, .pth.tar, .bin)."""
    require_file(path, "checkpoint")
    checkpoint = _safetensors_load(path) if path.endswith(".safetensors") else _torch_load(path)
    if isinstance(checkpoint, dict):
        for key in (EMA_STATE_DICT_KEYS if use_ema else ()) + STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)} \
        if isinstance(checkpoint, Mapping) else {}
    if not state:
        raise ValueError(f"no weights found in {path}")
    return state


def remap_legacy_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the model family's timm checkpoint filter (e.g. Swin's timm 0.6.5 downsample layout)."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn else state


def _check_classifier(model: nn.Module, state: dict[str, torch.Tensor], path: str,
                      dataset_classes: int | None = None) -> None:
    """A classifier of another width; the hint is a --num-classes the run accepts (at least the data's)."""
    classifier = model.get_classifier()
    weight = getattr(classifier, "weight", None)
    if weight is None:
        return
    prefix = next((name for name, module in model.named_modules() if module is classifier), "")
    stored = state.get(f"{prefix}.weight")
    if stored is None or stored.shape[0] == weight.shape[0]:
        return
    if dataset_classes is not None and stored.shape[0] < dataset_classes:
        raise ValueError(f"{path} has a {stored.shape[0]}-class classifier but the data has {dataset_classes} "
                         f"classes; distil from a teacher trained on these {dataset_classes} classes")
    raise ValueError(f"{path} has a {stored.shape[0]}-class classifier but the model has {weight.shape[0]} "
                     f"classes; pass --num-classes {stored.shape[0]} or a matching checkpoint")


def _check_fit(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """One line on what differs between a checkpoint and the model: counts and a few examples. BatchNorm's
    step counters may be missing, as strict loading accepts (they do not change what the model computes)."""
    expected = model.state_dict()
    reshaped = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in expected if k not in state and not k.endswith(BATCH_COUNTER)]
    unexpected = [k for k in state if k not in expected]
    if not (reshaped or missing or unexpected):
        return
    parts = []
    if reshaped:
        examples = "; ".join(f"{k} is {tuple(state[k].shape)} there and {tuple(expected[k].shape)} in the model"
                             for k in reshaped[:2])
        parts.append(f"{len(reshaped)} tensors of another shape (e.g. {examples})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    raise ValueError(f"{path} does not fit {name}: {', '.join(parts)}; weights of another model, or of this one "
                     f"for another input size or variant? build the model as the checkpoint was (its --img-size, "
                     f"--model-kwargs / --teacher-kwargs)")


def check_finite_weights(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Weights holding NaN or inf would poison every step (and be blamed on the learning rate later): refused
    at load, naming the first few tensors."""
    bad = [name for name, tensor in state.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{where} holds NaN or inf values in {len(bad)} tensor(s) ({', '.join(bad[:3])}{more}): "
                         f"the weights are damaged; download or export them again")


def load_weights(model: nn.Module, path: str, use_ema: bool = False, dataset_classes: int | None = None) -> nn.Module:
    """Load a checkpoint into `model`; anything that does not fit, or a weight that is not finite, is one line
    naming the file."""
    state = remap_legacy_keys(model, read_state_dict(path, use_ema))
    check_finite_weights(state, path)
    _check_classifier(model, state, path, dataset_classes)
    _check_fit(model, state, path)
    model.load_state_dict(state)
    return model


def create_teacher(name: str, checkpoint: str, num_classes: int, kwargs: Mapping[str, Any] | None = None,
                   use_ema: bool = False, img_size: ImageSize | None = None,
                   dataset_classes: int | None = None) -> nn.Module:
    """A frozen teacher in eval mode: from a local checkpoint, or from `hf-hub:` / `local-dir:` weights.

    With `img_size`, weights saved for another size are adapted where the family's timm checkpoint filter can
    (ViT position embeddings are resampled, Swin's relative position tables resized). `dataset_classes`: the
    data's, so that a class-count hint never suggests a --num-classes below it."""
    if checkpoint.startswith(("hf-hub:", "local-dir:")):
        teacher = create_model(checkpoint, num_classes, kwargs, pretrained=True, img_size=img_size,
                               kwargs_flag="--teacher-kwargs")
        check_finite_weights(teacher.state_dict(), checkpoint)
    else:
        if not checkpoint:
            raise ValueError(f"--teacher {name} needs --teacher-pretrained FILE (or --teacher '' for no teacher)")
        require_file(checkpoint, "teacher checkpoint")
        teacher = load_weights(create_model(name, num_classes, kwargs, img_size=img_size,
                                            kwargs_flag="--teacher-kwargs"), checkpoint, use_ema, dataset_classes)
    teacher.requires_grad_(False)
    return teacher.eval()


def create_student(model: ModelArguments, num_classes: int) -> nn.Module:
    """The run's student: --model with its dropout, stochastic depth and kwargs, from timm's pretrained weights
    or --initial-checkpoint when asked."""
    kwargs = {"drop_rate": model.drop, **model.model_kwargs}
    if model.drop_path is not None:
        kwargs["drop_path_rate"] = model.drop_path
    student = create_model(model.model, num_classes, kwargs, pretrained=model.pretrained, img_size=model.img_size)
    if model.initial_checkpoint:
        load_weights(student, model.initial_checkpoint)
    return student
