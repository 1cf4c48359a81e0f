"""Datasets, transforms and mixing: `datasets` for loading, timm for every transform and for Mixup/CutMix.

Every source is normalised to two columns, `image` (PIL) and `label` (ClassLabel), and a train and an
evaluation split. Transforms run lazily (`set_transform`), so augmentation differs from epoch to epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from PIL import Image
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from pat_hf.arguments import DataArguments

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
EVAL_SPLIT_CANDIDATES = ("validation", "val", "valid", "test")


@dataclass(frozen=True)
class DatasetSource:
    """How to load a known dataset: where it lives and which columns hold the image and the label."""

    path: str
    image_column: str
    label_column: str
    eval_split: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    eval_interpolation: str | None = None


KNOWN_DATASETS = {
    # The reference normalises CIFAR with its own statistics and evaluates with bilinear resizing (docs/REFERENCE.md,
    # Data).
    "cifar100": DatasetSource("uoft-cs/cifar100", "img", "fine_label", "test", CIFAR_MEAN, CIFAR_STD, "bilinear"),
    "imagenet-1k": DatasetSource("ILSVRC/imagenet-1k", "image", "label", "validation"),
}
# Teacher and student see the same normalised images, whatever their timm configs say: like CIFAR, the shipped
# digits get statistics of their own (pixel mean and std over the whole set, grey replicated to RGB).
DIGITS = DatasetSource("digits", "image", "label", "validation", (0.3053,) * 3, (0.3759,) * 3)
KNOWN_DATASETS["uoft-cs/cifar100"] = KNOWN_DATASETS["cifar100"]
KNOWN_DATASETS["imagenet"] = KNOWN_DATASETS["ILSVRC/imagenet-1k"] = KNOWN_DATASETS["imagenet-1k"]


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), split 80/20 stratified, as PIL images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, eval_idx = train_test_split(np.arange(len(pixels)), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict({"image": [Image.fromarray(pixels[i], mode="L") for i in indices],
                                  "label": digits.target[indices].tolist()}, features=features)

    return DatasetDict(train=split(train_idx), validation=split(eval_idx))


def _load_from_hub(name: str, config_name: str | None = None) -> DatasetDict:
    try:
        return datasets.load_dataset(name, config_name)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        offline = " (offline mode is on)" if datasets.config.HF_HUB_OFFLINE else ""
        raise ConnectionError(f"cannot load dataset {name!r} from the Hugging Face Hub{offline}: go online, or "
                              f"pass a local train/val image folder or a save_to_disk directory "
                              f"as --dataset ({type(error).__name__})") from None


def _load_raw(args: DataArguments) -> tuple[DatasetDict, DatasetSource | None]:
    name = args.dataset
    if name == "digits":
        return load_digits_dataset(), DIGITS
    local = args.data_dir or (name if os.path.isdir(name) else None)
    if local:
        if not os.path.isdir(local):
            raise FileNotFoundError(f"dataset directory not found: {local}")
        if os.path.isfile(os.path.join(local, "dataset_dict.json")):
            return datasets.load_from_disk(local), None
        return datasets.load_dataset("imagefolder", data_dir=local), None
    source = KNOWN_DATASETS.get(name)
    return _load_from_hub(source.path if source else name, args.dataset_config_name), source


def _pick_column(dataset: Dataset, requested: str | None, default: str | None, kind: type, what: str) -> str:
    columns = list(dataset.features)
    if requested:
        if requested not in columns:
            raise ValueError(f"the dataset has no column {requested!r} (columns: {', '.join(columns)}); "
                             f"pass --{what}-column NAME")
        return requested
    if default and default in columns:
        return default
    typed = [c for c, feature in dataset.features.items() if isinstance(feature, kind)]
    if not typed:
        raise ValueError(f"cannot tell which column holds the {what} (columns: {', '.join(columns)}); "
                         f"pass --{what}-column NAME")
    return typed[0]


def _pick_eval_split(splits: DatasetDict, requested: str | None, default: str | None) -> str:
    if requested:
        if requested not in splits:
            raise ValueError(f"no split {requested!r} in the dataset (splits: {', '.join(splits)})")
        return requested
    for candidate in (default, *EVAL_SPLIT_CANDIDATES):
        if candidate in splits:
            return candidate
    raise ValueError(f"no evaluation split among {', '.join(splits)}; pass --val-split NAME")


def load_splits(args: DataArguments) -> tuple[Dataset, Dataset, DatasetSource | None]:
    """(train, eval, source) with columns `image` and `label` only."""
    splits, source = _load_raw(args)
    if args.train_split not in splits:
        raise ValueError(f"no split {args.train_split!r} in the dataset (splits: {', '.join(splits)})")
    train = splits[args.train_split]
    image_column = _pick_column(train, args.image_column, source and source.image_column, datasets.Image, "image")
    label_column = _pick_column(train, args.label_column, source and source.label_column, ClassLabel, "label")
    eval_split = _pick_eval_split(splits, args.val_split, source and source.eval_split)
    normalised = []
    for split, limit in ((train, args.max_train_samples), (splits[eval_split], args.max_eval_samples)):
        split = split.select_columns([image_column, label_column])
        split = split.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
        normalised.append(split.select(range(min(limit, len(split)))) if limit else split)
    return normalised[0], normalised[1], source


def num_classes_of(dataset: Dataset) -> int:
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return int(max(dataset["label"])) + 1


def class_names_of(dataset: Dataset) -> list[str] | None:
    feature = dataset.features["label"]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


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


def attach_transform(dataset: Dataset, transform: Callable, with_index: bool = False) -> Dataset:
    """Lazily turn `image`/`label` rows into `pixel_values`/`labels` (and `index`, the row's position)."""
    if with_index:
        dataset = dataset.add_column("index", list(range(len(dataset))))

    def apply(batch: dict[str, list]) -> dict[str, list]:
        out = {"pixel_values": [transform(image.convert("RGB")) for image in batch["image"]],
               "labels": batch["label"]}
        if with_index:
            out["index"] = batch["index"]
        return out

    dataset.set_transform(apply)
    return dataset


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
             "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}
    if "index" in examples[0]:
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


@dataclass
class MixupCollator:
    """Collates training batches and mixes them with timm's Mixup/CutMix, which also smooths the labels
    (the reference's collate-time mixing). `mixup_enabled` is switched off at --mixup-off-epoch."""

    mixup: Mixup

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(examples)
        batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"])
        return batch


def mixup_active(args: DataArguments) -> bool:
    return args.mixup > 0 or args.cutmix > 0


def build_mixup(args: DataArguments, num_classes: int, batch_size: int) -> Mixup | None:
    if not mixup_active(args):
        return None
    if batch_size % 2:
        raise ValueError(f"mixup/cutmix needs an even batch size, got --batch-size {batch_size}")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
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
