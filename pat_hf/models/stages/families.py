"""Per-family rules: where timm's `feature_info` is wrong for a family, or the reference chose otherwise.

This is the file to extend when a timm family needs its stages chosen differently: register a rule for its
model class name with the decorator of the kind of rule it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace

import torch
from timm.models.nest import deblockify
from torch import nn

from pat_hf.models.stages.plan import FeatureEntry

FeatureRule = Callable[[nn.Module, list[FeatureEntry]], list[FeatureEntry]]
StageRule = Callable[[nn.Module, list[str], list[str]], tuple[list[str], list[str]]]
TokenOrderRule = Callable[[nn.Module, str, bool], torch.Tensor | None]
FEATURE_RULES: dict[str, FeatureRule] = {}
STAGE_RULES: dict[str, StageRule] = {}
TOKEN_ORDER_RULES: dict[str, TokenOrderRule] = {}


def _register(table: dict, *class_names: str):
    def decorator(fn):
        for name in class_names:
            table[name] = fn
        return fn

    return decorator


@_register(FEATURE_RULES, "Twins", "MultiScaleVit")
def _feature_rule_block_is_named_blocks_or_stages(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # Their feature_info names `block.k`; the modules are `blocks.k` (Twins) and `stages.k` (MViTv2).
    container = "blocks" if hasattr(model, "blocks") else "stages"
    return [replace(e, module=re.sub(r"^block\.", f"{container}.", e.module)) for e in entries]


@_register(FEATURE_RULES, "CoaT")
def _feature_rule_serial_blocks(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # feature_info names the parallel blocks, which mix all four scales at once, for scales 2-4; the serial
    # blocks give each scale on its own, in order.
    return [replace(e, module=f"serial_blocks{i + 1}") for i, e in enumerate(entries)]


@_register(FEATURE_RULES, "CrossVit")
def _feature_rule_widest_branch(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # Each multi-scale block runs both branches; the stages are the transformer blocks of the branch with the
    # most of them (a ViT of its own), whose outputs do not yet include the cross-branch fusion.
    depths = [sum(len(block.blocks[b]) for block in model.blocks) for b in range(model.num_branches)]
    branch = max(range(model.num_branches), key=lambda b: (depths[b], b))
    reduction = max(e.reduction for e in entries)
    return [FeatureEntry(f"blocks.{i}.blocks.{branch}.{j}", reduction, model.embed_dim[branch])
            for i, block in enumerate(model.blocks) for j in range(len(block.blocks[branch]))]


@_register(FEATURE_RULES, "HighResolutionNet")
def _feature_rule_hrnet_incre_modules(model: nn.Module, entries: list[FeatureEntry]) -> list[FeatureEntry]:
    # feature_info names `stem` and `stageN`, which are no modules (or give all branches at once); the widths
    # it gives are those of the classifier's incre modules, one per branch, finest first.
    return [replace(e, module=f"incre_modules.{i}") for i, e in enumerate(entries[1:])]


@_register(STAGE_RULES, "SwinTransformer")
def _stage_rule_swin_prompts_after_patch_merging(model: nn.Module, ends: list[str],
                                                 starts: list[str]) -> tuple[list[str], list[str]]:
    return ends, [f"{end}.blocks" for end in ends]


@_register(STAGE_RULES, "EfficientNet")
def _stage_rule_efficientnet_head_conv_is_stage_four(model: nn.Module, ends: list[str],
                                                     starts: list[str]) -> tuple[list[str], list[str]]:
    return [*ends[:3], "bn2"], starts


@_register(TOKEN_ORDER_RULES, "Hiera")
def _token_order_hiera_units(model: nn.Module, module: str, is_input: bool) -> torch.Tensor | None:
    """Hiera keeps its tokens "unrolled" (grouped by pooling unit); its Reroll says where each one belongs."""
    index = int(module.split(".")[1])
    block = max(index - 1, 0) if is_input else index
    schedule, size = model.reroll.schedule[block]
    count = math.prod(size)
    positions = torch.arange(count, dtype=torch.float32).reshape(1, count, 1)
    return model.reroll(positions, block).flatten().long()


@_register(TOKEN_ORDER_RULES, "Nest")
def _token_order_nest_image_blocks(model: nn.Module, module: str, is_input: bool) -> torch.Tensor | None:
    """NesT's transformer blocks see (B, image blocks, tokens per block, C); deblockify says where each is."""
    match = re.fullmatch(r"levels\.(\d+)\.transformer_encoder\.\d+", module)
    if not match:
        return None
    level = model.levels[int(match.group(1))]
    blocks, tokens = level.pos_embed.shape[1:3]
    positions = torch.arange(blocks * tokens, dtype=torch.float32).reshape(1, blocks, tokens, 1)
    return deblockify(positions, level.block_size).flatten().long()
