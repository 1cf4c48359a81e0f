"""Negatives for contrastive distillation: training examples of classes other than the anchor's.

The reference's CRD dataset drew, for every example, K indices uniformly with replacement among all training
examples of the other classes. This does the same on the device, from the class of every training example,
without per-class index lists: examples are sorted by class, a position is drawn among the N - n_c positions
outside the anchor's class block and shifted past the block.
"""

from __future__ import annotations

import torch
from torch import nn


class NegativeSampler(nn.Module):
    def __init__(self, labels: torch.Tensor):
        super().__init__()
        labels = torch.as_tensor(labels).long().flatten()
        counts = torch.bincount(labels)
        largest = int(counts.argmax())
        self.smallest_pool = len(labels) - int(counts[largest])
        if self.smallest_pool == 0:
            raise ValueError(f"all {len(labels)} training examples are of class {largest}, so it has no negatives")
        # Derived from the dataset at construction; checkpoints need not carry them.
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def forward(self, index: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) dataset indices of examples whose class differs from that of example `index[b]`."""
        classes = self.labels[index]
        count, start = self.class_count[classes].unsqueeze(1), self.class_start[classes].unsqueeze(1)
        pool = len(self.labels) - count
        uniform = torch.rand(len(index), k, dtype=torch.float64, device=index.device)
        position = (uniform * pool).long()
        position = position + (position >= start).long() * count
        return self.by_class[position]
