"""PAT beyond the fixtures: parameter counts of the paper's pairs, both modes, the feedback state."""

import dataclasses

import pytest
import torch

from pat_hf.distillers import DistillArguments, DistillContext
from pat_hf.distillers.pat import PAT, PATArguments
from pat_hf.models import create_model
from pat_hf.modules.prompt_block import PromptBlock
from pat_hf.modules.region_attention import RegionAttention

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
    """SPEC §3.10: ConvNeXt-T -> DeiT-T adds 14,475,236 trainable parameters, Swin-T -> ResNet18 38,521,997."""
    distiller = PAT(create_model(student, 100), create_model(teacher, 100), DistillArguments(distiller="pat"),
                    PATArguments(), DistillContext((3, 224, 224), 100))
    assert sum(p.numel() for p in distiller.extra_parameters()) == extra


def test_reference_mode_scrambles_a_sequence_teacher_even_with_zero_prompts():
    """SPEC §6.1: with beta = 0 the reference's prompted ViT differs from the plain one; ours does not."""
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
    block = PromptBlock((16, 8), (17, 8), faithful=False, num_prefix_tokens=1)
    block.beta.data.fill_(1.0)
    x = torch.randn(2, 17, 8)
    out = block(x)
    assert torch.equal(out[:, 0], x[:, 0])
    delta = (out - x)[:, 1:]
    assert delta.std(dim=1).mean() > 0  # a spatially varying prompt
    faithful = PromptBlock((16, 8), (17, 8), faithful=True)
    faithful.beta.data.fill_(1.0)
    grid_in = x[:, :16].transpose(1, 2)  # (B, C, L): the reference's map of the first 16 tokens
    grid_out = faithful(x)[:, :16].reshape(2, 8, 16)  # undo its reshape back to tokens
    assert (grid_out - grid_in).std(dim=2).max() < 1e-6  # the reference's prompt is constant over space (§6.4)


def test_reference_positional_encoding_depends_on_batch_position():
    """SPEC §6.3: the reference indexes the encoding by the sample's place in the batch."""
    shapes = [(8, 8, 8)] * 4
    features = [torch.randn(3, 8, 8, 8) for _ in range(4)]
    swapped = [f[[1, 0, 2]] for f in features]
    for faithful, equivariant in ((True, False), (False, True)):
        attention = RegionAttention(shapes, num_queries=16, dim=16, heads=8, faithful=faithful).eval()
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
