"""CRD (Contrastive Representation Distillation, Tian et al. 2020): NCE between the student's and the
teacher's embeddings of the same example (positive) and of K examples of other classes (negatives), drawn
against memory banks indexed by the example's position in the training set.

The batch must carry `index`; the negatives are drawn here from `DistillContext.train_labels`, as the
reference's dataset drew them (uniformly, with replacement, among the other classes' examples). A batch may
instead carry them as `contrast_index` (B, 1 + K): each example's own index first, then its K negatives (how
reference_check replays the reference's draws).

Unlabelled examples (--label-fraction, --allow-unlabelled) are refused: their class is unknown, so negatives of
"another class" cannot be drawn for them, nor can they be excluded from a labelled example's negatives
(docs/REFERENCE.md, Few labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pat_hf.distillers.base import DistillArguments, DistillContext, Distiller, register_distiller
from pat_hf.modules.contrast_memory import ContrastMemory
from pat_hf.modules.negative_sampler import NegativeSampler

logger = logging.getLogger(__name__)

NCE_EPS = 1e-7


@dataclass
class CRDArguments:
    crd_feat_dim: int = field(default=128, metadata={"help": "width of the contrastive embeddings"})
    crd_k: int = field(default=16384, metadata={
        "help": "negatives per example (at most the number of training examples outside the largest class)"})
    crd_momentum: float = field(default=0.5, metadata={"help": "momentum of the memory-bank update"})
    crd_temperature: float = field(default=0.07, metadata={"help": "temperature of the contrastive scores"})


def nce_contrast_loss(scores: torch.Tensor, num_examples: int) -> torch.Tensor:
    """NCE with a uniform noise distribution 1/N over the training set: scores (B, 1 + K), positive first.

    -(1/B) * [sum_b log(s_b0 / (s_b0 + K/N + eps)) + sum_{b,j>0} log((K/N) / (s_bj + K/N + eps))]."""
    noise = (scores.shape[1] - 1) / num_examples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + NCE_EPS))
    negative = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


@register_distiller("crd")
class CRD(Distiller):
    reference_renames = (
        # `contrast` is a ContrastMemory(feat_dim, N, K, T, momentum) called as contrast(e_s, e_t, index, ...):
        # memory_v1 is updated with the student's embeddings, memory_v2 with the teacher's.
        (r"^embed_s\.linear\.", "embed_student."),
        (r"^embed_t\.linear\.", "embed_teacher."),
        (r"^contrast\.memory_v1$", "memory.student_bank"),
        (r"^contrast\.memory_v2$", "memory.teacher_bank"),
    )
    reference_module_names = {"embed_student": "embed_s", "embed_teacher": "embed_t", "memory": "contrast"}
    Arguments = CRDArguments
    requires_stages = True
    batch_keys = ("index",)
    needs_train_labels = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, common: DistillArguments,
                 hparams: CRDArguments, context: DistillContext):
        if context.train_labels is None:
            raise ValueError("--distiller crd draws its negatives from the training labels, "
                             "but the DistillContext has no train_labels")
        super().__init__(student, teacher, common, hparams, context)
        self.negatives = NegativeSampler(context.train_labels)
        self.num_negatives = min(hparams.crd_k, self.negatives.smallest_pool)
        if self.num_negatives < hparams.crd_k:
            logger.warning("--crd-k %d lowered to %d: the largest class leaves only that many other examples",
                           hparams.crd_k, self.num_negatives)
        self.embed_student = nn.Linear(self.student_stages.pooled_dim, hparams.crd_feat_dim)
        self.embed_teacher = nn.Linear(self.teacher_stages.pooled_dim, hparams.crd_feat_dim)
        self.memory = ContrastMemory(hparams.crd_feat_dim, context.num_train_examples, hparams.crd_temperature,
                                     hparams.crd_momentum)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
                      contrast_index: torch.Tensor | None = None,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if index is None:
            raise ValueError("--distiller crd needs the batch's 'index' (each example's position in the training set)")
        student = self.student_stages(images)
        teacher = self.teacher_features(images)
        student_embed = F.normalize(self.embed_student(student.pooled.flatten(1)), dim=1)
        teacher_embed = F.normalize(self.embed_teacher(teacher.pooled.flatten(1)), dim=1)
        index = index.long()
        if contrast_index is None:
            contrast_index = torch.cat([index.unsqueeze(1), self.negatives(index, self.num_negatives)], dim=1)
        student_scores, teacher_scores = self.memory(student_embed, teacher_embed, contrast_index.long())
        self.memory.update(index, student_embed, teacher_embed)
        num_examples = self.memory.num_examples
        contrast = nce_contrast_loss(student_scores, num_examples) + nce_contrast_loss(teacher_scores, num_examples)
        return student.logits, {
            "loss_gt": self.gt_loss(student.logits, labels),
            "loss_kd": self.common.kd_loss_weight * contrast,
        }
