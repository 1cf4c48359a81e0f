"""Decoding at draw time: any readable image becomes 8-bit RGB; an unreadable one is skipped and counted (or,
with --strict-images, stops the run naming it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)


# The batch key carrying how many examples of the batch were dropped as unreadable (a tensor, so that it
# survives data-loader worker processes); the trainer pops it before the model sees the batch.
SKIPPED_IMAGES = "skipped_images"
# Examples and batches a resumed streaming run passes over without decoding (it trained on them already).
RESUME_SKIPPED = "resume_skipped"
# How a label column marks an unlabelled row, and the label an unlabelled example carries up to the batch.
UNLABELLED = -1
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# What PIL raises on a file that is not an image, is truncated or cannot become RGB (SyntaxError: some
# plugins' header parsers).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit grey keeps its 8 high bits (PIL's own conversion clips it to white),
    transparency is composited over white, CMYK / palette / grey convert as PIL does."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(levels.astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


_DECODER = datasets.Image()


@dataclass(frozen=True)
class ExampleReader:
    """Turns an encoded image (`{"bytes", "path"}`) and its label into a model input. An unreadable image gives
    `pixel_values` None, which the collator drops and counts, or with `strict_images` an error naming it.
    With `allow_unlabelled`, label -1 marks an unlabelled example and every example says whether it is
    `labelled`."""

    transform: Callable[[Image.Image], torch.Tensor]
    num_classes: int | None = None
    strict_images: bool = False
    split: str = "training"
    allow_unlabelled: bool = False

    def read(self, encoded: dict[str, Any], label: int, where: str) -> dict[str, Any]:
        where = encoded.get("path") or where
        unlabelled = self.allow_unlabelled and label == UNLABELLED
        if self.num_classes is not None and not unlabelled and not 0 <= label < self.num_classes:
            hint = ("; --allow-unlabelled trains on -1 rows with the distillation terms alone"
                    if self.split == "training" and not self.allow_unlabelled else "")
            raise ValueError(f"label {label} of {where} is outside 0..{self.num_classes - 1}: use a labelled split "
                             f"(--train-split / --val-split) or fix the label column{hint}")
        example = self._decode(encoded, label, where)
        if self.allow_unlabelled:
            example["labelled"] = not unlabelled
        return example

    def _decode(self, encoded: dict[str, Any], label: int, where: str) -> dict[str, Any]:
        try:
            image = to_rgb(_DECODER.decode_example(encoded))
        except UNREADABLE_IMAGE_ERRORS as error:
            problem = "not an image file" if isinstance(error, UnidentifiedImageError) else str(error)
            if self.strict_images:
                raise ValueError(f"unreadable image {where} ({problem}); fix or remove it, or drop --strict-images "
                                 f"to skip unreadable images") from None
            logger.warning("skipped unreadable image %s (%s); --strict-images stops at such images instead",
                           where, problem)
            return {"pixel_values": None, "labels": label, "error": f"{where}: {problem}"}
        return {"pixel_values": self.transform(image), "labels": label}


class ImageExamples(torch.utils.data.Dataset):
    """A map-style split whose rows become `pixel_values`/`labels` (and `index`, the row's position) as they
    are drawn; the images stay encoded until then. `labelled` (one bool per row, for a reader that allows
    unlabelled examples) hides the labels of the rows it marks False."""

    def __init__(self, dataset: Dataset, reader: ExampleReader, with_index: bool = False,
                 labelled: np.ndarray | None = None):
        if labelled is not None and not reader.allow_unlabelled:
            raise ValueError("hiding labels needs a reader that allows unlabelled examples")
        self.features, self.split = dataset.features, dataset.split
        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.reader = reader
        self.with_index = with_index
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        rows = self.dataset[indices]
        examples = []
        for index, encoded, label in zip(indices, rows["image"], rows["label"]):
            if self.labelled is not None and not self.labelled[index]:
                label = UNLABELLED
            example = self.reader.read(encoded, label, f"{self.reader.split} row {index}")
            if self.with_index:
                example["index"] = index
            examples.append(example)
        return examples

