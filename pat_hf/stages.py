"""The stage layer: four stage features, pooled pre-logits and logits of any timm model from one forward.

This is the only module that knows about architecture families. Everything else sees a model through
`StageLayer`: a list of four stage features in one of two canonical layouts, the pooled pre-logit vector and
the logits, plus the option to rewrite the input of each stage (PAT's prompts) during that same forward.

Canonical layouts (what distillers see):
  * feature maps: (B, C, H, W) for convolutional stages;
  * token sequences: (B, L, C) for transformer / MLP stages, prefix (class, register) tokens first. Swin's
    NHWC stage outputs are flattened row-major to tokens, as the reference did.

How the four stages are chosen (the reference's choices where it has them, then generalised; docs/REFERENCE.md, Stages):
  * hierarchical models: the last feature of each of the last four resolutions in `feature_info`
    (ResNet layer1-4, ConvNeXt stages, Swin layers, RegNet s1-s4, ConvNeXt-V2, ...);
  * EfficientNet-family models (MobileNetV2, EfficientNet): stages 1-3 as above, stage 4 is the head conv
    (`conv_head` + `bn2`), as the reference took for MobileNetV2;
  * isotropic models (ViT/DeiT, BEiT, EVA, Mixer, ResMLP): blocks split 2:2:6:2, i.e. blocks 1, 3, 9, 11
    of 12, in general the block ending at the 2/12, 4/12, 10/12 and 12/12 point of the depth.
Stage k's input (where PAT inserts its prompt) is the input of the module that starts stage k: the stage
module itself for hierarchical models, the block after the previous stage's last block for block lists, and
for Swin the first block after the stage's patch merging.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

NUM_STAGES = 4
ISOTROPIC_STAGE_FRACTIONS = (2 / 12, 4 / 12, 10 / 12, 12 / 12)

PromptFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StagePlan:
    """Where the four stages of a model start and end, and in which layout they come out."""

    ends: tuple[str, ...]
    starts: tuple[str, ...]
    layout: str  # "NCHW", "NHWC" or "NLC": the layout of the model's own stage tensors
    num_prefix_tokens: int = 0

    @property
    def is_sequence(self) -> bool:
        return self.layout != "NCHW"


@dataclass
class StageOutput:
    stages: list[torch.Tensor]
    pooled: torch.Tensor
    logits: torch.Tensor


_FAMILY_RULES: dict[str, Callable[[nn.Module, StagePlan], StagePlan]] = {}


def register_family_rule(*class_names: str):
    """Register a function that adjusts the generic plan for models of the given timm classes."""

    def decorator(fn: Callable[[nn.Module, StagePlan], StagePlan]):
        for name in class_names:
            _FAMILY_RULES[name] = fn
        return fn

    return decorator


@register_family_rule("SwinTransformer")
def _swin_prompts_after_patch_merging(model: nn.Module, plan: StagePlan) -> StagePlan:
    return StagePlan(plan.ends, tuple(f"{end}.blocks" for end in plan.ends), plan.layout, plan.num_prefix_tokens)


@register_family_rule("EfficientNet")
def _efficientnet_head_conv_is_stage_four(model: nn.Module, plan: StagePlan) -> StagePlan:
    return StagePlan((*plan.ends[:3], "bn2"), plan.starts, plan.layout, plan.num_prefix_tokens)


def _index_path(name: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"(.+)\.(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else None


def _isotropic_ends(names: list[str]) -> list[str]:
    depth = len(names)
    if depth < NUM_STAGES:
        raise ValueError(f"an isotropic model needs at least {NUM_STAGES} blocks to give {NUM_STAGES} stages, "
                         f"this one has {depth}; use a deeper variant")
    ends = [round(depth * fraction) - 1 for fraction in ISOTROPIC_STAGE_FRACTIONS]
    for k in range(1, NUM_STAGES):
        ends[k] = max(ends[k], ends[k - 1] + 1)
    for k in range(NUM_STAGES - 2, -1, -1):
        ends[k] = min(ends[k], ends[k + 1] - 1)
    return [names[i] for i in ends]


def _hierarchical_ends(feature_info: list[dict]) -> list[str]:
    last_per_reduction: dict[int, str] = {}
    for info in feature_info:
        last_per_reduction[info["reduction"]] = info["module"]
    names = list(last_per_reduction.values())
    if len(names) < NUM_STAGES:
        raise ValueError(f"the model exposes {len(names)} resolutions in feature_info, {NUM_STAGES} are needed")
    return names[-NUM_STAGES:]


def _stage_starts(ends: list[str], all_names: list[str]) -> list[str]:
    """A stage starts with the sibling after the previous feature module, or is the feature module itself."""
    starts = []
    for end in ends:
        position = all_names.index(end)
        here = _index_path(end)
        previous = _index_path(all_names[position - 1]) if position > 0 else None
        if here and previous and previous[0] == here[0]:
            starts.append(f"{here[0]}.{previous[1] + 1}")
        elif here and position == 0:
            starts.append(f"{here[0]}.0")
        else:
            starts.append(end)
    return starts


def _layout(model: nn.Module, sample: torch.Tensor) -> str:
    if sample.ndim == 3:
        return "NLC"
    return "NHWC" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "NCHW"


def build_stage_plan(model: nn.Module, input_size: tuple[int, int, int]) -> StagePlan:
    """Decide the four stages of `model` from its `feature_info` and one dry forward."""
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise ValueError(f"{type(model).__name__} has no feature_info; stage features need a timm model")
    feature_info = list(feature_info)
    all_names = [info["module"] for info in feature_info]
    isotropic = len({info["reduction"] for info in feature_info}) == 1
    ends = _isotropic_ends(all_names) if isotropic else _hierarchical_ends(feature_info)
    if isotropic:
        parent = _index_path(ends[0])[0]
        starts = [f"{parent}.0"] + [f"{parent}.{_index_path(end)[1] + 1}" for end in ends[:-1]]
    else:
        starts = _stage_starts(ends, all_names)
    sample = _dry_run(model, ends[:1], input_size)[0]
    layout = _layout(model, sample)
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if layout == "NLC" else 0
    plan = StagePlan(tuple(ends), tuple(starts), layout, prefix)
    rule = _FAMILY_RULES.get(type(model).__name__)
    return rule(model, plan) if rule else plan


@torch.no_grad()
def _dry_run(model: nn.Module, names: list[str] | tuple[str, ...], input_size) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in names
    ]
    try:
        parameter = next(model.parameters())
        model(torch.zeros(1, *input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [captured[name] for name in names]


def _to_canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    return rearrange(x, "b h w c -> b (h w) c") if layout == "NHWC" else x


def _from_canonical(x: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b (h w) c -> b h w c", h=like.shape[1]) if layout == "NHWC" else x


class StageLayer:
    """A timm model seen as four stages. Holds a reference to the model (not a submodule of it)."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int]):
        self.model = model
        self.input_size = tuple(input_size)
        self.plan = build_stage_plan(model, self.input_size)
        self.stage_shapes, self.stage_input_shapes, self.pooled_dim = self._discover_shapes()

    @property
    def is_sequence(self) -> bool:
        return self.plan.is_sequence

    @property
    def num_prefix_tokens(self) -> int:
        return self.plan.num_prefix_tokens

    def _discover_shapes(self):
        with self._capture() as captured:
            _dry_run(self.model, [], self.input_size)
        stage_shapes = [tuple(t.shape[1:]) for t in captured["stages"]]
        input_shapes = [tuple(t.shape[1:]) for t in captured["inputs"]]
        return stage_shapes, input_shapes, captured["pooled"].shape[-1]

    def __call__(self, x: torch.Tensor, prompts: Mapping[int, PromptFn] | None = None) -> StageOutput:
        with self._capture(prompts) as captured:
            logits = self.model(x)
        return StageOutput(captured["stages"], captured["pooled"], logits)

    @contextlib.contextmanager
    def _capture(self, prompts: Mapping[int, PromptFn] | None = None) -> Iterator[dict]:
        """Hooks live only for one forward, so copies of the model (EMA, DDP) never inherit them."""
        layout = self.plan.layout
        stages: list[torch.Tensor | None] = [None] * NUM_STAGES
        inputs: list[torch.Tensor | None] = [None] * NUM_STAGES
        captured: dict = {"stages": stages, "inputs": inputs}
        prompts = prompts or {}
        handles = []

        def on_stage_input(k: int):
            def hook(_module, args):
                x = _to_canonical(args[0], layout)
                inputs[k] = x
                if k in prompts:
                    return (_from_canonical(prompts[k](x), layout, args[0]), *args[1:])
                return None
            return hook

        def on_stage_output(k: int):
            def hook(_module, _args, output):
                stages[k] = _to_canonical(output, layout)
            return hook

        def on_classifier_input(_module, args):
            captured["pooled"] = args[0]

        try:
            for k, (start, end) in enumerate(zip(self.plan.starts, self.plan.ends)):
                handles.append(self.model.get_submodule(start).register_forward_pre_hook(on_stage_input(k)))
                handles.append(self.model.get_submodule(end).register_forward_hook(on_stage_output(k)))
            handles.append(self.model.get_classifier().register_forward_pre_hook(on_classifier_input))
            yield captured
        finally:
            for handle in handles:
                handle.remove()
