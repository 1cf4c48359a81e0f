"""Reference FitNet and CRD states convert onto pat-hf's modules and compute what the reference computed.

No reference fixture pins FitNet or CRD, so these tests build states in the reference's names and layouts (PAT's
distillers/fitnet.py and utils.py; OFA-KD's distillers/crd.py, RepDistiller's ContrastMemory), convert them, and
compare pat-hf's losses with the reference's computation written out here from the formulas in docs/REFERENCE.md,
Distillers: each reference aligner applied in its own layout (MyPatchMerging's and Unpatchify's groupings
explicitly), CRD's NCE against the memory banks and their momentum update. A wrong regrouping of any aligner changes
the loss.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pat_hf.distillers import DistillArguments, DistillContext, get_distiller_class
from pat_hf.models.factory import create_model
from pat_hf.models.stages.layer import StageLayer
from pat_hf.reference.check import main as check
from pat_hf.reference.convert import convert_distiller_state, load_reference_distiller_state
from pat_hf.reference.convert import main as convert
from tests.tiny_models import INPUT_SIZE, NUM_CLASSES, TINY_MODELS

torch.set_num_threads(1)

# Sequence models on a 4x4 grid, one with a class token (first, as in timm) and one without.
VIT_4X4 = ("test_vit", {"img_size": 32, "patch_size": 8})
MIXER_4X4 = ("mixer_s16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_blocks": 4})
MODELS = {**TINY_MODELS, "vit4": VIT_4X4, "mixer4": MIXER_4X4}


def model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(MODELS[name][0], NUM_CLASSES, MODELS[name][1])


def is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


# ---- the reference FitNet, written out from docs/REFERENCE.md ----------------------------------------------------

def drop_first_if_not_square(x: torch.Tensor) -> torch.Tensor:
    """FitNet.forward: a token count that is not a perfect square loses its first token."""
    return x if x.ndim == 4 or is_square(x.shape[1]) else x[:, 1:]


def my_patch_merging(x: torch.Tensor, out_count: int) -> torch.Tensor:
    """MyPatchMerging: (B, L, D) -> (B, out_count, g*g*D), each coarse cell's g x g tokens concatenated with the
    row offset slowest, then the column offset, then the channel."""
    batch, length, dim = x.shape
    side, out_side = math.isqrt(length), math.isqrt(out_count)
    g = side // out_side
    x = x.reshape(batch, out_side, g, out_side, g, dim)  # b h p w q d
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, out_count, g * g * dim)  # b (h w) (p q d)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Unpatchify: (B, h*h, p*p*C) -> (B, C, h*p, h*p), each token's outputs grouped (p q c)."""
    batch, length, _ = x.shape
    h = math.isqrt(length)
    x = x.reshape(batch, h, h, p, p, -1)  # n h w p q c
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, h * p, h * p)  # n c (h p) (w q)


def reference_aligner_state(kind: str, student: tuple, teacher: tuple, generator: torch.Generator) -> dict:
    """The weights of the reference's aligner of `kind` between per-sample stage shapes (C,H,W) / (L,D)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    if kind == "conv":
        return {"aligner.weight": rand(teacher[0], student[0], 1, 1)}
    if kind == "patch_embed":
        p = student[1] // math.isqrt(teacher[0])
        return {"aligner.proj.weight": rand(teacher[1], student[0], p, p), "aligner.proj.bias": rand(teacher[1])}
    if kind == "grouped_teacher":
        scale = math.isqrt(teacher[0]) // student[1]
        out = teacher[1] * scale**2
        return {"aligner.0.weight": rand(out, student[0], 1, 1), "aligner.0.bias": rand(out)}
    if kind == "unpatchify":
        p = teacher[1] // math.isqrt(student[0])
        out = p * p * teacher[0]
        return {"aligner.0.weight": rand(out, student[1]), "aligner.0.bias": rand(out)}
    if kind == "grouped_student_conv":
        scale = math.isqrt(student[0]) // teacher[1]
        return {"aligner.2.weight": rand(teacher[0], student[1] * scale**2, 1, 1), "aligner.2.bias": rand(teacher[0])}
    if kind == "grouped_student_linear":
        in_features = student[0] * student[1] // teacher[0]
        return {"aligner.1.weight": rand(teacher[1], in_features), "aligner.1.bias": rand(teacher[1])}
    if kind == "reshape":
        scale = teacher[0] * teacher[1] // (student[0] * student[1])
        return {"aligner.0.weight": rand(student[1] * scale, student[1]), "aligner.0.bias": rand(student[1] * scale)}
    raise AssertionError(kind)


def reference_stage_mse(kind: str, w: dict, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """The reference's MSE for one stage: its feature filters, its aligner, in its own layouts."""
    fs, ft_filtered = drop_first_if_not_square(fs), drop_first_if_not_square(ft)
    if kind == "conv":
        return F.mse_loss(F.conv2d(fs, w["aligner.weight"]), ft)
    if kind == "patch_embed":
        kernel = w["aligner.proj.weight"].shape[-1]
        out = F.conv2d(fs, w["aligner.proj.weight"], w["aligner.proj.bias"], stride=kernel)
        return F.mse_loss(out.flatten(2).transpose(1, 2), ft_filtered)
    if kind == "grouped_teacher":  # the teacher tokens are grouped before the first-token drop
        out = F.conv2d(fs, w["aligner.0.weight"], w["aligner.0.bias"]).permute(0, 2, 3, 1).flatten(1, 2)
        return F.mse_loss(out, my_patch_merging(ft, fs.shape[2] * fs.shape[3]))
    if kind == "unpatchify":
        p = math.isqrt(w["aligner.0.weight"].shape[0] // ft.shape[1])
        return F.mse_loss(unpatchify(F.linear(fs, w["aligner.0.weight"], w["aligner.0.bias"]), p), ft)
    if kind == "grouped_student_conv":
        side = ft.shape[2]
        grouped = my_patch_merging(fs, side * side).reshape(fs.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return F.mse_loss(F.conv2d(grouped, w["aligner.2.weight"], w["aligner.2.bias"]), ft)
    if kind == "grouped_student_linear":
        grouped = my_patch_merging(fs, ft_filtered.shape[1])
        return F.mse_loss(F.linear(grouped, w["aligner.1.weight"], w["aligner.1.bias"]), ft_filtered)
    raise AssertionError(kind)


def reference_fitnet_state(kinds: dict[int, str], student, teacher, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    s_shapes = StageLayer(student, INPUT_SIZE).stage_shapes
    t_shapes = StageLayer(teacher, INPUT_SIZE).stage_shapes
    return {f"projector.{stage}.{key}": value for stage, kind in kinds.items()
            for key, value in reference_aligner_state(kind, s_shapes[stage - 1], t_shapes[stage - 1],
                                                      generator).items()}


def reference_hint(kinds: dict[int, str], state: dict, student_stages: list, teacher_stages: list) -> torch.Tensor:
    return sum(reference_stage_mse(kind, {k.removeprefix(f"projector.{stage}."): v for k, v in state.items()
                                          if k.startswith(f"projector.{stage}.")},
                                   student_stages[stage - 1], teacher_stages[stage - 1])
               for stage, kind in kinds.items())


def build_fitnet(student, teacher, stages):
    fitnet = get_distiller_class("fitnet")
    return fitnet(student, teacher, DistillArguments(distiller="fitnet"), fitnet.Arguments(fitnet_stages=stages),
                  DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES))


# Every aligner kind of the reference's FitNet, on 32-pixel tiny models (grids 8/4/2/1 for ResNet and Swin).
FITNET_CASES = {
    "cnn_to_cnn": ("resnet", "convnext", {1: "conv", 2: "conv", 3: "conv", 4: "conv"}),
    # PatchEmbed with a 2x2 and a 1x1 patch, against a teacher whose class token the reference drops.
    "cnn_to_vit": ("resnet", "vit4", {1: "patch_embed", 2: "patch_embed"}),
    # A 1x1 conv to D_t*scale^2 channels against MyPatchMerging-grouped teacher tokens, scale 2 and 4.
    "cnn_to_mixer": ("resnet", "mixer4", {2: "patch_embed", 3: "grouped_teacher", 4: "grouped_teacher"}),
    # Linear + Unpatchify (p 2 and 1), MyPatchMerging + 1x1 conv (scale 2 and 4); the class token dropped.
    "vit_to_cnn": ("vit4", "resnet", {1: "unpatchify", 2: "unpatchify", 3: "grouped_student_conv",
                                      4: "grouped_student_conv"}),
    # MyPatchMerging + Linear, scale 2 and 1.
    "swin_to_mixer": ("swin", "mixer4", {1: "grouped_student_linear", 2: "grouped_student_linear"}),
}


@pytest.mark.parametrize("case", list(FITNET_CASES))
def test_reference_fitnet_aligners_convert_to_the_reference_loss(case):
    student_name, teacher_name, kinds = FITNET_CASES[case]
    student, teacher = model(student_name, 0), model(teacher_name, 1)
    state = reference_fitnet_state(kinds, student, teacher)
    distiller = build_fitnet(student, teacher, list(kinds))
    load_reference_distiller_state(distiller, "fitnet", state)
    distiller.train()
    images = torch.randn(2, *INPUT_SIZE, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 7])
    out = distiller(images, labels)
    with torch.no_grad():
        student_stages = StageLayer(copy.deepcopy(student), INPUT_SIZE)(images).stages
        teacher_stages = StageLayer(teacher, INPUT_SIZE)(images).stages
        expected = reference_hint(kinds, state, student_stages, teacher_stages)
    assert float(out["loss_fitnet"].detach()) == pytest.approx(float(expected), rel=1e-5)

    # The test can tell a regrouping from none: the weights copied without reordering give another loss.
    naive = {f"aligners.{stage}.proj.{name}": value.reshape(ours.shape)
             for stage in kinds for name, ours in distiller.aligners[str(stage)].proj.state_dict().items()
             for key, value in state.items() if key.startswith(f"projector.{stage}.") and key.endswith(name)}
    if any(kind not in ("conv", "patch_embed") for kind in kinds.values()):
        distiller.load_state_dict(naive, strict=False)
        assert float(distiller(images, labels)["loss_fitnet"].detach()) != pytest.approx(float(expected), rel=1e-3)


def test_reference_fitnet_refuses_what_a_grid_aligner_cannot_express():
    student, teacher = model("swin"), model("mixer4", 1)
    state = reference_fitnet_state({3: "reshape"}, student, teacher)
    with pytest.raises(ValueError, match=r"reference fitnet stage 3 \(sequence student 2x2 -> sequence teacher "
                                         r"4x4\): the reference's Linear-then-reshape aligner lays each student "
                                         r"token's 4 outputs along a teacher grid row, which GridAligner \(one 2x2 "
                                         r"block per token\) cannot express"):
        convert_distiller_state("fitnet", state, build_fitnet(student, teacher, [3]))
    with pytest.raises(ValueError, match=r"aligns stages \[3\], this FitNet aligns \[1, 2\]; build it with "
                                         r"--fitnet-stages 3"):
        convert_distiller_state("fitnet", state, build_fitnet(student, teacher, [1, 2]))
    with pytest.raises(ValueError, match="converts only against the pair's FitNet"):
        convert_distiller_state("fitnet", state)
    # A state saved for another pair: the shapes say so, stage by stage.
    other = reference_fitnet_state({1: "conv"}, model("resnet"), model("convnext", 1))
    other["projector.1.aligner.weight"] = other["projector.1.aligner.weight"][:-1]
    with pytest.raises(ValueError, match=r"reference fitnet stage 1 \(1x1 conv\): weight of shape \(23, 32, 1, 1\), "
                                         r"the pair needs \(24, 32, 1, 1\)"):
        convert_distiller_state("fitnet", other, build_fitnet(model("resnet"), model("convnext", 1), [1]))


# ---- the reference CRD, written out from docs/REFERENCE.md -------------------------------------------------------

NUM_TRAIN = 16
TRAIN_LABELS = torch.arange(NUM_TRAIN) % 5
CRD_ARGS = {"crd_feat_dim": 8, "crd_k": 6, "crd_momentum": 0.5, "crd_temperature": 0.07,
            "gt_loss_weight": 1.0, "kd_loss_weight": 0.8}
INDICES = (torch.tensor([0, 3, 6, 9]), torch.tensor([1, 3, 10, 14]))  # example 3 in both batches


def contrast_indices(index: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The reference dataset's draw: the example itself, then k examples of other classes, with replacement."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in index.tolist():
        others = torch.nonzero(TRAIN_LABELS[i] != TRAIN_LABELS).flatten()
        rows.append(torch.cat([torch.tensor([i]), others[torch.randint(len(others), (k,), generator=generator)]]))
    return torch.stack(rows)


def reference_crd_state(student_dim: int, teacher_dim: int, normalisers=(-1.0, -1.0), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    dim = CRD_ARGS["crd_feat_dim"]
    bound = 1 / math.sqrt(dim / 3)
    return {
        "embed_s.linear.weight": torch.randn(dim, student_dim, generator=generator) * 0.3,
        "embed_s.linear.bias": torch.randn(dim, generator=generator) * 0.1,
        "embed_t.linear.weight": torch.randn(dim, teacher_dim, generator=generator) * 0.3,
        "embed_t.linear.bias": torch.randn(dim, generator=generator) * 0.1,
        "contrast.params": torch.tensor([CRD_ARGS["crd_k"], CRD_ARGS["crd_temperature"], *normalisers,
                                         CRD_ARGS["crd_momentum"]]),
        "contrast.memory_v1": torch.rand(NUM_TRAIN, dim, generator=generator) * 2 * bound - bound,
        "contrast.memory_v2": torch.rand(NUM_TRAIN, dim, generator=generator) * 2 * bound - bound,
    }


class ReferenceCRD:
    """The reference CRD (docs/REFERENCE.md, Distillers) on reference-format tensors: memory_v1 is the student's
    bank, memory_v2 the teacher's; params [K, T, Z_v1, Z_v2, m], Z_v1 for the student embedding's scores."""

    def __init__(self, state: dict, student, teacher):
        self.w = {key: value.clone().requires_grad_(key.startswith("embed")) for key, value in state.items()}
        self.student, self.teacher = student, teacher
        self.z = [float(state["contrast.params"][2]), float(state["contrast.params"][3])]

    def embed(self, features, prefix):
        e = F.linear(features, self.w[f"{prefix}.linear.weight"], self.w[f"{prefix}.linear.bias"])
        return e / e.pow(2).sum(1, keepdim=True).sqrt()

    def nce(self, scores):
        k, n = scores.shape[1] - 1, NUM_TRAIN
        positive = torch.log(scores[:, 0] / (scores[:, 0] + k / n + 1e-7))
        negative = torch.log((k / n) / (scores[:, 1:] + k / n + 1e-7))
        return -(positive.sum() + negative.sum()) / scores.shape[0]

    def step(self, images, labels, index, contrast):
        features = self.student.forward_features(images)
        logits = self.student.forward_head(features)
        e_s = self.embed(self.student.forward_head(features, pre_logits=True), "embed_s")
        with torch.no_grad():
            teacher_features = self.teacher.forward_head(self.teacher.forward_features(images), pre_logits=True)
        e_t = self.embed(teacher_features, "embed_t")  # the teacher's embedding trains too
        temperature, momentum = CRD_ARGS["crd_temperature"], CRD_ARGS["crd_momentum"]
        student_bank, teacher_bank = self.w["contrast.memory_v1"], self.w["contrast.memory_v2"]
        o_s = torch.exp(torch.einsum("bkd,bd->bk", teacher_bank[contrast], e_s) / temperature)
        o_t = torch.exp(torch.einsum("bkd,bd->bk", student_bank[contrast], e_t) / temperature)
        for side, scores in enumerate((o_s, o_t)):
            if self.z[side] < 0:
                self.z[side] = float(scores.detach().mean() * NUM_TRAIN)
        loss_kd = CRD_ARGS["kd_loss_weight"] * (self.nce(o_s / self.z[0]) + self.nce(o_t / self.z[1]))
        with torch.no_grad():
            for bank, e in ((student_bank, e_s), (teacher_bank, e_t)):
                rows = bank[index] * momentum + e * (1 - momentum)
                bank[index] = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
        return logits, {"loss_gt": CRD_ARGS["gt_loss_weight"] * F.cross_entropy(logits, labels), "loss_kd": loss_kd}


def build_crd(student, teacher):
    crd = get_distiller_class("crd")
    hparams = crd.Arguments(**{k: v for k, v in CRD_ARGS.items() if k.startswith("crd_")})
    common = DistillArguments(distiller="crd", gt_loss_weight=CRD_ARGS["gt_loss_weight"],
                              kd_loss_weight=CRD_ARGS["kd_loss_weight"])
    return crd(student, teacher, common, hparams,
               DistillContext(input_size=INPUT_SIZE, num_classes=NUM_CLASSES, train_labels=TRAIN_LABELS))


def crd_batches():
    generator = torch.Generator().manual_seed(5)
    for step, index in enumerate(INDICES):
        yield (torch.randn(len(index), *INPUT_SIZE, generator=generator), TRAIN_LABELS[index], index,
               contrast_indices(index, CRD_ARGS["crd_k"], seed=step))


def test_reference_crd_state_converts_to_the_reference_losses_and_memory():
    student, teacher = model("resnet", 0), model("vit4", 1)
    # Mid-training: both normalisers already set, to different values, so swapping them would show.
    state = reference_crd_state(96, 64, normalisers=(3.0, 40.0))
    reference = ReferenceCRD(state, copy.deepcopy(student), teacher)
    distiller = build_crd(student, teacher)
    load_reference_distiller_state(distiller, "crd", state)
    distiller.train()
    reference.student.train()
    for images, labels, index, contrast in crd_batches():
        out = distiller(images, labels, index=index, contrast_index=contrast)
        _, expected = reference.step(images, labels, index, contrast)
        for key, value in expected.items():
            assert float(out[key].detach()) == pytest.approx(float(value.detach()), rel=1e-5), key
    torch.testing.assert_close(distiller.memory.student_bank, reference.w["contrast.memory_v1"])
    torch.testing.assert_close(distiller.memory.teacher_bank, reference.w["contrast.memory_v2"])
    assert distiller.memory.normalisers.tolist() == [3.0, 40.0]


def test_reference_crd_state_must_match_the_hyperparameters():
    student, teacher = model("resnet", 0), model("vit4", 1)
    state = reference_crd_state(96, 64)
    state["contrast.params"][1] = 0.1
    with pytest.raises(ValueError, match="the reference crd state was saved with --crd-temperature 0.1, this "
                                         "distiller has 0.07; build it with the reference's value"):
        load_reference_distiller_state(build_crd(student, teacher), "crd", state)


# ---- the converter's command line ------------------------------------------------------------------------

def save_reference_checkpoint(path, student, teacher, extras: dict) -> None:
    """A reference checkpoint/ file: the student in state_dict, the whole distiller in state_dict_ema."""
    whole = {f"student.{k}": v for k, v in student.state_dict().items()}
    whole.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    whole.update(extras)
    torch.save({"epoch": 3, "state_dict": student.state_dict(), "state_dict_ema": whole}, path)


def test_cli_converts_a_reference_fitnet_checkpoint(tmp_path, capsys):
    kinds = FITNET_CASES["cnn_to_mixer"][2]
    student, teacher = model("resnet", 0), model("mixer4", 1)
    state = reference_fitnet_state(kinds, student, teacher)
    checkpoint = tmp_path / "last.pth.tar"
    save_reference_checkpoint(checkpoint, student, teacher, state)
    flags = [str(checkpoint), "--distiller", "fitnet", "--model", "test_resnet", "--num-classes", str(NUM_CLASSES),
             "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        convert(flags)
    assert "--distiller fitnet needs --teacher NAME" in capsys.readouterr().err
    convert([*flags, "--teacher", MIXER_4X4[0], "--teacher-kwargs", json.dumps(MIXER_4X4[1]), "--img-size", "32"])
    converted = load_file(str(tmp_path / "out" / "distiller.safetensors"))
    assert not any(k.startswith(("teacher.", "projector.")) for k in converted)
    distiller = build_fitnet(model("resnet", 9), teacher, list(kinds))
    missing, unexpected = distiller.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    distiller.train()
    images = torch.randn(2, *INPUT_SIZE)
    out = distiller(images, torch.tensor([0, 1]))
    with torch.no_grad():
        expected = reference_hint(kinds, state, StageLayer(copy.deepcopy(student), INPUT_SIZE)(images).stages,
                                  StageLayer(teacher, INPUT_SIZE)(images).stages)
    assert float(out["loss_fitnet"].detach()) == pytest.approx(float(expected), rel=1e-5)


def test_cli_converts_a_reference_crd_checkpoint(tmp_path, capsys):
    student, teacher = model("resnet", 0), model("vit4", 1)
    state = reference_crd_state(96, 64, normalisers=(3.0, 40.0))
    checkpoint = tmp_path / "last.pth.tar"
    save_reference_checkpoint(checkpoint, student, teacher, state)
    convert([str(checkpoint), "--distiller", "crd", "--model", "test_resnet", "--num-classes", str(NUM_CLASSES),
             "--output", str(tmp_path / "out")])
    assert "train on with the reference's --crd-k 6 --crd-temperature 0.07 --crd-momentum 0.5" in \
        capsys.readouterr().out
    converted = load_file(str(tmp_path / "out" / "distiller.safetensors"))
    torch.testing.assert_close(converted["memory.student_bank"], state["contrast.memory_v1"])
    torch.testing.assert_close(converted["memory.teacher_bank"], state["contrast.memory_v2"])
    distiller = build_crd(model("resnet", 9), teacher)
    missing, unexpected = distiller.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    distiller.train()
    reference = ReferenceCRD(state, copy.deepcopy(student), teacher)
    reference.student.train()
    images, labels, index, contrast = next(crd_batches())
    out = distiller(images, labels, index=index, contrast_index=contrast)
    expected = reference.step(images, labels, index, contrast)[1]["loss_kd"].detach()
    assert float(out["loss_kd"].detach()) == pytest.approx(float(expected), rel=1e-5)


# ---- synthetic fixtures through reference_check ----------------------------------------------------------

def grad_norm(tensors) -> float:
    return float(torch.sqrt(sum((t.grad**2).sum() for t in tensors if t.grad is not None)))


def write_fixture(path, distiller: str, student_spec, teacher_spec, state: dict, args: dict, record: dict):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "teacher": {"name": teacher_spec[0], "kwargs": teacher_spec[1]},
        "student": {"name": student_spec[0], "kwargs": student_spec[1]},
        "num_classes": NUM_CLASSES, "img_size": INPUT_SIZE[-1], "args": args,
        "distillers": {distiller: record}}))


def record_two_steps(step, student, extra: dict[str, torch.Tensor], batches) -> dict:
    """The fixture record of two training forwards and the backward of the second, from `step`'s losses."""
    record = {}
    for number, batch in enumerate(batches, start=1):
        logits, losses = step(*batch)
        record[f"step{number}"] = {key: float(value.detach()) for key, value in losses.items()}
    logits = logits.detach()
    record["step2_logits_sum"] = float(logits.sum())
    record["step2_logits_abs_sum"] = float(logits.abs().sum())
    sum(losses.values()).backward()
    record["grad_norm_student"] = grad_norm(student.parameters())
    record["grad_norm_extra"] = grad_norm(extra.values())
    modules = sorted({key.split(".")[0] for key in extra})
    record["grad_norm_extra_by_module"] = {name: grad_norm([v for k, v in extra.items() if k.startswith(name + ".")])
                                           for name in modules}
    record["extra_param_count"] = sum(v.numel() for v in extra.values())
    return record


def test_reference_check_replays_a_crd_fixture(tmp_path, capsys):
    student, teacher = model("resnet", 0), model("vit4", 1)
    extra = reference_crd_state(96, 64)  # a fresh run: Z still unset, the first batch sets it
    state = {f"student.{k}": v.clone() for k, v in student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    state.update({f"extra.crd.{k}": v for k, v in extra.items()})
    batches = list(crd_batches())
    for number, (images, labels, index, contrast) in enumerate(batches, start=1):
        state.update({f"input.x{number}": images, f"input.y{number}": labels, f"input.index{number}": index,
                      f"input.contrast_index{number}": contrast})
    state["input.train_labels"] = TRAIN_LABELS
    reference = ReferenceCRD(extra, student, teacher.eval())
    student.train()
    record = record_two_steps(reference.step, student,
                              {k: v for k, v in reference.w.items() if k.startswith("embed")}, batches)
    fixture = tmp_path / "resnet_to_vit.safetensors"
    write_fixture(fixture, "crd", MODELS["resnet"], VIT_4X4, state, CRD_ARGS, record)
    assert check([str(fixture)]) == 0
    out = capsys.readouterr().out
    assert "OK: every quantity within tolerance" in out and "grad_norm_extra.embed_t" in out

    meta = json.loads(fixture.with_suffix(".json").read_text())
    meta["distillers"]["crd"]["step2"]["loss_kd"] *= 1.01
    fixture.with_suffix(".json").write_text(json.dumps(meta))
    assert check([str(fixture), "--distiller", "crd"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_reference_check_replays_a_fitnet_fixture(tmp_path, capsys):
    student_name, teacher_name, kinds = FITNET_CASES["vit_to_cnn"]
    student, teacher = model(student_name, 0), model(teacher_name, 1)
    extra = reference_fitnet_state(kinds, student, teacher)
    state = {f"student.{k}": v.clone() for k, v in student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    state.update({f"extra.fitnet.{k}": v for k, v in extra.items()})
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(4, *INPUT_SIZE, generator=generator), torch.randint(NUM_CLASSES, (4,), generator=generator))
               for _ in range(2)]
    for number, (images, labels) in enumerate(batches, start=1):
        state.update({f"input.x{number}": images, f"input.y{number}": labels})
    args = {"fitnet_stages": list(kinds), "fitnet_loss_weight": 2.0, "kd_loss_weight": 0.5, "kd_temperature": 2.0}
    weights = {key: value.clone().requires_grad_() for key, value in extra.items()}
    teacher.eval()  # the reference's FitNet.forward puts the teacher in eval mode
    student_stages, teacher_stages = StageLayer(student, INPUT_SIZE), StageLayer(teacher, INPUT_SIZE)

    def step(images, labels):
        s = student_stages(images)
        with torch.no_grad():
            t = teacher_stages(images)
        temperature = args["kd_temperature"]
        kd = F.kl_div(F.log_softmax(s.logits / temperature, 1), F.softmax(t.logits / temperature, 1),
                      reduction="batchmean") * temperature**2
        return s.logits, {"loss_gt": F.cross_entropy(s.logits, labels), "loss_kd": args["kd_loss_weight"] * kd,
                          "loss_fitnet": args["fitnet_loss_weight"] * reference_hint(kinds, weights, s.stages,
                                                                                     t.stages)}

    student.train()
    record = record_two_steps(step, student, weights, batches)
    fixture = tmp_path / "vit_to_resnet.safetensors"
    write_fixture(fixture, "fitnet", VIT_4X4, MODELS["resnet"], state, args, record)
    assert check([str(fixture)]) == 0, capsys.readouterr().out
    assert "grad_norm_extra.projector" in capsys.readouterr().out


def test_cli_converts_a_student_holding_one_module_under_two_names(tmp_path):
    # CoaT reuses each convolutional position encoding under two names; torch.load keeps the sharing, and
    # safetensors refuses shared tensors ("Some tensors share memory").
    student = create_model("coat_tiny", NUM_CLASSES, {"img_size": 32})
    assert student.serial_blocks1[0].cpe is student.cpe1
    checkpoint = tmp_path / "last.pth.tar"
    save_reference_checkpoint(checkpoint, student, model("resnet", 1), {})
    convert([str(checkpoint), "--distiller", "kd", "--model", "coat_tiny", "--model-kwargs", '{"img_size": 32}',
             "--num-classes", str(NUM_CLASSES), "--output", str(tmp_path / "out")])
    loaded = create_model("coat_tiny", NUM_CLASSES, {"img_size": 32})
    loaded.load_state_dict(load_file(str(tmp_path / "out" / "student.safetensors")), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), student.eval()(images))
    assert set(load_file(str(tmp_path / "out" / "distiller.safetensors"))) == {
        f"student.{k}" for k in student.state_dict()}


def test_cli_writes_both_files_or_neither(tmp_path, monkeypatch):
    student, teacher = model("resnet", 0), model("vit4", 1)
    checkpoint = tmp_path / "last.pth.tar"
    save_reference_checkpoint(checkpoint, student, teacher, {})
    output = tmp_path / "out"
    flags = [str(checkpoint), "--distiller", "kd", "--model", "test_resnet", "--num-classes", str(NUM_CLASSES),
             "--output", str(output)]
    convert(flags)
    earlier = {name: (output / name).read_bytes() for name in ("student.safetensors", "distiller.safetensors")}

    written = []

    def full_disk_on_second_file(state, path):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        save_file(state, path)

    monkeypatch.setattr("pat_hf.reference.convert.save_file", full_disk_on_second_file)
    save_reference_checkpoint(checkpoint, model("resnet", 5), teacher, {})
    with pytest.raises(OSError, match="No space left"):
        convert(flags)
    assert written == [str(output / "student.safetensors.partial")]
    assert {path.name: path.read_bytes() for path in output.iterdir()} == earlier
