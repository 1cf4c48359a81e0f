"""Transforms, batches and mixing: timm's transforms for every split, Mixup/CutMix sharing one switch draw
across processes, and the training criterion (label smoothing, soft targets or BCE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from pat_hf.config.arguments import DataArguments
from pat_hf.data.decoding import RESUME_SKIPPED, SKIPPED_IMAGES
from pat_hf.data.sources import DatasetSource


def resolve_data_config_for(args: DataArguments, student: torch.nn.Module, img_size: int | None,
                            source: DatasetSource | None) -> dict[str, Any]:
    """timm's data config of the student, with the flags' and the dataset's overrides."""
    overrides = {"img_size": img_size, "crop_pct": args.crop_pct, "interpolation": args.interpolation or None,
                 "mean": tuple(args.mean) or None, "std": tuple(args.std) or None}
    config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=student)
    if source and source.mean and not args.mean:
        config.update(mean=source.mean, std=source.std)
    if source and source.eval_interpolation and not args.interpolation:
        config["interpolation"] = source.eval_interpolation
    return config


def build_transforms(args: DataArguments, data_config: dict[str, Any]) -> tuple[Callable, Callable]:
    common = {"input_size": data_config["input_size"], "mean": data_config["mean"], "std": data_config["std"]}
    train = create_transform(
        **common, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    evaluation = create_transform(**common, is_training=False, interpolation=data_config["interpolation"],
                                  crop_pct=data_config["crop_pct"])
    return train, evaluation


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks the readable examples (evaluation batches; unreadable images were logged as they were met)."""
    readable = [e for e in examples if e["pixel_values"] is not None]
    if not readable:
        raise ValueError(f"none of the {len(examples)} images of a batch could be read (first: "
                         f"{examples[0]['error']}): check the data")
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in readable]),
             "labels": torch.tensor([e["labels"] for e in readable], dtype=torch.long)}
    if "index" in readable[0]:
        batch["index"] = torch.tensor([e["index"] for e in readable], dtype=torch.long)
    if "labelled" in readable[0]:
        batch["labelled"] = torch.tensor([e["labelled"] for e in readable], dtype=torch.bool)
    return batch


def collate_training(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`collate`, with `skipped_images`: how many unreadable images the batch lost."""
    if RESUME_SKIPPED in examples[0]:
        return {RESUME_SKIPPED: torch.tensor(len(examples))}
    batch = collate(examples)
    batch[SKIPPED_IMAGES] = torch.tensor(len(examples) - len(batch["labels"]))
    return batch


class SharedSwitchMixup(Mixup):
    """timm's Mixup whose on/off switch (`mixup_enabled`, turned off at --mixup-off-epoch by the main process)
    lives in shared memory, so that persistent data workers, which mix in the collator, see it change."""

    def __init__(self, *args, **kwargs):
        self._enabled = torch.ones((), dtype=torch.bool).share_memory_()
        super().__init__(*args, **kwargs)

    @property
    def mixup_enabled(self) -> bool:
        return bool(self._enabled)

    @mixup_enabled.setter
    def mixup_enabled(self, enabled: bool) -> None:
        self._enabled.fill_(bool(enabled))


def mixed_labelled(labelled: torch.Tensor) -> torch.Tensor:
    """Which examples of a mixed batch keep a ground-truth target: timm mixes example i with example B-1-i (every
    mode), so a mixed target is known only when both are labelled. A pair counts as mixed even where timm drew
    no mixing for it (--mixup-prob below 1, elem/pair modes): its mixing weight is not returned."""
    return labelled & labelled.flip(0)


@dataclass
class MixupCollator:
    """Collates training batches and mixes them with timm's Mixup/CutMix, which also smooths the labels
    (the reference's collate-time mixing). `mixup_enabled` is switched off at --mixup-off-epoch. A batch with
    `labelled` keeps it true only where the mixed target is known (`mixed_labelled`)."""

    mixup: Mixup

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_training(examples)
        if RESUME_SKIPPED in batch:
            return batch
        if len(batch["labels"]) % 2:
            # timm mixes the batch with its mirror image and needs pairs: a batch that lost an odd number of
            # unreadable images loses one more example.
            if len(batch["labels"]) == 1:
                raise ValueError("only one image of a mixup batch could be read: check the data")
            batch = {k: v if k == SKIPPED_IMAGES else v[:-1] for k, v in batch.items()}
        labels = batch["labels"]
        if "labelled" in batch:
            # timm's one-hot needs a class: an unlabelled example lends class 0 to a target that is never used.
            labels = labels.clamp(min=0)
            if self.mixup.mixup_enabled:
                batch["labelled"] = mixed_labelled(batch["labelled"])
        batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], labels)
        return batch


def mixup_active(args: DataArguments) -> bool:
    return args.mixup > 0 or args.cutmix > 0


def build_mixup(args: DataArguments, num_classes: int, batch_size: int) -> Mixup | None:
    if not mixup_active(args):
        return None
    if batch_size % 2:
        raise ValueError(f"mixup/cutmix needs an even batch size, got --batch-size {batch_size}")
    return SharedSwitchMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                             switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                             num_classes=num_classes)


def build_criterion(args: DataArguments, bce_loss: bool = False) -> torch.nn.Module:
    """The training criterion the reference picks (docs/REFERENCE.md, Data); evaluation always uses plain
    cross-entropy."""
    if mixup_active(args):
        return BinaryCrossEntropy() if bce_loss else SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return BinaryCrossEntropy(smoothing=args.smoothing) if bce_loss else LabelSmoothingCrossEntropy(
            args.smoothing)
    return torch.nn.CrossEntropyLoss()
