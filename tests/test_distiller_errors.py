"""Construction and runtime errors of the baseline distillers, OFA's reference-state handling, soft labels."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pat_hf.distillers import DistillArguments, DistillContext, get_distiller_class
from pat_hf.models.factory import create_model
from pat_hf.reference.convert import convert_distiller_state
from tests.tiny_models import INPUT_SIZE, NUM_CLASSES, tiny_batch, tiny_model

torch.set_num_threads(1)

CONTEXT = DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES,
                         train_labels=torch.arange(8) % NUM_CLASSES)


def build(name: str, student: str = "resnet", teacher: str | None = "vit", context: DistillContext = CONTEXT,
          **overrides):
    distiller_cls = get_distiller_class(name)
    hparams = distiller_cls.Arguments(**overrides) if distiller_cls.Arguments else None
    return distiller_cls(tiny_model(student), tiny_model(teacher) if teacher else None,
                         DistillArguments(distiller=name), hparams, context)


@pytest.mark.parametrize("name", ["bkd", "dkd", "dist", "fitnet", "ofa", "crd", "rkd", "correlation"])
def test_every_baseline_needs_a_teacher(name: str):
    with pytest.raises(ValueError, match=f"--distiller {name} needs a teacher"):
        build(name, teacher=None)


def test_ofa_rejects_bad_stages_and_eps():
    with pytest.raises(ValueError, match=r"--ofa-stage takes distinct stages 1-4, got \[0, 2\]"):
        build("ofa", ofa_stage=[0, 2])
    with pytest.raises(ValueError, match=r"--ofa-eps needs 1 or 3 values"):
        build("ofa", ofa_stage=[3, 4], ofa_eps=[1.0, 1.0])


def test_ofa_token_heads_need_a_width_divisible_by_their_heads():
    student = create_model("test_vit", NUM_CLASSES, {"img_size": 32, "patch_size": 4, "embed_dim": 30,
                                                     "num_heads": 3})
    ofa = get_distiller_class("ofa")
    with pytest.raises(ValueError, match=r"pooled feature \(30\), which is not divisible by their 4 attention"):
        ofa(student, tiny_model("resnet"), DistillArguments(distiller="ofa"), ofa.Arguments(), CONTEXT)


def test_ofa_eps_is_broadcast_and_the_last_one_is_for_the_logits():
    distiller = build("ofa", ofa_stage=[2, 4], ofa_eps=[1.5])
    assert distiller.eps == [1.5, 1.5, 1.5]
    assert build("ofa", ofa_stage=[2, 4], ofa_eps=[1.0, 2.0, 3.0]).eps == [1.0, 2.0, 3.0]


def _reference_ofa_keys(stage_channels: list[int], width: int) -> dict[str, torch.Size]:
    """Key names and shapes of the reference's OFA projectors for a CNN student (docs/REFERENCE.md, Distillers)."""
    shapes = {}
    for stage, channels in enumerate(stage_channels, start=1):
        prefix = f"projector.{stage}"
        if stage == 4:
            shapes |= {f"{prefix}.0.weight": (width, channels, 1, 1), f"{prefix}.0.bias": (width,)}
            shapes |= {f"{prefix}.3.weight": (NUM_CLASSES, width), f"{prefix}.3.bias": (NUM_CLASSES,)}
            continue
        blocks = 4 - stage
        for i in range(blocks):
            c_in, c_out = channels * 2**i, width if i == blocks - 1 else channels * 2 ** (i + 1)
            op = f"{prefix}.{i}.op"
            shapes |= {f"{op}.0.weight": (c_in, 1, 3, 3), f"{op}.1.weight": (c_in, c_in, 1, 1),
                       f"{op}.4.weight": (c_in, 1, 3, 3), f"{op}.5.weight": (c_out, c_in, 1, 1)}
            for bn, c in ((2, c_in), (6, c_out)):
                shapes |= {f"{op}.{bn}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")}
                shapes[f"{op}.{bn}.num_batches_tracked"] = ()
        shapes |= {f"{prefix}.{blocks + 2}.weight": (NUM_CLASSES, width), f"{prefix}.{blocks + 2}.bias": (NUM_CLASSES,)}
    return shapes


def test_ofa_loads_a_reference_state_of_another_width():
    # test_resnet stages have 32, 48, 192, 96 channels; the reference would size the heads from its own table.
    reference_shapes = _reference_ofa_keys([32, 48, 192, 96], width=200)
    reference_state = {key: torch.zeros(shape) for key, shape in reference_shapes.items()}
    ofa = get_distiller_class("ofa")
    distiller = ofa.from_reference_state(tiny_model("resnet"), tiny_model("vit"), DistillArguments(distiller="ofa"),
                                         ofa.Arguments(), CONTEXT, reference_state)
    ours = {key: tuple(value.shape) for key, value in distiller.branch_heads.state_dict().items()}
    converted = {key.removeprefix("branch_heads."): tuple(value.shape)
                 for key, value in convert_distiller_state("ofa", reference_state).items()}
    assert converted == ours
    # Built from the models alone, the heads are max(student 96, teacher 64) wide.
    assert build("ofa").branch_heads["4"].classifier.in_features == 96


def test_fitnet_rejects_bad_stages_and_pools_grids_that_are_not_multiples():
    with pytest.raises(ValueError, match=r"--fitnet-stages takes distinct stages 1-4, got \[1, 1\]"):
        build("fitnet", fitnet_stages=[1, 1])
    student = create_model("test_vit", NUM_CLASSES, {"img_size": 40, "patch_size": 8})
    context = DistillContext(input_size=(3, 40, 40), num_classes=NUM_CLASSES)
    fitnet = get_distiller_class("fitnet")
    # A 5x5 token grid against test_resnet's 3x3 stage 3 at 40 pixels: pooled onto the teacher's grid.
    distiller = fitnet(student, tiny_model("resnet"), DistillArguments(distiller="fitnet"), fitnet.Arguments(),
                       context).train()
    assert distiller.aligners["3"].pool_to == (3, 3)
    out = distiller(torch.randn(2, 3, 40, 40), torch.tensor([0, 1]))
    assert torch.isfinite(out["loss_fitnet"]) and float(out["loss_fitnet"].detach()) > 0


def test_crd_needs_train_labels_and_an_index():
    with pytest.raises(ValueError, match="crd draws its negatives from the training labels"):
        build("crd", context=DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES))
    distiller = build("crd")
    distiller.train()
    images, labels = tiny_batch(2)
    with pytest.raises(ValueError, match="crd needs the batch's 'index'"):
        distiller(images, labels)
    out = distiller(images, labels, index=torch.tensor([3, 5]))
    assert torch.isfinite(out["loss_kd"])


def test_crd_clamps_k_to_the_smallest_pool_of_negatives(caplog):
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    context = DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES, train_labels=labels)
    with caplog.at_level(logging.WARNING):
        distiller = build("crd", context=context)
    assert distiller.num_negatives == 3
    assert "--crd-k 16384 lowered to 3" in caplog.text
    assert build("crd", context=context, crd_k=2).num_negatives == 2
    with pytest.raises(ValueError, match="all 4 training examples are of class 0, so it has no negatives"):
        build("crd", context=DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES,
                                            train_labels=torch.zeros(4, dtype=torch.long)))


@pytest.mark.parametrize("name", ["rkd", "correlation"])
def test_batch_relations_need_two_samples(name: str):
    distiller = build(name)
    distiller.train()
    images, labels = tiny_batch(1)
    with pytest.raises(ValueError, match=f"--distiller {name} .* at least 2"):
        distiller(images, labels)


@pytest.mark.parametrize("name", ["dkd", "ofa"])
def test_one_hot_soft_labels_give_the_hard_label_losses(name: str):
    distiller = build(name)
    distiller.train()
    images, labels = tiny_batch(2)
    hard = distiller(images, labels)
    soft = distiller(images, F.one_hot(labels, NUM_CLASSES).float())
    for key in hard:
        if key.startswith("loss"):
            torch.testing.assert_close(soft[key], hard[key])
