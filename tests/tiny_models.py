"""Tiny random-init variants of every model family the distillers must handle, all at 32x32 input.

Each entry is a real timm variant name with constructor overrides, so the stage layer sees the real classes
(ResNet, ConvNeXt, EfficientNet, VisionTransformer, SwinTransformer, MlpMixer, RegNet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pat_hf.models.factory import create_model

torch.set_num_threads(1)

IMAGE_SIZE = 32
INPUT_SIZE = (3, IMAGE_SIZE, IMAGE_SIZE)
NUM_CLASSES = 10

# family -> (timm variant, overrides)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("test_resnet", {}),
    "convnext": ("test_convnext", {}),
    "efficientnet": ("test_efficientnet", {}),
    "vit": ("test_vit", {"img_size": IMAGE_SIZE, "patch_size": 4}),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": IMAGE_SIZE, "embed_dim": 16, "window_size": 2,
                                              "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2),
                                              "drop_path_rate": 0.0}),
    "mixer": ("mixer_s16_224", {"img_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 32, "num_blocks": 4}),
    "resmlp": ("resmlp_12_224", {"img_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 32, "num_blocks": 4}),
    # A hierarchical family that only the generic feature_info path of the stage layer handles.
    "regnet": ("regnetx_002", {"depth": 6, "w0": 8, "wa": 12, "wm": 2.0, "group_size": 8, "stem_width": 8}),
}

SEQUENCE_FAMILIES = ("vit", "swin", "mixer", "resmlp")


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of `family` (deterministic for a given seed)."""
    name, overrides = TINY_MODELS[family]
    torch.manual_seed(seed)
    return create_model(name, NUM_CLASSES, overrides)


def tiny_batch(batch_size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, *INPUT_SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return images, labels
