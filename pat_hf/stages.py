"""The stage layer: four stage features, pooled pre-logits and logits of any timm model from one forward.

This is the only module that knows about architecture families. Everything else sees a model through
`StageLayer`: a list of four stage features in one of two canonical layouts, the pooled pre-logit vector and
the logits, plus the option to rewrite the input of each stage (PAT's prompts) during that same forward.

Canonical layouts (what distillers see):
  * feature maps: (B, C, H, W) for convolutional stages;
  * token sequences: (B, L, C) for transformer / MLP stages, prefix (class, register) tokens first, the same
    number of them in every stage. NHWC stage outputs (Swin, MambaOut, ...) are flattened row-major to tokens,
    as the reference did; tokens kept in another order (Hiera's unrolled units) are put back in row-major order.
  A model whose stages mix both (a CNN with a token last stage) is seen as maps: its token stages are laid out
  on their grid, prefix tokens dropped.

How the four stages are chosen, from `feature_info` (the reference's choices where it has them, docs/REFERENCE.md,
Stages, then generalised). Its entries are taken in execution order and grouped by reduction (one group per
resolution); entries a forward never reaches, or whose output has no tensor of the announced width, are left
out. A module name is also found as the one module it ends (a wrapped `encoder.blocks.k`), a ModuleList stands
for its blocks, and a tuple output or argument gives its tensor of the announced width with the most positions
(PiT's map, not its class token). A 4-D tensor is NCHW or NHWC as its width and image-shaped grid say. Then:
  * four resolutions or more: the last entry of each of the last four (ResNet layer1-4, ConvNeXt stages, Swin
    layers, RegNet s1-s4, ...);
  * one resolution (ViT/DeiT, BEiT, EVA, Mixer, ResMLP, ConvMixer): its blocks split 2:2:6:2, i.e. blocks 1,
    3, 9, 11 of 12, in general the block ending at the 2/12, 4/12, 10/12 and 12/12 point of the depth;
  * two or three resolutions (LeViT, EfficientViT-MSRA, VOLO, Sequencer, ...): the resolution with the most
    blocks per stage gets one more stage until there are four, and a resolution with several stages has its
    blocks split evenly. The blocks of a resolution are its `feature_info` entries when it has several,
    otherwise the blocks of the (largest) block list inside its module;
  * family rules fix what `feature_info` gets wrong or what the reference chose otherwise: EfficientNet's
    stage 4 is the head conv (`conv_head` + `bn2`), as the reference took for MobileNetV2; Swin's prompts go
    after the patch merging; Twins, MViTv2, CoaT, CrossViT and HRNet get other feature modules; Hiera's and
    NesT's tokens a row-major order (the `_FEATURE_RULES`, `_STAGE_RULES` and `_TOKEN_ORDER_RULES` below).
Stage k's input (where PAT inserts its prompt) is the input of the module that starts stage k: the stage
module itself for hierarchical models, the block after the previous stage's last block for block lists, and
for Swin the first block after the stage's patch merging.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from einops import rearrange
from timm.models.nest import deblockify
from torch import nn

NUM_STAGES = 4
ISOTROPIC_STAGE_FRACTIONS = (2 / 12, 4 / 12, 10 / 12, 12 / 12)
# Plan-time forwards use two samples, so that a tensor whose first dimension is not the batch (TNT's pixel
# tokens, batch x patches) is never taken for a stage.
PROBE_BATCH = 2

PromptFn = Callable[[torch.Tensor], torch.Tensor]
TensorPath = tuple[int, ...]  # indices into nested tuples/lists: () is the object itself


@dataclass(frozen=True)
class FeatureEntry:
    """One `feature_info` entry: where a forward hook reads it, where its stage would start."""

    module: str
    reduction: float
    channels: int | None = None
    start: str | None = None  # where the entry's own blocks start (its first child for a block list)


@dataclass(frozen=True)
class TensorView:
    """How one hooked tensor (a module output, or a positional input) is shown in the canonical layout."""

    layout: str  # the model's own layout: "NCHW", "NHWC" or "NLC"
    as_map: bool  # canonical (B, C, H, W) rather than (B, L, C)
    path: TensorPath = ()  # where the tensor sits in the output, or in the positional arguments
    hidden_tokens: int = 0  # leading tokens not shown (prefix tokens a map or another stage lacks)
    prefix_tokens: int = 0  # leading tokens shown as prefix tokens
    grid: tuple[int, int] | None = None  # (rows, columns) of the tokens, for tokens shown as a map
    order: torch.Tensor | None = field(default=None, compare=False)  # row-major position -> own token index

    def to_canonical(self, raw: Any) -> torch.Tensor:
        x = _get(raw, self.path)
        if self.layout == "NCHW":
            return x
        tokens = rearrange(x, "b h w c -> b (h w) c") if self.layout == "NHWC" else x
        start = self.hidden_tokens + self.prefix_tokens
        prefix, patches = tokens[:, self.hidden_tokens:start], tokens[:, start:]
        if self.order is not None:
            patches = patches[:, self.order.to(patches.device)]
        if self.as_map:
            return rearrange(patches, "b (h w) c -> b c h w", h=self.grid[0])
        return torch.cat([prefix, patches], dim=1) if self.prefix_tokens else patches

    def from_canonical(self, new: torch.Tensor, raw: Any) -> Any:
        """`raw` with the viewed tensor replaced by the canonical `new`."""
        x = _get(raw, self.path)
        if self.layout == "NCHW":
            return _set(raw, self.path, new)
        own = rearrange(x, "b h w c -> b (h w) c") if self.layout == "NHWC" else x
        if self.as_map:
            prefix, patches = own[:, :0], rearrange(new, "b c h w -> b (h w) c")
        else:
            prefix, patches = new[:, :self.prefix_tokens], new[:, self.prefix_tokens:]
        if self.order is not None:
            patches = patches[:, torch.argsort(self.order).to(patches.device)]
        tokens = torch.cat([own[:, :self.hidden_tokens], prefix, patches], dim=1)
        if self.layout == "NHWC":
            tokens = rearrange(tokens, "b (h w) c -> b h w c", h=x.shape[1])
        return _set(raw, self.path, tokens)


@dataclass(frozen=True)
class StagePlan:
    """Where the four stages of a model start and end, and how their tensors are shown."""

    ends: tuple[str, ...]
    starts: tuple[str, ...]
    outputs: tuple[TensorView, ...]
    inputs: tuple[TensorView, ...]
    num_prefix_tokens: int = 0

    @property
    def is_sequence(self) -> bool:
        return not self.outputs[0].as_map


@dataclass
class StageOutput:
    stages: list[torch.Tensor]
    pooled: torch.Tensor
    logits: torch.Tensor


def _get(raw: Any, path: TensorPath) -> Any:
    for index in path:
        raw = raw[index]
    return raw


def _set(raw: Any, path: TensorPath, value: Any) -> Any:
    if not path:
        return value
    items = list(raw)
    items[path[0]] = _set(items[path[0]], path[1:], value)
    return tuple(items) if isinstance(raw, tuple) else items


def _tensors(raw: Any, path: TensorPath = ()) -> Iterator[tuple[TensorPath, torch.Tensor]]:
    """Every batch-first tensor in a (nested) output or argument tuple, depth first."""
    if isinstance(raw, torch.Tensor):
        if raw.ndim in (3, 4) and raw.shape[0] == PROBE_BATCH:
            yield path, raw
    elif isinstance(raw, (tuple, list)):
        for index, item in enumerate(raw):
            yield from _tensors(item, (*path, index))


# ---- family rules -------------------------------------------------------------------------------------------

FeatureRule = Callable[[nn.Module, list[FeatureEntry]], list[FeatureEntry]]
StageRule = Callable[[nn.Module, list[str], list[str]], tuple[list[str], list[str]]]
TokenOrderRule = Callable[[nn.Module, str, bool], torch.Tensor | None]
_FEATURE_RULES: dict[str, FeatureRule] = {}
_STAGE_RULES: dict[str, StageRule] = {}
_TOKEN_ORDER_RULES: dict[str, TokenOrderRule] = {}


def _register(table: dict, *class_names: str):
    def decorator(fn):
        for name in class_names:
            table[name] = fn
        return fn

    return decorator


@_register(_FEATURE_RULES, "Twins", "MultiScaleVit")
def _feature_rule_block_is_named_blocks_or_stages(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # Their feature_info names `block.k`; the modules are `blocks.k` (Twins) and `stages.k` (MViTv2).
    container = "blocks" if hasattr(model, "blocks") else "stages"
    return [replace(e, module=re.sub(r"^block\.", f"{container}.", e.module)) for e in entries]


@_register(_FEATURE_RULES, "CoaT")
def _feature_rule_serial_blocks(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # feature_info names the parallel blocks, which mix all four scales at once, for scales 2-4; the serial
    # blocks give each scale on its own, in order.
    return [replace(e, module=f"serial_blocks{i + 1}") for i, e in enumerate(entries)]


@_register(_FEATURE_RULES, "CrossVit")
def _feature_rule_widest_branch(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # Each multi-scale block runs both branches; the stages are the transformer blocks of the branch with the
    # most of them (a ViT of its own), whose outputs do not yet include the cross-branch fusion.
    depths = [sum(len(block.blocks[b]) for block in model.blocks) for b in range(model.num_branches)]
    branch = max(range(model.num_branches), key=lambda b: (depths[b], b))
    reduction = max(e.reduction for e in entries)
    return [FeatureEntry(f"blocks.{i}.blocks.{branch}.{j}", reduction, model.embed_dim[branch])
            for i, block in enumerate(model.blocks) for j in range(len(block.blocks[branch]))]


@_register(_FEATURE_RULES, "HighResolutionNet")
def _feature_rule_hrnet_incre_modules(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # feature_info names `stem` and `stageN`, which are no modules (or give all branches at once); the widths
    # it gives are those of the classifier's incre modules, one per branch, finest first.
    return [replace(e, module=f"incre_modules.{i}") for i, e in enumerate(entries[1:])]


@_register(_STAGE_RULES, "SwinTransformer")
def _stage_rule_swin_prompts_after_patch_merging(model: nn.Module, ends: list[str],
                                                 starts: list[str]) -> tuple[list[str], list[str]]:
    return ends, [f"{end}.blocks" for end in ends]


@_register(_STAGE_RULES, "EfficientNet")
def _stage_rule_efficientnet_head_conv_is_stage_four(model: nn.Module, ends: list[str],
                                                     starts: list[str]) -> tuple[list[str], list[str]]:
    return [*ends[:3], "bn2"], starts


@_register(_TOKEN_ORDER_RULES, "Hiera")
def _token_order_hiera_units(model: nn.Module, module: str, is_input: bool) -> torch.Tensor | None:
    """Hiera keeps its tokens "unrolled" (grouped by pooling unit); its Reroll says where each one belongs."""
    index = int(module.split(".")[1])
    block = max(index - 1, 0) if is_input else index
    schedule, size = model.reroll.schedule[block]
    count = math.prod(size)
    positions = torch.arange(count, dtype=torch.float32).reshape(1, count, 1)
    return model.reroll(positions, block).flatten().long()


@_register(_TOKEN_ORDER_RULES, "Nest")
def _token_order_nest_image_blocks(model: nn.Module, module: str, is_input: bool) -> torch.Tensor | None:
    """NesT's transformer blocks see (B, image blocks, tokens per block, C); deblockify says where each is."""
    match = re.fullmatch(r"levels\.(\d+)\.transformer_encoder\.\d+", module)
    if not match:
        return None
    level = model.levels[int(match.group(1))]
    blocks, tokens = level.pos_embed.shape[1:3]
    positions = torch.arange(blocks * tokens, dtype=torch.float32).reshape(1, blocks, tokens, 1)
    return deblockify(positions, level.block_size).flatten().long()


# ---- choosing the four stages -------------------------------------------------------------------------------


def _index_path(name: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"(.+)\.(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else None


def _split_points(count: int, parts: int, fractions: tuple[float, ...] | None = None) -> list[int]:
    """The index of the last unit of each of `parts` consecutive runs of `count` units."""
    fractions = fractions or tuple((k + 1) / parts for k in range(parts))
    ends = [round(count * fraction) - 1 for fraction in fractions]
    for k in range(1, parts):
        ends[k] = max(ends[k], ends[k - 1] + 1)
    for k in range(parts - 2, -1, -1):
        ends[k] = min(ends[k], ends[k + 1] - 1)
    return ends


def _feature_entries(model: nn.Module) -> list[FeatureEntry]:
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise ValueError(f"{type(model).__name__} has no feature_info; stage features need a timm model")
    entries = [FeatureEntry(info["module"], info["reduction"], info.get("num_chs")) for info in feature_info]
    rule = _FEATURE_RULES.get(type(model).__name__)
    entries = rule(model, entries) if rule else entries
    resolved = []
    for entry in entries:
        name = _resolve(model, entry.module)
        if not name:  # the model itself ("") or nothing
            continue
        module = model.get_submodule(name)
        if isinstance(module, nn.ModuleList):  # never called itself: its blocks are
            if not len(module):
                continue
            entry = replace(entry, module=f"{name}.{len(module) - 1}", start=f"{name}.0")
        else:
            entry = replace(entry, module=name)
        resolved.append(entry)
    return resolved


def _resolve(model: nn.Module, name: str) -> str | None:
    """The module `name` names: itself, or the one module whose name ends with it (Gemma 4's feature_info
    names `blocks.k` inside its `encoder`); None if there is none."""
    names = dict(model.named_modules())
    if name in names:
        return name
    nested = [full for full in names if full.endswith(f".{name}")]
    return nested[0] if len(nested) == 1 else None


def _model_layout(model: nn.Module) -> str:
    return "NHWC" if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else "NCHW"


def _on_image_grid(height: int, width: int, input_size) -> bool:
    """Whether a height x width grid has the image's shape (up to rounding)."""
    image_height, image_width = input_size[-2:]
    return abs(height * image_width - width * image_height) <= max(image_height, image_width)


def _layout_of(x: torch.Tensor, channels: tuple[int, ...], preferred: str, input_size,
               reordered: bool = False) -> str | None:
    """The layout of `x` in which it has one of the expected widths (any, if none is expected) and, for a 4-D
    tensor, a grid of the image's shape (unless a token-order rule puts its positions elsewhere); the preferred
    one if both 4-D layouts fit; None if none does."""
    if x.ndim == 3:
        return "NLC" if not channels or x.shape[-1] in channels else None
    readings = (("NCHW", x.shape[1], x.shape[2:]), ("NHWC", x.shape[-1], x.shape[1:3]))
    fitting = [layout for layout, width, grid in readings
               if (not channels or width in channels) and (reordered or _on_image_grid(*grid, input_size))]
    if len(fitting) == 2:
        return "NHWC" if preferred == "NHWC" else "NCHW"
    return fitting[0] if fitting else None


@dataclass(frozen=True)
class _Probe:
    """A tensor seen at a hook: which one of the hooked object, in which layout."""

    path: TensorPath
    layout: str
    shape: tuple[int, ...]


def _positions_of(x: torch.Tensor, layout: str) -> int:
    return x.shape[1] if layout == "NLC" else math.prod(x.shape[2:] if layout == "NCHW" else x.shape[1:3])


def _probe_tensor(raw: Any, channels: tuple[int, ...], preferred: str, input_size,
                  reordered: bool = False) -> _Probe | None:
    """The stage tensor among those of an output or argument tuple: of the expected width, the one with the most
    positions (PiT's feature map rather than its class token), the preferred layout on ties."""
    rank = {"NCHW": ("NCHW", "NLC", "NHWC"), "NHWC": ("NHWC", "NLC", "NCHW"),
            "NLC": ("NLC", "NCHW", "NHWC")}[preferred]
    candidates = list(_tensors(raw))
    matches = [(path, x, layout) for path, x in candidates
               if (layout := _layout_of(x, channels, preferred, input_size, reordered))]
    if not matches and len(candidates) == 1 and channels:
        # feature_info's width is not always the tensor's (HRNet's incre modules); a lone tensor is it.
        path, x = candidates[0]
        layout = _layout_of(x, (), preferred, input_size, reordered)
        matches = [(path, x, layout)] if layout else []
    if not matches:
        return None
    path, x, layout = max(matches, key=lambda m: (_positions_of(m[1], m[2]), -rank.index(m[2])))
    return _Probe(path, layout, tuple(x.shape[1:]))


class _Recorder:
    """Forward hooks (outputs) and pre-hooks (positional inputs) on named modules, for one dry forward."""

    def __init__(self, model: nn.Module, outputs: Sequence[str] = (), inputs: Sequence[str] = ()):
        self.model = model
        self.outputs: dict[str, list] = {name: [] for name in outputs}
        self.inputs: dict[str, list] = {name: [] for name in inputs}
        self.order: list[str] = []

    def run(self, input_size: tuple[int, int, int]) -> _Recorder:
        def on_output(name: str):
            def hook(_module, _args, output):
                self.outputs[name].append(output)
                self.order.append(name)
            return hook

        def on_input(name: str):
            def hook(_module, args):
                self.inputs[name].append(args)
            return hook

        handles = [self.model.get_submodule(name).register_forward_hook(on_output(name)) for name in self.outputs]
        handles += [self.model.get_submodule(name).register_forward_pre_hook(on_input(name)) for name in self.inputs]
        try:
            _dry_run(self.model, input_size)
        finally:
            for handle in handles:
                handle.remove()
        return self

    def output(self, name: str) -> Any | None:
        """The module's output, None unless it ran exactly once."""
        calls = self.outputs[name]
        return calls[0] if len(calls) == 1 else None

    def input(self, name: str) -> Any | None:
        calls = self.inputs[name]
        return calls[0] if len(calls) == 1 else None


@dataclass
class _Group:
    """The entries of one resolution, in execution order, and the stages it gets."""

    entries: list[FeatureEntry]
    units: list[str] = field(default_factory=list)  # what its stages are split along
    inner: bool = False  # units are the blocks inside its single entry
    stages: int = 1


def _groups(model: nn.Module, input_size, entries: list[FeatureEntry]) -> list[_Group]:
    recorder = _Recorder(model, [e.module for e in entries]).run(input_size)
    preferred = _model_layout(model)
    kept = []
    for entry in entries:
        raw = recorder.output(entry.module)
        channels = (entry.channels,) if entry.channels else ()
        if raw is not None and _probe_tensor(raw, channels, preferred, input_size) is not None:
            kept.append(entry)
    kept.sort(key=lambda e: recorder.order.index(e.module))
    groups: dict[float, _Group] = {}
    for entry in kept:
        groups.setdefault(entry.reduction, _Group([])).entries.append(entry)
    if not groups:
        raise ValueError(f"no feature_info entry of {type(model).__name__} is reached by a forward with a tensor "
                         "of its width")
    return list(groups.values())


def _block_lists(module: nn.Module, prefix: str) -> list[list[str]]:
    """Candidate block lists inside `module` (itself included): the children of its Sequential and ModuleList
    containers, shallowest and longest first."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Sequential, nn.ModuleList)) and len(sub) >= 2:
            base = f"{prefix}.{name}" if name else prefix
            blocks = [f"{base}.{child}" for child, _ in sub.named_children()]
            found.append((name.count(".") + bool(name), -len(sub), blocks))
    return [blocks for _, _, blocks in sorted(found, key=lambda f: f[:2])]


def _patch_positions(probe: _Probe, model: nn.Module, input_size, reduction: float) -> int:
    if probe.layout == "NLC":
        return probe.shape[0] - _prefix_count(probe.shape[0], model, input_size, (reduction,))
    return math.prod(probe.shape[1:] if probe.layout == "NCHW" else probe.shape[:2])


def _inner_blocks(model: nn.Module, input_size, entry: FeatureEntry) -> list[str]:
    """The blocks of the first block list inside the entry's module that run once each, in order, and each
    give a tensor of the entry's width and resolution; [] if there is none. Their layout may differ from the
    entry's if they are row-major tokens (PiT's blocks, before the tokens are laid back on the grid) or if
    a token-order rule says where their tokens belong (NesT's image blocks)."""
    candidates = _block_lists(model.get_submodule(entry.module), entry.module)
    if not candidates:
        return []
    names = [name for names in candidates for name in names]
    recorder = _Recorder(model, [entry.module, *dict.fromkeys(names)]).run(input_size)
    preferred = _model_layout(model)
    target = _probe_tensor(recorder.output(entry.module), (entry.channels,) if entry.channels else (), preferred,
                           input_size)
    width = _channels(target)
    positions = _patch_positions(target, model, input_size, entry.reduction)
    reordered = type(model).__name__ in _TOKEN_ORDER_RULES

    def fits(out: Any) -> bool:
        probe = _probe_tensor(out, (width,), preferred, input_size, reordered) if out is not None else None
        if probe is None or _channels(probe) != width:
            return False
        if probe.layout == target.layout:
            return probe.shape == target.shape
        return (probe.layout == "NLC" or reordered) and _patch_positions(probe, model, input_size,
                                                                  entry.reduction) == positions

    for blocks in candidates:
        if [name for name in recorder.order if name in blocks] == blocks and \
                all(fits(recorder.output(name)) for name in blocks):
            return blocks
    return []


def _allocate(model: nn.Module, input_size, groups: list[_Group]) -> list[_Group]:
    if len(groups) >= NUM_STAGES:
        return groups[-NUM_STAGES:]
    for group in groups:
        if len(group.entries) > 1:
            group.units = [e.module for e in group.entries]
        else:
            group.units = _inner_blocks(model, input_size, group.entries[0])
            group.inner = bool(group.units)
    if len(groups) == 1 and not groups[0].inner:
        depth = len(groups[0].units)
        if depth < NUM_STAGES:
            raise ValueError(f"an isotropic model needs at least {NUM_STAGES} blocks to give {NUM_STAGES} stages, "
                             f"this one has {depth}; use a deeper variant")
    for _ in range(NUM_STAGES - len(groups)):
        splittable = [g for g in groups if len(g.units) > g.stages]
        if not splittable:
            raise ValueError(f"{type(model).__name__} has {len(groups)} resolutions in feature_info and too few "
                             f"blocks in them to give {NUM_STAGES} stages; use a deeper variant")
        max(reversed(splittable), key=lambda g: len(g.units) / g.stages).stages += 1
    return groups


def _first_start(entry: FeatureEntry, previous: str | None) -> str:
    """A stage starts with the sibling after the previous stage's feature module, or is its own module."""
    if entry.start:
        return entry.start
    here, before = _index_path(entry.module), _index_path(previous) if previous else None
    if here and before and before[0] == here[0] and before[1] < here[1]:
        return f"{here[0]}.{before[1] + 1}"
    return entry.module


@dataclass(frozen=True)
class _Stage:
    end: str
    start: str
    reduction: float | None = None
    channels: int | None = None
    # The width and reduction of the feature before it, where feature_info says.
    input_channels: int | None = None
    input_reduction: float | None = None


def _stages(groups: list[_Group], all_entries: list[FeatureEntry]) -> list[_Stage]:
    names = [e.module for e in all_entries]

    def previous(entry: FeatureEntry) -> FeatureEntry | None:
        position = names.index(entry.module)
        return all_entries[position - 1] if position else None

    def first_start(entry: FeatureEntry) -> str:
        before = previous(entry)
        return _first_start(entry, before.module if before else None)

    def before(entry: FeatureEntry) -> tuple[int | None, float | None]:
        entry_before = previous(entry)
        return (entry_before.channels, entry_before.reduction) if entry_before else (None, None)

    stages = []
    fractions = ISOTROPIC_STAGE_FRACTIONS if len(groups) == 1 else None
    for group in groups:
        entry = group.entries[-1 if group.stages == 1 else 0]
        if group.stages == 1:
            stages.append(_Stage(entry.module, first_start(entry), entry.reduction, entry.channels, *before(entry)))
            continue
        points = _split_points(len(group.units), group.stages, fractions)
        for k, point in enumerate(points):
            start = first_start(entry) if k == 0 else group.units[points[k - 1] + 1]
            end = entry.module if group.inner and k == len(points) - 1 else group.units[point]
            channels = entry.channels if group.inner else next(e.channels for e in group.entries if e.module == end)
            stages.append(_Stage(end, start, entry.reduction, channels,
                                 *(before(entry) if k == 0 else (channels, entry.reduction))))
    return stages


# ---- showing the stage tensors ------------------------------------------------------------------------------


Reductions = tuple[float, ...]  # where a tensor may be: its stage's reduction, or the previous stage's


def _reduction_grid(count: int, input_size, reductions: Reductions) -> tuple[int, int] | None:
    """(rows, columns) of `count` patch tokens if one of the reductions gives that many."""
    height, width = input_size[-2:]
    for reduction in filter(None, reductions):
        for rows in (height // round(reduction), math.ceil(height / reduction)):
            for columns in (width // round(reduction), math.ceil(width / reduction)):
                if rows * columns == count:
                    return rows, columns
    return None


def _aspect_grid(count: int, input_size) -> tuple[int, int] | None:
    """(rows, columns) of `count` patch tokens on a grid of the image's aspect ratio."""
    height, width = input_size[-2:]
    rows = max(1, round(math.sqrt(count * height / width)))
    return (rows, count // rows) if count and rows * (count // rows) == count else None


def _token_grid(count: int, input_size, reductions: Reductions) -> tuple[int, int] | None:
    return _reduction_grid(count, input_size, reductions) or _aspect_grid(count, input_size)


MAX_PREFIX_TOKENS = 16


def _prefix_count(tokens: int, model: nn.Module, input_size, reductions: Reductions) -> int:
    """How many leading tokens are not patch tokens: as many as leave the reduction's grid (the model's
    declared prefix tokens first, then none: CaiT, XCiT and ConViT add their class token late; then any few:
    CoaT and PiT declare none), else as many as leave a grid of the image's shape."""
    declared = int(getattr(model, "num_prefix_tokens", 0) or 0)
    candidates = list(dict.fromkeys([declared, 0, *range(1, MAX_PREFIX_TOKENS + 1)]))
    for prefix in candidates:
        if tokens > prefix and _reduction_grid(tokens - prefix, input_size, reductions):
            return prefix
    for prefix in candidates[:2]:
        if tokens > prefix and _aspect_grid(tokens - prefix, input_size):
            return prefix
    return declared if tokens > declared else 0


@dataclass
class _Seen:
    probe: _Probe
    prefix: int = 0
    order: torch.Tensor | None = None


def _see(model: nn.Module, raw: Any, channels: tuple[int, ...], preferred: str, input_size,
         reductions: Reductions, order: torch.Tensor | None, what: str, first_if_unmatched: bool = False) -> _Seen:
    if raw is None:
        raise ValueError(f"{what} of {type(model).__name__} does not run exactly once with a positional input")
    reordered = order is not None
    probe = _probe_tensor(raw, channels, preferred, input_size, reordered)
    if probe is None and first_if_unmatched:
        # An input of a width no feature_info entry names (the stem's): the widest tensor argument it is.
        probe = _probe_tensor(raw, (), preferred, input_size, reordered)
    if probe is None:
        raise ValueError(f"{what} of {type(model).__name__} gives no (B, C, H, W), (B, H, W, C) or (B, L, C) tensor")
    prefix = _prefix_count(probe.shape[0], model, input_size, reductions) if probe.layout == "NLC" else 0
    return _Seen(probe, prefix, order)


def _view(seen: _Seen, as_map: bool, shown_prefix: int, input_size, reductions: Reductions, what: str) \
        -> TensorView:
    probe = seen.probe
    if probe.layout == "NCHW":
        return TensorView("NCHW", True, probe.path)
    if probe.layout == "NHWC":
        # Reordered NHWC tensors are not on their image grid (NesT's image blocks x tokens per block).
        grid = probe.shape[:2] if seen.order is None else _token_grid(math.prod(probe.shape[:2]), input_size,
                                                                      reductions)
        hidden, prefix = 0, 0
    else:
        hidden, prefix = (seen.prefix, 0) if as_map else (seen.prefix - shown_prefix, shown_prefix)
        grid = _token_grid(probe.shape[0] - seen.prefix, input_size, reductions) if as_map else None
        if as_map and grid is None:
            raise ValueError(f"the {probe.shape[0] - seen.prefix} tokens of {what} do not form a grid")
    return TensorView(probe.layout, as_map, probe.path, hidden, prefix, tuple(grid) if grid else None, seen.order)


def build_stage_plan(model: nn.Module, input_size: tuple[int, int, int]) -> StagePlan:
    """Decide the four stages of `model` from its `feature_info` and a few dry forwards."""
    entries = _feature_entries(model)
    stages = _stages(_allocate(model, input_size, _groups(model, input_size, entries)), entries)
    rule = _STAGE_RULES.get(type(model).__name__)
    if rule:
        ends, starts = rule(model, [s.end for s in stages], [s.start for s in stages])
        stages = [replace(s, end=end, start=start, channels=s.channels if end == s.end else None)
                  for s, end, start in zip(stages, ends, starts)]
    ends, starts = [s.end for s in stages], [s.start for s in stages]
    if len(set(ends)) != NUM_STAGES:
        raise ValueError(f"{type(model).__name__}: the stages end in {ends}, not four different modules")

    order_rule = _TOKEN_ORDER_RULES.get(type(model).__name__)

    def order(name: str, is_input: bool) -> torch.Tensor | None:
        return order_rule(model, name, is_input) if order_rule else None

    recorder = _Recorder(model, ends, starts).run(input_size)
    preferred = _model_layout(model)
    outputs = [_see(model, recorder.output(s.end), (s.channels,) if s.channels else (), preferred, input_size,
                    (s.reduction,), order(s.end, False), f"the end of stage {k + 1} ({s.end})")
               for k, s in enumerate(stages)]
    inputs = []
    for k, stage in enumerate(stages):
        widths = {_channels(o.probe) for o in outputs[max(k - 1, 0):k + 1]} | {stage.input_channels} - {None}
        args = recorder.input(stage.start)
        inputs.append(_see(model, args or None, tuple(widths), outputs[k].probe.layout, input_size,
                           (stage.reduction, stage.input_reduction), order(stage.start, True),
                           f"the input of stage {k + 1} ({stage.start})", first_if_unmatched=True))

    as_map = any(o.probe.layout == "NCHW" for o in outputs)
    shown_prefix = 0 if as_map else min(s.prefix for s in [*outputs, *inputs])
    return StagePlan(
        tuple(ends), tuple(starts),
        tuple(_view(o, as_map, shown_prefix, input_size, (s.reduction,), f"stage {k + 1}")
              for k, (o, s) in enumerate(zip(outputs, stages))),
        tuple(_view(i, as_map, shown_prefix, input_size, (s.reduction, s.input_reduction),
                    f"the input of stage {k + 1}") for k, (i, s) in enumerate(zip(inputs, stages))),
        shown_prefix)


def _channels(probe: _Probe) -> int:
    return probe.shape[0] if probe.layout == "NCHW" else probe.shape[-1]


@torch.no_grad()
def _dry_run(model: nn.Module, input_size) -> None:
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        model(torch.zeros(PROBE_BATCH, *input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)


def _classifiers(model: nn.Module) -> list[nn.Module]:
    """The module(s) whose input is the pooled feature: one head, or one per branch (CrossViT)."""
    classifier = model.get_classifier()
    if isinstance(classifier, tuple):  # (head, distillation head) of DeiT/LeViT-distilled: the same input
        classifier = classifier[0]
    heads = list(classifier) if isinstance(classifier, nn.ModuleList) else [classifier]
    # A whole classifier head (Sequencer's) pools inside: its final layer sees the pooled feature.
    return [head.fc if isinstance(getattr(head, "fc", None), nn.Module) else head for head in heads]


def _pooled(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The classifier input(s) as (B, C): a head that pools on its own gets the pooled (B, C, 1, 1) or tokens."""
    flat = [x.flatten(1) if x.ndim == 4 and x.shape[2:] == (1, 1) else x.mean(dim=(2, 3)) if x.ndim == 4
            else x.mean(dim=1) if x.ndim == 3 else x for x in inputs]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)


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
            _dry_run(self.model, self.input_size)
        if any(t is None for t in captured["stages"] + captured["inputs"]) or not captured["pooled"]:
            raise ValueError(f"{type(self.model).__name__}: a stage or the classifier is not reached by a forward")
        stage_shapes = [tuple(t.shape[1:]) for t in captured["stages"]]
        input_shapes = [tuple(t.shape[1:]) for t in captured["inputs"]]
        return stage_shapes, input_shapes, _pooled(captured["pooled"]).shape[-1]

    def __call__(self, x: torch.Tensor, prompts: Mapping[int, PromptFn] | None = None) -> StageOutput:
        with self._capture(prompts) as captured:
            logits = self.model(x)
        return StageOutput(captured["stages"], _pooled(captured["pooled"]), logits)

    @contextlib.contextmanager
    def _capture(self, prompts: Mapping[int, PromptFn] | None = None) -> Iterator[dict]:
        """Hooks live only for one forward, so copies of the model (EMA, DDP) never inherit them."""
        stages: list[torch.Tensor | None] = [None] * NUM_STAGES
        inputs: list[torch.Tensor | None] = [None] * NUM_STAGES
        captured: dict = {"stages": stages, "inputs": inputs, "pooled": []}
        prompts = prompts or {}
        handles = []

        def on_stage_input(k: int, view: TensorView):
            def hook(_module, args):
                x = view.to_canonical(args)
                inputs[k] = x
                if k in prompts:
                    return view.from_canonical(prompts[k](x), args)
                return None
            return hook

        def on_stage_output(k: int, view: TensorView):
            def hook(_module, _args, output):
                stages[k] = view.to_canonical(output)
            return hook

        def on_classifier_input(_module, args):
            captured["pooled"].append(args[0])

        plan = self.plan
        try:
            for k in range(NUM_STAGES):
                handles.append(self.model.get_submodule(plan.starts[k]).register_forward_pre_hook(
                    on_stage_input(k, plan.inputs[k])))
                handles.append(self.model.get_submodule(plan.ends[k]).register_forward_hook(
                    on_stage_output(k, plan.outputs[k])))
            for classifier in _classifiers(self.model):
                handles.append(classifier.register_forward_pre_hook(on_classifier_input))
            yield captured
        finally:
            for handle in handles:
                handle.remove()
