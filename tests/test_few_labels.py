"""Few labels (issue 14, must-have 3): --label-fraction keeps a seeded subset of the training labels and
--allow-unlabelled accepts -1 rows; an unlabelled example gets no cross-entropy and the whole distillation loss."""

import json
import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy

from pat_hf.cli import train as pat_train
from pat_hf.config.arguments import DataArguments
from pat_hf.data.decoding import UNLABELLED, ExampleReader, ImageExamples
from pat_hf.data.labels import check_labels, labelled_rows
from pat_hf.data.transforms import MixupCollator, SharedSwitchMixup, collate, mixed_labelled
from pat_hf.distillers import DISTILLERS, DistillArguments, DistillContext, Distiller, get_distiller_class
from pat_hf.distillers.base import kd_loss, unlabelled_refusal
from tests.helpers import save_teacher, tiny_run
from tests.tiny_models import INPUT_SIZE, NUM_CLASSES, tiny_batch, tiny_model

torch.set_num_threads(1)

BATCH_SIZE = 4
LABELLED = torch.tensor([True, False, True, False])
# Narrowed as in the distiller matrix, to keep PAT fast.
OVERRIDES = {"pat": {"pat_raa_dim": 32}}
SUPPORTING = sorted(name for name, cls in DISTILLERS.items() if unlabelled_refusal(cls) is None)


def build(name: str, criterion=F.cross_entropy, **common) -> Distiller:
    cls = get_distiller_class(name)
    hparams = cls.Arguments(**OVERRIDES.get(name, {})) if cls.Arguments else None
    train_labels = torch.arange(3 * BATCH_SIZE) % NUM_CLASSES if cls.needs_train_labels else None
    context = DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES, train_labels=train_labels,
                             criterion=criterion)
    distiller = cls(tiny_model("vit", seed=1), tiny_model("resnet", seed=2), DistillArguments(distiller=name, **common),
                    hparams, context)
    return distiller.train()


def forward(distiller: Distiller, images: torch.Tensor, labels: torch.Tensor, **batch) -> dict[str, torch.Tensor]:
    # PAT feeds the previous step's gap to its prompts: each forward here is a first step.
    distiller.load_process_state_dict({})
    return distiller(images, labels, **batch)


def hidden(labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    return torch.where(labelled, labels, torch.full_like(labels, UNLABELLED))


def test_every_distiller_but_crd_trains_on_unlabelled_examples():
    assert set(DISTILLERS) - set(SUPPORTING) == {"crd"}
    assert "needs the class of every training example" in unlabelled_refusal(get_distiller_class("crd"))


@pytest.mark.parametrize("name", SUPPORTING)
def test_an_unlabelled_example_gets_no_cross_entropy_and_the_full_distillation_loss(name):
    """The gt term is the mean CE over the labelled examples; every other term is what the same batch gives
    fully labelled, an unlabelled example's class being the teacher's prediction (DKD, OFA use one)."""
    distiller = build(name)
    images, labels = tiny_batch(BATCH_SIZE, seed=3)
    out = forward(distiller, images, hidden(labels, LABELLED), labelled=LABELLED)

    per_example = F.cross_entropy(out["logits"], labels, reduction="none")
    torch.testing.assert_close(out["loss_gt"], per_example[LABELLED].mean())
    teacher_classes = distiller.teacher(images).argmax(dim=-1)
    reference = forward(distiller, images, torch.where(LABELLED, labels, teacher_classes))
    distillation = {key for key in out if key.startswith("loss_") and key != "loss_gt"}
    assert distillation or name == "vanilla"
    for key in distillation:
        torch.testing.assert_close(out[key], reference[key], msg=key)
    torch.testing.assert_close(out["loss"], out["loss_gt"] + sum(out[key] for key in distillation))


def test_kd_term_is_computed_over_every_example_and_the_unlabelled_logits_get_no_ce_gradient():
    distiller = build("kd", kd_temperature=4.0)
    images, labels = tiny_batch(BATCH_SIZE, seed=4)
    out = forward(distiller, images, hidden(labels, LABELLED), labelled=LABELLED)
    teacher_logits = distiller.teacher(images)
    torch.testing.assert_close(out["loss_kd"], kd_loss(out["logits"], teacher_logits, 4.0))
    (gradient,) = torch.autograd.grad(out["loss_gt"], out["logits"])
    assert gradient[~LABELLED].abs().sum() == 0 and gradient[LABELLED].abs().sum() > 0


def test_label_smoothing_is_applied_per_labelled_example():
    smoothing = 0.1
    distiller = build("ofa", criterion=LabelSmoothingCrossEntropy(smoothing))
    images, labels = tiny_batch(BATCH_SIZE, seed=5)
    out = forward(distiller, images, hidden(labels, LABELLED), labelled=LABELLED)
    log_p = out["logits"].log_softmax(dim=-1)
    per_example = (1 - smoothing) * -log_p.gather(1, labels[:, None]).squeeze(1) - smoothing * log_p.mean(dim=-1)
    torch.testing.assert_close(out["loss_gt"], per_example[LABELLED].mean())


@pytest.mark.parametrize("name", ["vanilla", "kd", "ofa"])
def test_a_batch_without_labels_gives_a_zero_gt_term_and_a_finite_loss(name):
    distiller = build(name)
    images, labels = tiny_batch(BATCH_SIZE, seed=6)
    nobody = torch.zeros(BATCH_SIZE, dtype=torch.bool)
    out = forward(distiller, images, hidden(labels, nobody), labelled=nobody)
    assert out["loss_gt"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()  # a step of vanilla with nothing to learn still runs


def test_soft_mixed_targets_are_averaged_over_the_labelled_examples():
    distiller = build("kd")
    images, labels = tiny_batch(BATCH_SIZE, seed=7)
    targets = torch.softmax(torch.randn(BATCH_SIZE, NUM_CLASSES, generator=torch.Generator().manual_seed(0)), -1)
    distiller.criterion = lambda logits, soft: (-soft * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    out = forward(distiller, images, targets, labelled=LABELLED)
    per_example = (-targets * out["logits"].log_softmax(dim=-1)).sum(dim=-1)
    torch.testing.assert_close(out["loss_gt"], per_example[LABELLED].mean())


def test_crd_and_distillers_that_do_not_say_they_handle_unlabelled_examples_are_refused():
    class Unaware(Distiller):
        name = "unaware"
        requires_teacher = False

    assert "does not handle unlabelled examples" in unlabelled_refusal(Unaware)
    distiller = build("crd")
    images, labels = tiny_batch(BATCH_SIZE)
    with pytest.raises(ValueError, match="--distiller crd needs the class of every training example"):
        distiller(images, labels, labelled=LABELLED, index=torch.arange(BATCH_SIZE))


# ---- which labels are kept ----

def test_the_kept_labels_are_a_seeded_stratified_subset():
    labels = np.repeat(np.arange(10), 30)
    np.random.default_rng(0).shuffle(labels)
    labels[:5] = UNLABELLED
    kept = labelled_rows(labels, 0.1, seed=42)
    np.testing.assert_array_equal(kept, labelled_rows(labels.copy(), 0.1, seed=42))
    assert not np.array_equal(kept, labelled_rows(labels, 0.1, seed=43))
    assert not kept[:5].any()
    counts = np.bincount(labels[kept], minlength=10)
    expected = [max(1, round(0.1 * np.sum(labels == c))) for c in range(10)]
    assert counts.tolist() == expected
    # Every class keeps a label, however small the fraction.
    assert (np.bincount(labels[labelled_rows(labels, 0.001, seed=1)], minlength=10) == 1).all()
    np.testing.assert_array_equal(labelled_rows(labels, 1.0, seed=42), labels != UNLABELLED)


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1, math.nan])
def test_a_label_fraction_outside_0_to_1_is_refused_in_one_line(fraction):
    with pytest.raises(ValueError, match=r"--label-fraction must be in \(0, 1\]") as error:
        DataArguments(label_fraction=fraction)
    assert "\n" not in str(error.value)


def test_a_label_fraction_of_a_stream_is_refused():
    with pytest.raises(ValueError, match="--label-fraction draws a fixed subset"):
        DataArguments(label_fraction=0.5, streaming=True)


def split_with(labels: list[int], names=("a", "b")) -> datasets.Dataset:
    split = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (30 * i, 0, 0)) for i in
                                                  range(len(labels))], "label": labels})
    return split.cast_column("label", datasets.ClassLabel(names=list(names)))


def test_minus_one_labels_need_allow_unlabelled_and_only_in_the_training_split():
    train, evaluation = split_with([0, 1, -1, 1, -1]), split_with([0, 1])
    with pytest.raises(ValueError, match=r"outside 0..1 \(first: -1 at row 2; .*--allow-unlabelled trains on -1 "
                                         r"rows") as error:
        check_labels(train, evaluation, 2)
    assert "\n" not in str(error.value)
    check_labels(train, evaluation, 2, allow_unlabelled=True)
    with pytest.raises(ValueError, match="--allow-unlabelled is for the training split"):
        check_labels(evaluation, train, 2, allow_unlabelled=True)
    with pytest.raises(ValueError, match="every training example is unlabelled"):
        check_labels(split_with([-1, -1]), evaluation, 2, allow_unlabelled=True)


def test_examples_say_whether_they_are_labelled():
    reader = ExampleReader(lambda image: torch.zeros(1), num_classes=2, allow_unlabelled=True)
    examples = ImageExamples(split_with([0, 1, -1, 1]), reader, labelled=np.array([True, False, False, True]))
    batch = collate(examples.__getitems__([0, 1, 2, 3]))
    assert batch["labels"].tolist() == [0, -1, -1, 1]
    assert batch["labelled"].tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="outside 0..1: .*--allow-unlabelled"):
        ExampleReader(lambda image: torch.zeros(1), num_classes=2).read({"bytes": b""}, -1, "row 2")
    assert "labelled" not in collate([ExampleReader(lambda image: torch.zeros(1), num_classes=2).read(
        examples.dataset[0]["image"], 0, "row 0")])


def test_a_mixed_example_is_labelled_only_when_it_and_its_partner_are():
    labelled = torch.tensor([True, True, False, True, True, True])
    # timm mixes example i with example B-1-i.
    assert mixed_labelled(labelled).tolist() == [True, True, False, False, True, True]
    mixup = SharedSwitchMixup(mixup_alpha=1.0, num_classes=3, label_smoothing=0.0)
    examples = [{"pixel_values": torch.full((3, 2, 2), float(i)), "labels": label, "labelled": label >= 0}
                for i, label in enumerate([0, 1, -1, 2, 0, 1])]
    batch = MixupCollator(mixup)(examples)
    assert batch["labelled"].tolist() == [True, True, False, False, True, True]
    assert batch["labels"].shape == (6, 3)
    mixup.mixup_enabled = False  # --mixup-off-epoch: nothing is mixed, each example keeps its own status
    assert MixupCollator(mixup)(examples)["labelled"].tolist() == [True, True, False, True, True, True]


# ---- end to end ----

def test_a_few_labels_run_trains_with_mixup_logs_the_count_and_exports(tmp_path, capsys):
    teacher = save_teacher(tmp_path)
    output_dir = tmp_path / "run"
    pat_train.main(tiny_run(output_dir, teacher, "--distiller", "kd", "--label-fraction", "0.1", "--mixup", "0.8",
                            "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"))
    # 64 digits, about 6 per class: one label per class is kept.
    assert "pat-hf: 10 of the 64 training examples are labelled (--label-fraction 0.1)" in capsys.readouterr().out
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["train_labelled_examples"] == 10
    card = (output_dir / "student" / "README.md").read_text()
    assert "label_fraction" in card and "labelled_examples" in card
    assert (output_dir / "student" / "model.safetensors").is_file()


def test_minus_one_rows_are_trained_with_allow_unlabelled_and_crd_is_refused(tmp_path):
    teacher = save_teacher(tmp_path)
    data = tmp_path / "data"
    datasets.DatasetDict(train=split_with([0, 1, -1, 1, -1, 0, -1, 1]),
                         validation=split_with([0, 1, 0, 1])).save_to_disk(str(data))
    flags = [*tiny_run(tmp_path / "run", teacher, "--max_steps", "1", "--eval_strategy", "no", "--save_strategy",
                       "no", "--batch-size", "4", "--num-classes", "10"), "--dataset", str(data)]
    with pytest.raises(ValueError, match="--allow-unlabelled trains on -1 rows"):
        pat_train.main([*flags, "--distiller", "kd"])
    with pytest.raises(ValueError, match="--distiller crd needs the class of every training example") as error:
        pat_train.main([*flags, "--distiller", "crd", "--allow-unlabelled"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
    pat_train.main([*flags, "--distiller", "ofa", "--allow-unlabelled"])
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["train_labelled_examples"] == 5
