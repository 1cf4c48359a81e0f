"""The distiller API: one module holding the student, the frozen teacher and the method's own modules.

A distiller's `forward` is the whole training computation (student, teacher, extra modules, losses), so that
the Trainer's prepared model (DDP, autocast) covers all of it. In evaluation mode it runs the student alone and,
given labels, returns the cross-entropy evaluation loss as any Hugging Face model does.

A training batch may carry `labelled` (bool, one per example; --label-fraction, --allow-unlabelled): the
ground-truth term then averages over the labelled examples alone and every distillation term over all of them
(docs/REFERENCE.md, Few labels). Only distillers with `supports_unlabelled` are given such batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pat_hf.config.arguments import DataArguments, DistillArguments
from pat_hf.config.checks import UsageError
from pat_hf.models.stages.layer import StageLayer
from pat_hf.models.stages.plan import NUM_STAGES, StageOutput

DISTILLERS: dict[str, type[Distiller]] = {}


def register_distiller(name: str):
    """Class decorator: make a distiller available as `--distiller NAME`."""

    def decorator(cls: type[Distiller]) -> type[Distiller]:
        if name in DISTILLERS:
            raise ValueError(f"distiller {name!r} is registered twice")
        cls.name = name
        if cls.Arguments is not None:
            # HfArgumentParser lists a dataclass with this attribute under its own heading in --help.
            cls.Arguments._argument_group_name = f"--distiller {name}"
        DISTILLERS[name] = cls
        return cls

    return decorator


def get_distiller_class(name: str) -> type[Distiller]:
    try:
        return DISTILLERS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown distiller {name!r}; choose one of {', '.join(sorted(DISTILLERS))}") from None


@dataclass(frozen=True)
class DistillContext:
    """What a distiller needs to know about the run besides its hyper-parameters."""

    input_size: tuple[int, int, int]
    num_classes: int
    # Class index of every training example, in dataset order, for distillers with `needs_train_labels`.
    train_labels: torch.Tensor | None = None
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy

    @property
    def num_train_examples(self) -> int:
        return 0 if self.train_labels is None else len(self.train_labels)


def check_stage_selection(flag: str, stages: list[int], *, distinct: bool = True) -> None:
    """A list of stages (1-4) a distiller works on; `distinct`: at least one, each at most once."""
    in_range = set(stages) <= set(range(1, NUM_STAGES + 1))
    if distinct and not (stages and in_range and len(set(stages)) == len(stages)):
        raise ValueError(f"{flag} takes distinct stages 1-4, got {stages}")
    if not in_range:
        raise ValueError(f"{flag} takes stages 1-4, got {stages}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices from hard or soft (mixup / smoothed) labels."""
    return labels.argmax(dim=-1) if labels.ndim > 1 else labels


class Distiller(nn.Module):
    """Base class. Subclasses implement `forward_train`; `Arguments` names their own hyper-parameters."""

    name: ClassVar[str] = ""
    Arguments: ClassVar[type | None] = None
    requires_stages: ClassVar[bool] = False
    requires_teacher: ClassVar[bool] = True
    # Keys of the batch, besides pixel_values and labels, that forward_train consumes (CRD's sample indices).
    batch_keys: ClassVar[tuple[str, ...]] = ()
    # Whether the DistillContext must carry the training set's labels (CRD draws its negatives from them).
    needs_train_labels: ClassVar[bool] = False
    # Whether forward_train takes `labelled` and handles unlabelled examples (docs/REFERENCE.md, Few labels). Off
    # by default: a distiller that ignored the mask would learn the placeholder labels of unlabelled examples.
    supports_unlabelled: ClassVar[bool] = False
    # The reference's names for this distiller's modules: (pattern, replacement) pairs applied in order to the keys
    # of its saved state (pat_hf/reference/convert.py), and our top-level module names -> the reference's, for
    # reporting gradient norms by module (pat_hf/reference/check.py).
    reference_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    reference_module_names: ClassVar[dict[str, str]] = {}
    # Tells the Trainer that `forward` returns a per-batch mean loss it must not rescale.
    accepts_loss_kwargs = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None, common: DistillArguments,
                 hparams: Any, context: DistillContext):
        super().__init__()
        if teacher is None and self.requires_teacher:
            raise ValueError(f"--distiller {self.name} needs a teacher; pass --teacher NAME --teacher-pretrained FILE")
        self.student = student
        self.teacher = teacher
        self.common = common
        self.hparams = hparams
        self.context = context
        self.criterion = context.criterion
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.student_stages = StageLayer(student, context.input_size) if self.requires_stages else None
        self.teacher_stages = StageLayer(teacher, context.input_size) if self.requires_stages and teacher else None
        self.register_state_dict_post_hook(_drop_teacher_from_state_dict)
        self.register_load_state_dict_post_hook(_ignore_missing_teacher_keys)

    @classmethod
    def from_reference_state(cls, student: nn.Module, teacher: nn.Module | None, common: DistillArguments,
                             hparams: Any, context: DistillContext,
                             reference_state: dict[str, torch.Tensor]) -> Distiller:
        """Build a distiller whose modules fit a reference state (`extra.<name>.*` keys, reference naming).

        Override where a module size is not derivable from the models alone (the reference hard-codes some
        from its 224-pixel stage tables)."""
        return cls(student, teacher, common, hparams, context)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                labelled: torch.Tensor | None = None, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if labels is None:
            return {"logits": self.student(pixel_values)}
        if not self.training:
            logits = self.student(pixel_values)
            return {"loss": F.cross_entropy(logits.float(), hard_labels(labels)), "logits": logits}
        if labelled is not None:
            refusal = unlabelled_refusal(type(self))
            if refusal:
                raise ValueError(refusal)
            # Only when present, so that distillers written before few labels keep their signature.
            batch["labelled"] = labelled
        logits, losses = self.forward_train(pixel_values, labels, **batch)
        return {"loss": sum(losses.values()), "logits": logits, **losses}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def gt_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                labelled: torch.Tensor | None = None) -> torch.Tensor:
        """gt_loss_weight * the criterion, averaged over the labelled examples only (all when `labelled` is None);
        0 for a batch without any, so that its distillation terms still train the student."""
        if labelled is None:
            return self.common.gt_loss_weight * self.criterion(logits, labels)
        labelled = labelled.bool()
        if not bool(labelled.any()):
            # Zero, yet part of the graph: a step whose only term this is (vanilla) still runs its backward.
            return logits.sum() * 0.0
        # Every criterion averages a per-example loss over the batch, so the labelled rows alone give the mean
        # over the labelled examples, label smoothing and soft (mixed) targets included.
        return self.common.gt_loss_weight * self.criterion(logits[labelled], labels[labelled])

    @staticmethod
    def target_classes(labels: torch.Tensor, teacher_logits: torch.Tensor,
                       labelled: torch.Tensor | None = None) -> torch.Tensor:
        """The class of each example for distillation terms that need one (DKD, OFA): its label, or the teacher's
        prediction for an unlabelled example (whose label is a placeholder)."""
        classes = hard_labels(labels)
        if labelled is None:
            return classes
        return torch.where(labelled.bool(), classes, teacher_logits.argmax(dim=-1))

    def kd_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """kd_loss_weight * KD(teacher -> student) at kd_temperature, the logit term of KD, FitNet and PAT."""
        return self.common.kd_loss_weight * kd_loss(student_logits, teacher_logits, self.common.kd_temperature)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits, computed under inference_mode (no autograd bookkeeping at all); the clone
        is an ordinary tensor, which the losses may save for their backward."""
        # Compiled, no_grad: a graph has no bookkeeping to skip, and AOTAutograd fails ("Cannot set version_counter
        # for inference tensor") when a teacher buffer read under inference_mode is read again with gradients in
        # the same graph, as PAT's prompted pass reads Swin's relative position index.
        with torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode():
            logits = self.teacher(images)
        return logits.clone()

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> StageOutput:
        """The frozen teacher's stage features, pooled features and logits (feature distillers)."""
        return self.teacher_stages(images)

    def extra_modules(self) -> dict[str, nn.Module]:
        """The distiller's own trainable modules by top-level name."""
        return {name: module for name, module in self.named_children() if name not in ("student", "teacher")}

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.extra_modules().values() for p in module.parameters() if p.requires_grad]

    def process_state_dict(self) -> dict[str, torch.Tensor]:
        """State that lives per process and between steps (PAT's feedback); saved with every checkpoint."""
        return {}

    def load_process_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"--distiller {self.name} keeps no per-process state, got {sorted(state)}")


class LogitDistiller(Distiller):
    """A distiller whose only teacher signal is its logits: CE + kd_loss_weight * `logit_loss`.

    `logit_loss` gets labels in which an unlabelled example's class is the teacher's prediction."""

    supports_unlabelled = True

    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        targets = labels if labelled is None else self.target_classes(labels, teacher_logits, labelled)
        return logits, {
            "loss_gt": self.gt_loss(logits, labels, labelled),
            "loss_kd": self.common.kd_loss_weight * self.logit_loss(logits, teacher_logits, targets),
        }


def unlabelled_refusal(distiller_cls: type[Distiller]) -> str | None:
    """Why `distiller_cls` cannot train on unlabelled examples, as one line, or None when it can."""
    flags = "--label-fraction below 1 or unlabelled rows (--allow-unlabelled)"
    if distiller_cls.needs_train_labels:
        return (f"--distiller {distiller_cls.name} needs the class of every training example, which {flags} "
                f"leave unknown (docs/REFERENCE.md, Few labels); use another distiller")
    if not distiller_cls.supports_unlabelled:
        return (f"--distiller {distiller_cls.name} does not handle unlabelled examples, which {flags} give "
                f"(docs/ADDING_A_DISTILLER.md, Few labels)")
    return None


def check_data_support(distiller_cls: type[Distiller], data: DataArguments) -> None:
    """Refuse, before any data is read, a distiller the run's data cannot serve: one that indexes the training
    set on a stream, or one that needs every label with few labels."""
    if data.streaming and (distiller_cls.needs_train_labels or "index" in distiller_cls.batch_keys):
        raise ValueError(f"--distiller {distiller_cls.name} needs the index and label of every training example, "
                         f"which a stream does not give; drop --streaming")
    if data.label_fraction < 1 or data.allow_unlabelled:
        refusal = unlabelled_refusal(distiller_cls)
        if refusal:
            raise ValueError(refusal)


def _drop_teacher_from_state_dict(module, state_dict, prefix, local_metadata):
    # The frozen teacher comes from its own checkpoint; copying it into every training checkpoint wastes disk.
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def _ignore_missing_teacher_keys(module, incompatible_keys):
    # Keys may carry a wrapper prefix ("module.teacher.x" under DDP).
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if "teacher" not in key.split(".")[:2]]
