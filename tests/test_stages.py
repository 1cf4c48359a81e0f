"""The stage layer: the reference's stage choices (docs/REFERENCE.md, Stages) and the generalisation to other models."""

import math

import pytest
import torch
from einops import rearrange
from timm.models.nest import deblockify

from pat_hf.models.factory import create_model
from pat_hf.models.stages.layer import StageLayer

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


# Families whose feature_info the generic hierarchical / isotropic rules alone do not cover: fewer than four
# resolutions, tuple outputs, NHWC outputs without `output_fmt`, late class tokens, token orders, mixed layouts,
# feature_info names that are no modules. (variant, kwargs, input side)
ANY_LAYOUT = [
    ("levit_128s", {}, 32),  # three token resolutions
    ("efficientvit_m0", {}, 32),  # three map resolutions
    ("pit_ti_224", {}, 32),  # (map, class token) outputs, token blocks inside map stages
    ("volo_d1_224", {}, 32),  # NHWC without output_fmt, reductions 8, 16, 16, 16
    ("sequencer2d_s", {}, 32),  # NHWC, reductions 7, 14, 14, 14
    ("cait_xxs24_224", {}, 32),  # class token only after the blocks
    ("convit_tiny", {}, 32),  # class token added before the last two blocks
    ("tnt_s_legacy_patch16_224", {}, 32),  # (pixel tokens, patch tokens) block inputs and outputs
    ("coat_tiny", {}, 32),  # feature_info names the parallel blocks for three scales
    ("crossvit_tiny_240", {}, 72),  # two branches in every block
    ("hrnet_w18_small", {}, 32),  # feature_info modules that do not exist
    ("twins_svt_small", {}, 32),  # feature_info `block.k` for `blocks.k`, a ModuleList
    ("hiera_tiny_224", {"embed_dim": 16, "num_heads": 1}, 64),  # unrolled token order
    ("nest_tiny", {}, 32),  # three resolutions, blockified tokens inside
    ("efficientformer_l1", {}, 224),  # three map stages and a token stage
    ("gemma4_vit_167m", {"embed_dim": 64, "num_heads": 1, "num_kv_heads": 1, "head_dim": 64,
                         "intermediate_size": 128}, 32),  # feature_info names the blocks inside its encoder
]
EVERY_FAMILY = [(name, kwargs, 32) for name, kwargs in GENERALISED] + ANY_LAYOUT


@pytest.mark.parametrize("name,kwargs,side", EVERY_FAMILY, ids=[a[0] for a in EVERY_FAMILY])
def test_every_family_gives_four_stages_in_a_canonical_layout_and_takes_prompts(name, kwargs, side):
    model = create_model(name, 10, kwargs, img_size=side).eval()
    layer = StageLayer(model, (3, side, side))
    assert len(layer.stage_shapes) == 4 and len(set(layer.plan.ends)) == 4
    x = torch.randn(2, 3, side, side)
    plain = layer(x)
    assert torch.allclose(plain.logits, model(x))
    for stage, shape in zip(plain.stages, layer.stage_shapes):
        assert stage.ndim == (3 if layer.is_sequence else 4) and tuple(stage.shape[1:]) == shape
    if layer.is_sequence:
        patches = [shape[0] - layer.num_prefix_tokens for shape in layer.stage_shapes]
        assert all(math.isqrt(n) ** 2 == n for n in patches)  # square inputs give square token grids
    else:
        sides = [shape[-1] for shape in layer.stage_shapes]
        assert sides == sorted(sides, reverse=True)
    seen = []
    identity = {k: (lambda t, k=k: seen.append((k, tuple(t.shape[1:]))) or t) for k in range(4)}
    assert torch.allclose(layer(x, identity).logits, plain.logits)
    assert seen == list(enumerate(layer.stage_input_shapes))
    noise = torch.randn(2, *layer.stage_input_shapes[2])
    prompted = layer(x, {2: lambda t: t + noise})
    assert not torch.allclose(prompted.pooled, plain.pooled)
    assert torch.allclose(prompted.stages[1], plain.stages[1])


def test_three_resolutions_split_the_deepest_along_its_blocks():
    layer = StageLayer(create_model("levit_128s", 10, img_size=64), (3, 64, 64))  # depths 2, 3, 4
    assert layer.plan.ends == ("stages.0", "stages.1", "stages.2.blocks.1", "stages.2")
    assert layer.plan.starts == ("stages.0", "stages.1", "stages.2", "stages.2.blocks.2")
    assert layer.is_sequence and layer.stage_shapes == [(16, 128), (4, 256), (1, 384), (1, 384)]


def test_a_class_token_added_late_is_dropped_from_the_stages_that_have_it():
    model = create_model("convit_tiny", 10, img_size=64).eval()  # the class token joins before block 10 of 12
    layer = StageLayer(model, (3, 64, 64))
    assert layer.num_prefix_tokens == 0 and layer.stage_shapes == [(16, 192)] * 4
    x = torch.randn(1, 3, 64, 64)
    last_block = {}
    handle = model.blocks[11].register_forward_hook(lambda _m, _i, out: last_block.setdefault("out", out))
    stages = layer(x).stages
    handle.remove()
    assert torch.equal(stages[3], last_block["out"][:, 1:])


def test_hiera_tokens_are_put_back_in_row_major_order():
    model = create_model("hiera_tiny_224", 10, {"embed_dim": 16, "num_heads": 1}, img_size=64).eval()
    layer = StageLayer(model, (3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    out = layer(x)
    rerolled = model.forward_intermediates(x, indices=4, norm=False, output_fmt="NHWC", intermediates_only=True)
    for stage, reference in zip(out.stages, rerolled):
        assert torch.allclose(stage, rearrange(reference, "b h w c -> b (h w) c"), atol=1e-6)
    inputs = {}
    layer(x, {1: lambda t: inputs.setdefault(1, t)})
    assert torch.allclose(inputs[1], out.stages[0], atol=1e-6)  # stage 2 starts where stage 1 ends


def test_nest_image_blocks_are_laid_back_on_the_image_grid():
    model = create_model("nest_tiny", 10, img_size=64).eval()
    layer = StageLayer(model, (3, 64, 64))
    assert layer.plan.ends[2].startswith("levels.2.transformer_encoder.")
    x = torch.randn(1, 3, 64, 64)
    raw = {}
    handle = model.get_submodule(layer.plan.ends[2]).register_forward_hook(lambda _m, _i, out: raw.setdefault("x", out))
    stage = layer(x).stages[2]
    handle.remove()
    expected = rearrange(deblockify(raw["x"], model.levels[2].block_size), "b h w c -> b c h w")
    assert torch.equal(stage, expected)


def test_a_token_stage_of_a_map_model_is_laid_on_its_grid():
    model = create_model("efficientformer_l1", 10).eval()
    layer = StageLayer(model, (3, 224, 224))
    assert not layer.is_sequence and layer.stage_shapes[3] == (448, 7, 7)
    x = torch.randn(1, 3, 224, 224)
    tokens = model.stages[3](model.stages[2](model.stages[1](model.stages[0](model.stem(x)))))
    assert torch.equal(layer(x).stages[3], rearrange(tokens, "b (h w) c -> b c h w", h=7))


def test_a_tuple_output_gives_its_widest_feature_not_the_class_token():
    model = create_model("pit_ti_224", 10, img_size=64).eval()
    layer = StageLayer(model, (3, 64, 64))
    raw = {}
    handle = model.transformers[0].register_forward_hook(lambda _m, _i, out: raw.setdefault("out", out))
    stage = layer(torch.randn(1, 3, 64, 64)).stages[0]
    handle.remove()
    features, class_token = raw["out"]
    assert class_token.shape == (1, 1, 64) and torch.equal(stage, features)


def test_a_4d_tensor_is_read_in_the_layout_that_puts_it_on_the_image_grid():
    # EfficientViT-B0's first stage input at 32 pixels is (8, 16, 16): its height is the stage's width (16).
    layer = StageLayer(create_model("efficientvit_b0", 10), (3, 32, 32))
    assert layer.stage_input_shapes[0] == (8, 16, 16) and layer.stage_shapes[0] == (16, 8, 8)
