"""PAT beyond the fixtures: parameter counts of the paper's pairs, both modes, the feedback state."""

import dataclasses

import pytest
import torch

from pat_hf.distillers import DistillArguments, DistillContext
from pat_hf.distillers.pat import PAT, PATArguments
from pat_hf.models.factory import create_model
from pat_hf.modules.prompt_block import PromptBlock
from pat_hf.modules.quirks import PATQuirks
from pat_hf.modules.region_attention import RegionAttention
from pat_hf.modules.token_grid import FeatureGrid

SIZE_32 = (3, 32, 32)


def build(teacher, student, size=SIZE_32, num_classes=10, **hparams) -> PAT:
    hp = PATArguments(**{"pat_raa_dim": 32, "pat_raa_num_queries": 16, **hparams})
    return PAT(student, teacher, DistillArguments(distiller="pat"), hp, DistillContext(size, num_classes))


def vit(**kw):
    return create_model("test_vit", 10, {"img_size": 32, "patch_size": 4, **kw})


@pytest.mark.parametrize("teacher,student,kwargs,extra", [
    ("convnext_tiny", "deit_tiny_patch16_224", {}, 14_475_236),
    ("swin_tiny_patch4_window7_224", "resnet18", {}, 38_521_997),
])
def test_extra_parameters_match_the_reference_at_full_size(teacher, student, kwargs, extra):
    """docs/REFERENCE.md, PAT: ConvNeXt-T -> DeiT-T adds 14,475,236 trainable parameters, Swin-T -> ResNet18
    38,521,997."""
    distiller = PAT(create_model(student, 100), create_model(teacher, 100), DistillArguments(distiller="pat"),
                    PATArguments(), DistillContext((3, 224, 224), 100))
    assert sum(p.numel() for p in distiller.extra_parameters()) == extra


def test_reference_mode_scrambles_a_sequence_teacher_even_with_zero_prompts():
    """docs/REFERENCE.md, Quirks: with beta = 0 the reference's prompted ViT differs from the plain one; ours
    does not."""
    teacher, student = vit(), create_model("test_resnet", 10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    losses = {}
    for mode in ("reference", "corrected"):
        distiller = build(teacher, student, pat_mode=mode).train()
        losses[mode] = float(distiller(x, y)["loss_pat_reg"].detach())
    assert losses["reference"] > 1e-4
    assert losses["corrected"] == pytest.approx(0.0, abs=1e-7)


def test_cnn_teacher_is_untouched_by_zero_prompts_in_both_modes():
    teacher, student = create_model("test_convnext", 10), vit()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for mode in ("reference", "corrected"):
        loss = build(teacher, student, pat_mode=mode).train()(x, y)["loss_pat_reg"]
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)


def test_corrected_prompt_keeps_the_class_token_first_and_varies_over_space():
    block = PromptBlock((16, 8), (17, 8), SIZE_32, PATQuirks.all(False), num_prefix_tokens=1)
    block.beta.data.fill_(1.0)
    x = torch.randn(2, 17, 8)
    out = block(x)
    assert torch.equal(out[:, 0], x[:, 0])
    delta = (out - x)[:, 1:]
    assert delta.std(dim=1).mean() > 0  # a spatially varying prompt
    reference = PromptBlock((16, 8), (17, 8), SIZE_32, PATQuirks.all(True))
    reference.beta.data.fill_(1.0)
    grid_in = x[:, :16].transpose(1, 2)  # (B, C, L): the reference's map of the first 16 tokens
    grid_out = reference(x)[:, :16].reshape(2, 8, 16)  # undo its reshape back to tokens
    assert (grid_out - grid_in).std(dim=2).max() < 1e-6  # the reference's prompt is constant over space (Quirks)


def test_reference_positional_encoding_depends_on_batch_position():
    """docs/REFERENCE.md, Quirks: the reference indexes the encoding by the sample's place in the batch."""
    grids = [FeatureGrid.of((8, 8, 8), SIZE_32)] * 4
    features = [torch.randn(3, 8, 8, 8) for _ in range(4)]
    swapped = [f[[1, 0, 2]] for f in features]
    for batch_indexed, equivariant in ((True, False), (False, True)):
        attention = RegionAttention(grids, num_queries=16, dim=16, heads=8,
                                    batch_indexed_position=batch_indexed).eval()
        out, out_swapped = attention(features)[0], attention(swapped)[0]
        assert torch.allclose(out[[1, 0, 2]], out_swapped, atol=1e-6) == equivariant


def test_num_queries_must_be_four_squares():
    with pytest.raises(ValueError, match="--pat-raa-num-queries must be 4\\*k\\*k.*got 80"):
        build(create_model("test_convnext", 10), vit(), pat_raa_num_queries=80)


def test_feedback_survives_batch_size_changes_and_round_trips():
    teacher, student = create_model("test_convnext", 10), vit()
    distiller = build(teacher, student, pat_mode="corrected").train()
    for block in distiller.prompt_blocks.values():
        block.beta.data.fill_(0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    distiller(x, y)
    state = distiller.process_state_dict()
    assert sorted(state) == sorted([f"feedback_{s}.{k}" for s in ("student", "teacher") for k in range(4)])
    distiller(x[:3], y[:3])  # the last, smaller batch of an epoch: no crash, no feedback used
    distiller.load_process_state_dict(state)
    expected = distiller(x, y)["loss"]
    distiller.load_process_state_dict(state)
    assert torch.equal(distiller(x, y)["loss"], expected)
    distiller.load_process_state_dict({})
    assert not torch.equal(distiller(x, y)["loss"], expected)


def test_evaluation_runs_the_student_alone():
    teacher, student = create_model("test_convnext", 10), vit()
    distiller = build(teacher, student).eval()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(distiller(x, torch.tensor([0, 1]))["logits"], student(x))
    assert not calls and distiller.process_state_dict() == {}


def test_bad_stage_selection():
    with pytest.raises(ValueError, match="--pat-afp-stage takes stages 1-4"):
        build(create_model("test_convnext", 10), vit(), pat_afp_stage=[0, 5])


def test_bad_mode():
    with pytest.raises(ValueError, match="--pat-mode must be one of"):
        build(create_model("test_convnext", 10), vit(), pat_mode="fixed")


def test_hyperparameters_have_the_reference_defaults():
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(PATArguments)}
    assert defaults == {"pat_afp_stage": [1, 2, 3, 4], "pat_mse_loss_weight": 1.0, "pat_reg_loss_weight": 1.0,
                        "pat_raa_num_queries": 64, "pat_raa_dim": 512, "pat_mode": "reference"}


def test_each_mode_turns_all_four_named_quirks_on_or_off():
    names = {f.name for f in dataclasses.fields(PATQuirks)}
    assert names == {"reshape_instead_of_permute", "last_token_as_class", "batch_indexed_position",
                     "gate_only_excitation"}
    assert PATArguments(pat_mode="reference").quirks == PATQuirks(True, True, True, True)
    assert PATArguments(pat_mode="corrected").quirks == PATQuirks(False, False, False, False)


def test_the_reshape_quirk_alone_scrambles_a_zero_prompt():
    x = torch.randn(2, 17, 8)
    for reshape, unchanged in ((False, True), (True, False)):
        quirks = dataclasses.replace(PATQuirks.all(False), reshape_instead_of_permute=reshape)
        block = PromptBlock((16, 8), (17, 8), SIZE_32, quirks, num_prefix_tokens=1)
        assert torch.equal(block(x), x) == unchanged


def test_last_token_as_class_sets_the_last_token_of_a_non_square_sequence_aside():
    x = torch.arange(17 * 2, dtype=torch.float32).reshape(1, 17, 2)
    reference = FeatureGrid.of((17, 2), SIZE_32, num_prefix_tokens=1, last_token_as_class=True)
    corrected = FeatureGrid.of((17, 2), SIZE_32, num_prefix_tokens=1)
    assert (reference.size, corrected.size) == ((4, 4), (4, 4))
    tokens, aside = reference.split(x)
    assert torch.equal(aside, x[:, 16:]) and torch.equal(reference.join(tokens, aside), x)
    tokens, aside = corrected.split(x)
    assert torch.equal(aside, x[:, :1]) and torch.equal(corrected.join(tokens, aside), x)
    assert torch.equal(reference.split(x[:, :16])[0], x[:, :16])  # a square sequence keeps every token


SIZE_32X64 = (3, 32, 64)


def wide_vit():
    return create_model("test_vit", 10, {"img_size": (32, 64), "patch_size": 4})


@pytest.mark.parametrize("teacher_is_vit", [True, False])
def test_corrected_mode_handles_a_non_square_token_grid(teacher_is_vit):
    """A ViT at 32x64 has an 8x16 token grid; the corrected mode lays it out as FitNet and OFA do."""
    teacher, student = (wide_vit(), create_model("test_resnet", 10)) if teacher_is_vit else (
        create_model("test_resnet", 10), wide_vit())
    distiller = build(teacher, student, SIZE_32X64, pat_mode="corrected").train()
    x, y = torch.randn(2, *SIZE_32X64), torch.tensor([1, 2])
    distiller(x, y)
    out = distiller(x, y)  # with the first step's feedback
    out["loss"].backward()
    assert all(torch.isfinite(value) for key, value in out.items() if key.startswith("loss"))
    # beta = 0: the prompted teacher is the plain one, which a wrong token layout would break for the ViT.
    assert float(out["loss_pat_reg"].detach()) == pytest.approx(0.0, abs=1e-7)
    grids = distiller.teacher_grids if teacher_is_vit else [p.grid for p in distiller.region_attention.projectors]
    assert grids[0].size == (8, 16)


def test_reference_mode_refuses_a_token_grid_that_is_not_square():
    with pytest.raises(ValueError, match="129 tokens do not form a square grid.*use --pat-mode corrected"):
        build(create_model("test_resnet", 10), wide_vit(), SIZE_32X64, pat_mode="reference")
