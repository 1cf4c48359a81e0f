"""PAT: Perspective-Aware Teaching (docs/REFERENCE.md, PAT).

Loss = CE(student) + KD(unprompted teacher -> student)
     + sum over stages of HCL(aligned student stage, prompted-teacher stage)
     + KL(unprompted teacher -> prompted teacher).
Prompt blocks before the selected teacher stages are fed the previous step's detached student-teacher gap;
region-aware attention mixes the student's stages before each is aligned to its teacher stage.
`--pat-mode` chooses the published code's quirks (all of them) or none (docs/REFERENCE.md, Quirks).

Only the CE term uses labels: an unlabelled example (--label-fraction, --allow-unlabelled) is trained by the KD,
HCL and prompted-teacher terms alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from pat_hf.distillers.base import Distiller, check_stage_selection, kd_loss, register_distiller
from pat_hf.models.stages.layer import StageLayer
from pat_hf.models.stages.plan import NUM_STAGES
from pat_hf.modules.hcl import hierarchical_context_loss
from pat_hf.modules.projectors import build_projector
from pat_hf.modules.prompt_block import PromptBlock
from pat_hf.modules.quirks import PATQuirks
from pat_hf.modules.region_attention import RegionAttention, check_region_attention
from pat_hf.modules.token_grid import FeatureGrid

QUIRKS_OF_MODE = {"reference": PATQuirks.all(True), "corrected": PATQuirks.all(False)}
PAT_MODES = tuple(QUIRKS_OF_MODE)


@dataclass
class PATArguments:
    pat_afp_stage: list[int] = field(default_factory=lambda: [1, 2, 3, 4],
                                     metadata={"help": "teacher stages (1-4) that get a feedback prompt"})
    pat_mse_loss_weight: float = field(default=1.0, metadata={"help": "weight of the feature (HCL) loss"})
    pat_reg_loss_weight: float = field(default=1.0, metadata={"help": "weight of the prompted-teacher KL"})
    pat_raa_num_queries: int = field(default=64, metadata={"help": "region-attention tokens, 4*k*k"})
    pat_raa_dim: int = field(default=512, metadata={"help": "region-attention width (divisible by 8)"})
    pat_mode: str = field(default="reference", metadata={
        "help": "reference: reproduce the published code, quirks included; corrected: without them "
                "(docs/REFERENCE.md, Quirks)"})

    def __post_init__(self):
        if self.pat_mode not in PAT_MODES:
            raise ValueError(f"--pat-mode must be one of {PAT_MODES}, got {self.pat_mode!r}")
        check_stage_selection("--pat-afp-stage", self.pat_afp_stage, distinct=False)
        check_region_attention(self.pat_raa_num_queries, self.pat_raa_dim)

    @property
    def quirks(self) -> PATQuirks:
        return QUIRKS_OF_MODE[self.pat_mode]


def _grids(stages: StageLayer, shapes: list[tuple[int, ...]], quirks: PATQuirks) -> list[FeatureGrid]:
    return [FeatureGrid.of(shape, stages.input_size, stages.num_prefix_tokens,
                           last_token_as_class=quirks.last_token_as_class) for shape in shapes]


@register_distiller("pat")
class PAT(Distiller):
    supports_unlabelled = True
    reference_renames = (
        (r"\.fb_aligner\.", ".feedback_aligner."),
        (r"\.fusion_block\.", ".fusion."),
        (r"\.prompt_block\.", ".prompt."),
        (r"^attention_blending\.projector_s\.(\d+)\.projector\.proj\.", r"region_attention.projectors.\1.proj."),
        (r"^attention_blending\.positional_encodings$", "region_attention.positional_encoding"),
        (r"^attention_blending\.", "region_attention."),
        (r"\.conv\.(\d)\.", r".proj.\1."),
        (r"\.mlp_d\.", ".channel_proj."),
        (r"\.mlp_l\.", ".token_proj."),
    )
    reference_module_names = {"region_attention": "attention_blending"}
    Arguments = PATArguments
    requires_stages = True

    def __init__(self, student, teacher, common, hparams: PATArguments, context):
        super().__init__(student, teacher, common, hparams, context)
        quirks = hparams.quirks
        t = self.teacher_stages
        self.teacher_grids = _grids(t, t.stage_shapes, quirks)
        self.prompt_blocks = nn.ModuleDict({
            str(k - 1): PromptBlock(self.teacher_grids[k - 1].grid_shape, t.stage_input_shapes[k - 1],
                                    context.input_size, quirks, t.num_prefix_tokens)
            for k in sorted(set(hparams.pat_afp_stage))
        })
        self.region_attention = RegionAttention(
            _grids(self.student_stages, self.student_stages.stage_shapes, quirks),
            num_queries=hparams.pat_raa_num_queries, dim=hparams.pat_raa_dim,
            batch_indexed_position=quirks.batch_indexed_position)
        self.aligners = nn.ModuleList(build_projector(self.region_attention.token_shape, grid.grid_shape)
                                      for grid in self.teacher_grids)
        self._feedback_student: list[torch.Tensor] | None = None
        self._feedback_teacher: list[torch.Tensor] | None = None

    def _feedback(self, batch_size: int) -> list[torch.Tensor | None]:
        """The previous step's gap per stage, or none when there is no previous step of the same batch size."""
        if self._feedback_student is None or self._feedback_student[0].shape[0] != batch_size:
            return [None] * NUM_STAGES
        return [s - t for s, t in zip(self._feedback_student, self._feedback_teacher)]

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None,
                      **batch: torch.Tensor):
        student = self.student_stages(images)
        teacher_logits = self.teacher_logits(images)
        feedback = self._feedback(images.shape[0])
        prompts = {int(k): partial(block, feedback=feedback[int(k)]) for k, block in self.prompt_blocks.items()}
        prompted = self.teacher_stages(images, prompts)

        aligned = [aligner(tokens) for aligner, tokens in
                   zip(self.aligners, self.region_attention(student.stages))]
        # The prompted teacher's stages without their set-aside tokens, as the aligned student stages are.
        targets = [grid.grid_part(feature) for grid, feature in zip(self.teacher_grids, prompted.stages)]
        feature_loss = sum(hierarchical_context_loss(grid.grid_to_map(a), grid.grid_to_map(t))
                           for grid, a, t in zip(self.teacher_grids, aligned, targets))
        # Contiguous, as a checkpoint restores them: a resumed run then computes exactly what an uninterrupted one
        # does (kernels may round differently on other memory layouts).
        self._feedback_student = [a.detach().contiguous() for a in aligned]
        self._feedback_teacher = [t.detach().contiguous() for t in targets]

        hp = self.hparams
        return student.logits, {
            "loss_gt": self.gt_loss(student.logits, labels, labelled),
            "loss_kd": self.kd_term(student.logits, teacher_logits),
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
