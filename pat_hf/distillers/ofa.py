"""OFA (One-for-All KD, Hao et al. 2023): branch classifiers on intermediate student stages learn the teacher's
logits through the OFA loss, and so do the student's own logits (docs/REFERENCE.md, Distillers).

Loss = CE + kd_w * OFA(z_s, z_t, eps_last) + ofa_w * sum over stages OFA(head_k(f_s,k), z_t, eps_k).

The reference sizes every head's width as max(D_s, D_t), the pooled dims from its 224-pixel stage tables,
which are wrong for narrowed models; we take them from the real models, and `from_reference_state` reads
the width back from a reference state. For token students (ViT, Swin, MLP) the reference crashes
(docs/REFERENCE.md, Distillers); here the prefix tokens are dropped and the grid is merged down to the resolution of a
standard last stage (input side / 32, i.e. the reference's 7 at 224 pixels), whatever its size.

Unlabelled examples (--label-fraction, --allow-unlabelled): no CE; the OFA terms, which add the one-hot label to
the teacher's distribution before raising it to eps, take the teacher's predicted class as that label
(docs/REFERENCE.md, Few labels).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pat_hf.distillers.base import (
    DistillArguments,
    DistillContext,
    Distiller,
    check_stage_selection,
    register_distiller,
)
from pat_hf.models.stages.plan import NUM_STAGES
from pat_hf.modules.branch_heads import MapBranchHead, TokenBranchHead
from pat_hf.modules.projectors import init_weights
from pat_hf.modules.token_grid import FeatureGrid

# The resolution of a standard last stage, relative to the input (7 at 224 pixels).
LAST_STAGE_STRIDE = 32
TOKEN_HEAD_ATTENTION_HEADS = 4


@dataclass
class OFAArguments:
    ofa_eps: list[float] = field(default_factory=lambda: [1.0], metadata={
        "help": "exponent on the teacher's target distribution, one per stage plus one for the final logits "
                "(a single value is used everywhere)"})
    ofa_stage: list[int] = field(default_factory=lambda: [1, 2, 3, 4],
                                 metadata={"help": "student stages (1-4) that get a branch classifier"})
    ofa_loss_weight: float = field(default=1.0, metadata={"help": "weight of the branch classifiers' loss"})
    ofa_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the OFA loss"})

    def __post_init__(self):
        check_stage_selection("--ofa-stage", self.ofa_stage)
        if len(self.ofa_eps) not in (1, len(self.ofa_stage) + 1):
            raise ValueError(f"--ofa-eps needs 1 or {len(self.ofa_stage) + 1} values (one per stage and one for "
                             f"the logits), got {self.ofa_eps}")


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target_mask: torch.Tensor, eps: float,
             temperature: float = 1.0) -> torch.Tensor:
    """mean_b sum_c -((p_t + m)^eps - m) * log p_s with p = softmax(z / T) and m the one-hot label.

    The target class is weighted (1 + p_t)^eps - 1, the others p_t^eps; there is no T^2 factor."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    weight = (p_teacher + target_mask) ** eps - target_mask
    return (-weight * log_p_student).sum(dim=-1).mean()


@register_distiller("ofa")
class OFA(Distiller):
    supports_unlabelled = True
    reference_renames = (
        # Map heads: `projector.<stage>.<block>.op.<layer>` separable downsampling blocks.
        (r"^projector\.(\d+)\.(\d+)\.op\.0\.", r"branch_heads.\1.features.\2.downsample_dw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.1\.", r"branch_heads.\1.features.\2.downsample_pw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.2\.", r"branch_heads.\1.features.\2.downsample_bn."),
        (r"^projector\.(\d+)\.(\d+)\.op\.4\.", r"branch_heads.\1.features.\2.mix_dw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.5\.", r"branch_heads.\1.features.\2.mix_pw."),
        (r"^projector\.(\d+)\.(\d+)\.op\.6\.", r"branch_heads.\1.features.\2.mix_bn."),
        # Token heads: patch mergers inside a token-bypass wrapper, then ViT blocks.
        (r"^projector\.(\d+)\.0\.fn\.", r"branch_heads.\1.downsample."),
        (r"^projector\.(\d+)\.1\.(\d+)\.", r"branch_heads.\1.blocks.\2."),
        # The last stage's map head starts with a 1x1 conv; every head ends with its classifier.
        (r"^projector\.(\d+)\.0\.", r"branch_heads.\1.features.0."),
        (r"^projector\.(\d+)\.\d+\.", r"branch_heads.\1.classifier."),
    )
    reference_module_names = {"branch_heads": "projector"}
    Arguments = OFAArguments
    requires_stages = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, common: DistillArguments,
                 hparams: OFAArguments, context: DistillContext, head_width: int | None = None):
        super().__init__(student, teacher, common, hparams, context)
        stages = hparams.ofa_stage
        self.eps = (list(hparams.ofa_eps) * (len(stages) + 1))[: len(stages) + 1]
        student_stages = self.student_stages
        if head_width is None:
            head_width = (max(student_stages.pooled_dim, self.teacher_stages.pooled_dim)
                          if not student_stages.is_sequence else student_stages.pooled_dim)
        if student_stages.is_sequence and head_width % TOKEN_HEAD_ATTENTION_HEADS:
            raise ValueError(f"--distiller ofa: the token branch heads are as wide as the student's pooled feature "
                             f"({head_width}), which is not divisible by their {TOKEN_HEAD_ATTENTION_HEADS} "
                             "attention heads")
        self.grids = {k: FeatureGrid.of(student_stages.stage_shapes[k - 1], context.input_size,
                                        student_stages.num_prefix_tokens) for k in hparams.ofa_stage}
        self.branch_heads = nn.ModuleDict({
            str(k): self._head(k, self.grids[k], head_width, context) for k in hparams.ofa_stage})
        init_weights(self.branch_heads)

    @staticmethod
    def _head(stage: int, grid: FeatureGrid, width: int, context: DistillContext) -> nn.Module:
        if not grid.is_sequence:
            return MapBranchHead(grid.channels, NUM_STAGES - stage, width, context.num_classes)
        last_side = max(1, min(context.input_size[-2:]) // LAST_STAGE_STRIDE)
        num_merges = max(int(math.log2(min(grid.size) / last_side)), 0)
        return TokenBranchHead(grid.channels, num_merges, max(NUM_STAGES - stage, 1), width, context.num_classes,
                               num_heads=TOKEN_HEAD_ATTENTION_HEADS)

    @classmethod
    def from_reference_state(cls, student: nn.Module, teacher: nn.Module | None, common: DistillArguments,
                             hparams: OFAArguments, context: DistillContext,
                             reference_state: dict[str, torch.Tensor]) -> OFA:
        """The reference's heads are as wide as its stage tables say; read that width from their classifiers."""
        widths = {value.shape[1] for key, value in reference_state.items()
                  if re.fullmatch(r"projector\.\d+\.\d+\.weight", key) and value.ndim == 2}
        if len(widths) != 1:
            raise ValueError(f"cannot read the OFA head width from the reference state (classifier widths {widths})")
        return cls(student, teacher, common, hparams, context, head_width=widths.pop())

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = self.student_stages(images)
        teacher_logits = self.teacher_logits(images)
        target_mask = F.one_hot(self.target_classes(labels, teacher_logits, labelled),
                                student.logits.shape[-1]).to(student.logits.dtype)
        temperature = self.hparams.ofa_temperature
        branch_losses = [
            ofa_loss(self.branch_heads[str(k)](self.grids[k].to_map(student.stages[k - 1])), teacher_logits,
                     target_mask, eps, temperature)
            for k, eps in zip(self.hparams.ofa_stage, self.eps)]
        return student.logits, {
            "loss_gt": self.gt_loss(student.logits, labels, labelled),
            "loss_kd": self.common.kd_loss_weight * ofa_loss(student.logits, teacher_logits, target_mask,
                                                             self.eps[-1], temperature),
            "loss_ofa": self.hparams.ofa_loss_weight * sum(branch_losses),
        }
