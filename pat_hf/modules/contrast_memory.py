"""CRD's memory banks: a momentum-averaged, l2-normalised embedding per training example, one bank per model.

An embedding of one model is scored against the other model's bank rows for the positive and the sampled
negatives, exp(<bank row, embedding> / T) / Z, where each side's Z is frozen at its first batch's value
(mean score * N), as in the reference's ContrastMemory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ContrastMemory(nn.Module):
    def __init__(self, dim: int, num_examples: int, temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        self.temperature = temperature
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("student_bank", torch.rand(num_examples, dim) * 2 * bound - bound)
        self.register_buffer("teacher_bank", torch.rand(num_examples, dim) * 2 * bound - bound)
        # Z of the student-embedding and teacher-embedding scores; negative until the first batch sets them.
        self.register_buffer("normalisers", torch.full((2,), -1.0))

    @property
    def num_examples(self) -> int:
        return self.student_bank.shape[0]

    def forward(self, student_embed: torch.Tensor, teacher_embed: torch.Tensor,
                contrast_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, 1 + K) of the student embedding against the teacher bank, and of the teacher embedding
        against the student bank, at `contrast_index` (positive first)."""
        # exp(1 / 0.07) overflows half precision.
        with torch.autocast(student_embed.device.type, enabled=False):
            scores = [torch.exp(torch.einsum("bkd,bd->bk", bank[contrast_index], embed.float()) / self.temperature)
                      for bank, embed in ((self.teacher_bank, student_embed), (self.student_bank, teacher_embed))]
        first = torch.stack([s.detach().mean() * self.num_examples for s in scores])
        self.normalisers.copy_(torch.where(self.normalisers < 0, first, self.normalisers))
        return scores[0] / self.normalisers[0], scores[1] / self.normalisers[1]

    @torch.no_grad()
    def update(self, index: torch.Tensor, student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> None:
        for bank, embed in ((self.student_bank, student_embed), (self.teacher_bank, teacher_embed)):
            rows = bank[index] * self.momentum + embed.float() * (1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))
