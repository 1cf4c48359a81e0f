"""Choosing the four stages of a model from its `feature_info` and a few dry forwards, and building its plan.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from pat_hf.models.dry_run import dry_run
from pat_hf.models.stages.families import FEATURE_RULES, STAGE_RULES, TOKEN_ORDER_RULES
from pat_hf.models.stages.plan import (
    ISOTROPIC_STAGE_FRACTIONS,
    NUM_STAGES,
    PROBE_BATCH,
    FeatureEntry,
    StagePlan,
)
from pat_hf.models.stages.views import (
    ProbedTensor,
    model_layout,
    prefix_count,
    probe_channels,
    probe_tensor,
    see_tensor,
    tensor_view,
)


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
    rule = FEATURE_RULES.get(type(model).__name__)
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
            dry_run(self.model, input_size, PROBE_BATCH)
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
    preferred = model_layout(model)
    kept = []
    for entry in entries:
        raw = recorder.output(entry.module)
        channels = (entry.channels,) if entry.channels else ()
        if raw is not None and probe_tensor(raw, channels, preferred, input_size) is not None:
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


def _patch_positions(probe: ProbedTensor, model: nn.Module, input_size, reduction: float) -> int:
    if probe.layout == "NLC":
        return probe.shape[0] - prefix_count(probe.shape[0], model, input_size, (reduction,))
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
    preferred = model_layout(model)
    target = probe_tensor(recorder.output(entry.module), (entry.channels,) if entry.channels else (), preferred,
                           input_size)
    width = probe_channels(target)
    positions = _patch_positions(target, model, input_size, entry.reduction)
    reordered = type(model).__name__ in TOKEN_ORDER_RULES

    def fits(out: Any) -> bool:
        probe = probe_tensor(out, (width,), preferred, input_size, reordered) if out is not None else None
        if probe is None or probe_channels(probe) != width:
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


def build_stage_plan(model: nn.Module, input_size: tuple[int, int, int]) -> StagePlan:
    """Decide the four stages of `model` from its `feature_info` and a few dry forwards."""
    entries = _feature_entries(model)
    stages = _stages(_allocate(model, input_size, _groups(model, input_size, entries)), entries)
    rule = STAGE_RULES.get(type(model).__name__)
    if rule:
        ends, starts = rule(model, [s.end for s in stages], [s.start for s in stages])
        stages = [replace(s, end=end, start=start, channels=s.channels if end == s.end else None)
                  for s, end, start in zip(stages, ends, starts)]
    ends, starts = [s.end for s in stages], [s.start for s in stages]
    if len(set(ends)) != NUM_STAGES:
        raise ValueError(f"{type(model).__name__}: the stages end in {ends}, not four different modules")

    order_rule = TOKEN_ORDER_RULES.get(type(model).__name__)

    def order(name: str, is_input: bool) -> torch.Tensor | None:
        return order_rule(model, name, is_input) if order_rule else None

    recorder = _Recorder(model, ends, starts).run(input_size)
    preferred = model_layout(model)
    outputs = [see_tensor(model, recorder.output(s.end), (s.channels,) if s.channels else (), preferred, input_size,
                    (s.reduction,), order(s.end, False), f"the end of stage {k + 1} ({s.end})")
               for k, s in enumerate(stages)]
    inputs = []
    for k, stage in enumerate(stages):
        widths = {probe_channels(o.probe) for o in outputs[max(k - 1, 0):k + 1]} | {stage.input_channels} - {None}
        args = recorder.input(stage.start)
        inputs.append(see_tensor(model, args or None, tuple(widths), outputs[k].probe.layout, input_size,
                           (stage.reduction, stage.input_reduction), order(stage.start, True),
                           f"the input of stage {k + 1} ({stage.start})", first_if_unmatched=True))

    as_map = any(o.probe.layout == "NCHW" for o in outputs)
    shown_prefix = 0 if as_map else min(s.prefix for s in [*outputs, *inputs])
    return StagePlan(
        tuple(ends), tuple(starts),
        tuple(tensor_view(o, as_map, shown_prefix, input_size, (s.reduction,), f"stage {k + 1}")
              for k, (o, s) in enumerate(zip(outputs, stages))),
        tuple(tensor_view(i, as_map, shown_prefix, input_size, (s.reduction, s.input_reduction),
                    f"the input of stage {k + 1}") for k, (i, s) in enumerate(zip(inputs, stages))),
        shown_prefix)
