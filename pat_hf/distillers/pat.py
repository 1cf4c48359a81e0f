"""PAT: Perspective-Aware Teaching (SPEC §3).

Loss = CE(student) + KD(unprompted teacher -> student)
     + sum over stages of HCL(aligned student stage, prompted-teacher stage)
     + KL(unprompted teacher -> prompted teacher).
Prompt blocks before the selected teacher stages are fed the previous step's detached student-teacher gap;
region-aware attention mixes the student's stages before each is aligned to its teacher stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from pat_hf.distillers.base import Distiller, register_distiller
from pat_hf.distillers.kd import kd_loss
from pat_hf.modules.hcl import hierarchical_context_loss
from pat_hf.modules.projectors import build_projector
from pat_hf.modules.prompt_block import PromptBlock
from pat_hf.modules.region_attention import RegionAttention
from pat_hf.modules.shapes import Shape, grid_token_count, is_map, split_grid_tokens
from pat_hf.stages import NUM_STAGES

PAT_MODES = ("reference", "corrected")


@dataclass
class PATArguments:
    pat_afp_stage: list[int] = field(default_factory=lambda: [1, 2, 3, 4],
                                     metadata={"help": "teacher stages (1-4) that get a feedback prompt"})
    pat_mse_loss_weight: float = field(default=1.0, metadata={"help": "weight of the feature (HCL) loss"})
    pat_reg_loss_weight: float = field(default=1.0, metadata={"help": "weight of the prompted-teacher KL"})
    pat_raa_num_queries: int = field(default=64, metadata={"help": "region-attention tokens, 4*k*k"})
    pat_raa_dim: int = field(default=512, metadata={"help": "region-attention width (divisible by 8)"})
    pat_mode: str = field(default="reference", metadata={
        "help": "reference: reproduce the published code, defects included; corrected: fix them (README)"})


@register_distiller("pat")
class PAT(Distiller):
    Arguments = PATArguments
    requires_stages = True

    def __init__(self, student, teacher, common, hparams: PATArguments, context):
        super().__init__(student, teacher, common, hparams, context)
        if hparams.pat_mode not in PAT_MODES:
            raise ValueError(f"--pat-mode must be one of {PAT_MODES}, got {hparams.pat_mode!r}")
        if not set(hparams.pat_afp_stage) <= set(range(1, NUM_STAGES + 1)):
            raise ValueError(f"--pat-afp-stage takes stages 1-4, got {hparams.pat_afp_stage}")
        self.faithful = hparams.pat_mode == "reference"
        teacher_prefix = self.teacher_stages.num_prefix_tokens
        self.target_shapes = [self._target_shape(s, teacher_prefix) for s in self.teacher_stages.stage_shapes]
        self.prompt_blocks = nn.ModuleDict({
            str(k - 1): PromptBlock(self.target_shapes[k - 1], self.teacher_stages.stage_input_shapes[k - 1],
                                    faithful=self.faithful, num_prefix_tokens=teacher_prefix)
            for k in sorted(set(hparams.pat_afp_stage))
        })
        self.region_attention = RegionAttention(
            self.student_stages.stage_shapes, num_queries=hparams.pat_raa_num_queries, dim=hparams.pat_raa_dim,
            faithful=self.faithful, num_prefix_tokens=self.student_stages.num_prefix_tokens)
        self.aligners = nn.ModuleList(build_projector(self.region_attention.token_shape, shape)
                                      for shape in self.target_shapes)
        self._feedback_student: list[torch.Tensor] | None = None
        self._feedback_teacher: list[torch.Tensor] | None = None

    def _target_shape(self, shape: Shape, num_prefix_tokens: int) -> Shape:
        if is_map(shape):
            return shape
        return (grid_token_count(shape[0], faithful=self.faithful, num_prefix_tokens=num_prefix_tokens), shape[1])

    def _teacher_target(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.ndim == 4:
            return feature
        return split_grid_tokens(feature, faithful=self.faithful,
                                 num_prefix_tokens=self.teacher_stages.num_prefix_tokens)[0]

    def _feedback(self, batch_size: int) -> list[torch.Tensor | None]:
        """The previous step's gap per stage, or none when there is no previous step of the same batch size."""
        if self._feedback_student is None or self._feedback_student[0].shape[0] != batch_size:
            return [None] * NUM_STAGES
        return [s - t for s, t in zip(self._feedback_student, self._feedback_teacher)]

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, **batch):
        student = self.student_stages(images)
        teacher_logits = self.teacher_logits(images)
        feedback = self._feedback(images.shape[0])
        prompts = {int(k): partial(block, feedback=feedback[int(k)]) for k, block in self.prompt_blocks.items()}
        prompted = self.teacher_stages(images, prompts)

        aligned = [aligner(tokens) for aligner, tokens in
                   zip(self.aligners, self.region_attention(student.stages))]
        targets = [self._teacher_target(feature) for feature in prompted.stages]
        feature_loss = sum(hierarchical_context_loss(a, t) for a, t in zip(aligned, targets))
        # Contiguous, as a checkpoint restores them: a resumed run then computes exactly what an uninterrupted one
        # does (kernels may round differently on other memory layouts).
        self._feedback_student = [a.detach().contiguous() for a in aligned]
        self._feedback_teacher = [t.detach().contiguous() for t in targets]

        hp = self.hparams
        return student.logits, {
            "loss_gt": self.gt_loss(student.logits, labels),
            "loss_kd": self.common.kd_loss_weight * kd_loss(student.logits, teacher_logits,
                                                            self.common.kd_temperature),
            "loss_pat_mse": hp.pat_mse_loss_weight * feature_loss,
            "loss_pat_reg": hp.pat_reg_loss_weight * kd_loss(prompted.logits, teacher_logits),
        }

    def process_state_dict(self) -> dict[str, torch.Tensor]:
        if self._feedback_student is None:
            return {}
        state = {f"feedback_student.{k}": t for k, t in enumerate(self._feedback_student)}
        state.update({f"feedback_teacher.{k}": t for k, t in enumerate(self._feedback_teacher)})
        return state

    def load_process_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self._feedback_student = self._feedback_teacher = None
            return
        device = next(self.parameters()).device
        self._feedback_student = [state[f"feedback_student.{k}"].to(device) for k in range(NUM_STAGES)]
        self._feedback_teacher = [state[f"feedback_teacher.{k}"].to(device) for k in range(NUM_STAGES)]
