"""Every registered distiller trains for three SGD steps on a rotation of tiny teacher -> student pairs.

Checks: construction, finite losses, and that every trainable extra parameter receives a non-zero gradient
within the first two steps. For each distiller the pairs rotate through the families, so every family is once
its teacher and once its student, and CNN, ViT, Swin and MLP models meet each other in both directions.
"""

from __future__ import annotations

import re

import pytest
import torch

from pat_hf.distillers import DISTILLERS, DistillArguments, DistillContext, get_distiller_class
from tests.tiny_models import INPUT_SIZE, NUM_CLASSES, tiny_batch, tiny_model

torch.set_num_threads(1)

# (registry name, hyper-parameter overrides); PAT's region attention is narrowed to keep the test fast.
CONFIGS: dict[str, tuple[str, dict]] = {
    "vanilla": ("vanilla", {}),
    "kd": ("kd", {}),
    "bkd": ("bkd", {}),
    "dkd": ("dkd", {}),
    "dist": ("dist", {}),
    "fitnet": ("fitnet", {}),
    "ofa": ("ofa", {}),
    "crd": ("crd", {}),
    "rkd": ("rkd", {}),
    "correlation": ("correlation", {}),
    "pat-reference": ("pat", {"pat_mode": "reference", "pat_raa_dim": 32}),
    "pat-corrected": ("pat", {"pat_mode": "corrected", "pat_raa_dim": 32}),
}
# CNN and token families alternate, so odd shifts pair a CNN with a token model and even shifts pair alike kinds.
FAMILIES = ["resnet", "vit", "swin", "mixer", "convnext", "resmlp", "efficientnet", "regnet"]


def _cases() -> list[tuple[str, str, str]]:
    """Each configuration: every family once as teacher, paired with the family `shift` places on, the shift
    changing from one configuration to the next (8 of the 56 ordered pairs each)."""
    cases = []
    for j, config in enumerate(CONFIGS):
        shift = 1 + j % (len(FAMILIES) - 1)
        cases += [(config, teacher, FAMILIES[(i + shift) % len(FAMILIES)]) for i, teacher in enumerate(FAMILIES)]
    return cases


CASES = _cases()
# PAT's squeeze-excitation squeezes C channels to C/16 ReLU units, a single unit at these widths. A unit that is
# inactive on the whole batch passes no gradient to the SE weights and, with the reference's gate-only SE
# (docs/REFERENCE.md, Quirks), none to the convs before it either. These parameters must be reached by the
# backward graph but may get an exactly zero gradient.
MAY_GET_ZERO_GRADIENT = {
    "pat-reference": re.compile(r"prompt_blocks\.\d+\.(feedback_aligner|fusion|prompt\.[0-3])\."),
    "pat-corrected": re.compile(r"prompt_blocks\.\d+\.(fusion|prompt)\.3\."),
}
BATCH_SIZE = 4
NUM_TRAIN_EXAMPLES = 3 * BATCH_SIZE
TRAIN_LABELS = torch.arange(NUM_TRAIN_EXAMPLES) % NUM_CLASSES


def test_rotation_covers_every_distiller_and_family():
    assert {CONFIGS[config][0] for config, _, _ in CASES} == set(DISTILLERS)
    for config in CONFIGS:
        pairs = [(teacher, student) for c, teacher, student in CASES if c == config]
        assert sorted(teacher for teacher, _ in pairs) == sorted(FAMILIES)
        assert sorted(student for _, student in pairs) == sorted(FAMILIES)
        assert all(teacher != student for teacher, student in pairs)


@pytest.mark.parametrize(("config", "teacher_family", "student_family"), CASES,
                         ids=[f"{c}-{t}-to-{s}" for c, t, s in CASES])
def test_three_training_steps(config: str, teacher_family: str, student_family: str):
    name, overrides = CONFIGS[config]
    distiller_cls = get_distiller_class(name)
    hparams = distiller_cls.Arguments(**overrides) if distiller_cls.Arguments else None
    context = DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES, train_labels=TRAIN_LABELS)
    distiller = distiller_cls(tiny_model(student_family, seed=1), tiny_model(teacher_family, seed=2),
                              DistillArguments(distiller=name), hparams, context)
    distiller.train()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    extra = dict(distiller.named_parameters())
    extra = {n: p for n, p in extra.items() if p.requires_grad and not n.startswith(("student.", "teacher."))}
    assert {id(p) for p in extra.values()} == {id(p) for p in distiller.extra_parameters()}

    reached: set[str] = set()
    nonzero: set[str] = set()
    for step in range(3):
        images, labels = tiny_batch(BATCH_SIZE, seed=step)
        index = torch.arange(step * BATCH_SIZE, (step + 1) * BATCH_SIZE)
        batch = {"index": index} if "index" in distiller_cls.batch_keys else {}
        out = distiller(images, labels, **batch)
        assert out["logits"].shape == (BATCH_SIZE, NUM_CLASSES)
        assert all(torch.isfinite(out[key]) for key in out if key.startswith("loss")), out
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if step < 2:
            reached |= {n for n, p in extra.items() if p.grad is not None}
            nonzero |= {n for n, p in extra.items() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
    assert set(extra) - reached == set(), "extra parameters the backward pass never reaches by step 2"
    may_be_zero = MAY_GET_ZERO_GRADIENT.get(config, re.compile("$^"))
    zero = {n for n in set(extra) - nonzero if not may_be_zero.match(n)}
    assert zero == set(), "extra parameters with only zero gradients by step 2"
