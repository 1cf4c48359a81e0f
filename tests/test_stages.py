"""The stage layer: the reference's stage choices (docs/REFERENCE.md, Stages) and the generalisation to other models."""

import pytest
import torch

from pat_hf.models import create_model
from pat_hf.stages import StageLayer

SIZE_224 = (3, 224, 224)

# Narrow variants of the reference's models keep its spatial shapes; channel counts scale with the widths.
REFERENCE_TABLE = [
    ("resnet18", {"layers": [1, 1, 1, 1]},
     [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
     [(64, 56, 56), (64, 56, 56), (128, 28, 28), (256, 14, 14)], 512),
    ("convnext_tiny", {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)},
     [(8, 56, 56), (16, 28, 28), (32, 14, 14), (64, 7, 7)],
     [(8, 56, 56), (8, 56, 56), (16, 28, 28), (32, 14, 14)], 64),
    ("mobilenetv2_050", {},
     [(16, 56, 56), (16, 28, 28), (48, 14, 14), (1280, 7, 7)], None, 1280),
    ("swin_tiny_patch4_window7_224", {"embed_dim": 8, "num_heads": (1, 1, 1, 1)},
     [(3136, 8), (784, 16), (196, 32), (49, 64)],
     [(3136, 8), (784, 16), (196, 32), (49, 64)], 64),
    ("deit_tiny_patch16_224", {"embed_dim": 12, "num_heads": 1},
     [(197, 12)] * 4, [(197, 12)] * 4, 12),
    ("mixer_b16_224", {"embed_dim": 8},
     [(196, 8)] * 4, [(196, 8)] * 4, 8),
]


@pytest.mark.parametrize("name,kwargs,stages,inputs,pooled", REFERENCE_TABLE, ids=[r[0] for r in REFERENCE_TABLE])
def test_reference_stage_table(name, kwargs, stages, inputs, pooled):
    layer = StageLayer(create_model(name, 10, kwargs), SIZE_224)
    assert layer.stage_shapes == stages
    if inputs is not None:
        assert layer.stage_input_shapes == inputs
    assert layer.pooled_dim == pooled


def test_vit_blocks_1_3_9_11_with_class_token_first():
    model = create_model("deit_tiny_patch16_224", 10, {"embed_dim": 12, "num_heads": 1})
    layer = StageLayer(model, SIZE_224)
    assert layer.plan.ends == ("blocks.1", "blocks.3", "blocks.9", "blocks.11")
    assert layer.plan.starts == ("blocks.0", "blocks.2", "blocks.4", "blocks.10")
    assert layer.num_prefix_tokens == 1
    x = torch.randn(1, *SIZE_224)
    out = layer(x)
    tokens = model.forward_intermediates(x, indices=[11], return_prefix_tokens=True, intermediates_only=True,
                                         output_fmt="NLC")[0]
    patches, prefix = tokens
    assert torch.allclose(out.stages[3][:, :1], prefix) and torch.allclose(out.stages[3][:, 1:], patches)


def test_mobilenetv2_stage_four_is_the_head_conv():
    layer = StageLayer(create_model("mobilenetv2_050", 10), SIZE_224)
    assert layer.plan.ends == ("blocks.1", "blocks.2", "blocks.4", "bn2")


def test_one_forward_gives_stages_pooled_and_logits():
    model = create_model("resnet18", 10, {"layers": [1, 1, 1, 1]}).eval()
    x = torch.randn(2, 3, 64, 64)
    out = StageLayer(model, (3, 64, 64))(x)
    assert torch.equal(out.logits, model(x))
    assert torch.equal(out.stages[3], model.layer4(model.layer3(model.layer2(model.layer1(
        model.maxpool(model.act1(model.bn1(model.conv1(x)))))))))
    assert torch.allclose(out.pooled, model.forward_head(model.forward_features(x), pre_logits=True))


GENERALISED = [
    ("test_resnet", {}), ("test_convnext", {}), ("test_efficientnet", {}), ("efficientnet_b0", {}),
    ("regnetx_002", {}), ("convnextv2_atto", {}), ("mobilenetv3_small_050", {}),
    ("test_vit", {"img_size": 32, "patch_size": 4}),
    ("eva02_tiny_patch14_224", {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 16, "num_heads": 1}),
    ("beit_base_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 5, "embed_dim": 16, "num_heads": 1}),
    ("resmlp_12_224", {"img_size": 32, "patch_size": 4, "embed_dim": 16, "num_blocks": 8}),
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "embed_dim": 8, "window_size": 2,
                                      "num_heads": (1, 1, 1, 1)}),
]


@pytest.mark.parametrize("name,kwargs", GENERALISED, ids=[g[0] for g in GENERALISED])
def test_every_family_gives_four_stages_and_takes_prompts(name, kwargs):
    model = create_model(name, 10, kwargs).eval()
    layer = StageLayer(model, (3, 32, 32))
    assert len(layer.stage_shapes) == 4 and len(set(layer.plan.ends)) == 4
    if not layer.is_sequence:
        sides = [shape[-1] for shape in layer.stage_shapes]
        assert sides == sorted(sides, reverse=True)
    x = torch.randn(2, 3, 32, 32)
    plain = layer(x)
    assert torch.allclose(plain.logits, model(x))
    seen = []
    identity = {k: (lambda t, k=k: seen.append((k, tuple(t.shape[1:]))) or t) for k in range(4)}
    assert torch.allclose(layer(x, identity).logits, plain.logits)
    assert seen == list(enumerate(layer.stage_input_shapes))
    noise = torch.randn(2, *layer.stage_input_shapes[2])
    prompted = layer(x, {2: lambda t: t + noise})
    assert not torch.allclose(prompted.pooled, plain.pooled)
    assert torch.allclose(prompted.stages[1], plain.stages[1])


def test_any_input_size():
    model = create_model("test_convnext", 10)
    assert StageLayer(model, (3, 32, 32)).stage_shapes[0][-1] * 2 == StageLayer(model, (3, 64, 64)).stage_shapes[0][-1]


def test_hooks_do_not_outlive_the_forward():
    model = create_model("test_resnet", 10)
    layer = StageLayer(model, (3, 32, 32))
    layer(torch.randn(2, 3, 32, 32), {0: lambda t: t})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_too_shallow_isotropic_model_is_refused():
    with pytest.raises(ValueError, match="needs at least 4 blocks"):
        StageLayer(create_model("test_vit", 10, {"img_size": 32, "patch_size": 4, "depth": 3}), (3, 32, 32))
