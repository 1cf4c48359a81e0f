import argparse
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from pat_hf.models.factory import create_model, create_teacher, read_state_dict


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model 'resnet19'"):
        create_model("resnet19", 10)


def test_overriding_a_variant_default_that_timm_refuses():
    model = create_model("mixer_s16_224", 10, {"embed_dim": 32, "num_blocks": 4, "patch_size": 4, "img_size": 32})
    assert model.stem.proj.weight.shape == (32, 3, 4, 4) and len(model.blocks) == 4
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_missing_teacher_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found: .*nope.safetensors"):
        create_teacher("test_resnet", str(tmp_path / "nope.safetensors"), 10)


def test_teacher_needs_a_checkpoint():
    with pytest.raises(ValueError, match="--teacher test_resnet needs --teacher-pretrained"):
        create_teacher("test_resnet", "", 10)


def test_class_count_mismatch_is_explained(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=100).state_dict(), str(path))
    with pytest.raises(ValueError, match="100-class classifier but the model has 10 classes; pass --num-classes 100"):
        create_teacher("test_resnet", str(path), 10)


def test_teacher_is_frozen_and_in_eval_mode(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "teacher.safetensors"
    save_file(source.state_dict(), str(path))
    teacher = create_teacher("test_resnet", str(path), 10)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x), source.eval()(x))


def test_timm_checkpoint_saver_file_with_args_loads_safely(tmp_path):
    """OFA-KD/PAT teacher files are timm CheckpointSaver dicts with an argparse Namespace inside."""
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "teacher.pth.tar"
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": {f"module.{k}": v for k, v in
                                                                 source.state_dict().items()},
                "args": argparse.Namespace(lr=0.1, model_ema_decay=[0.9998]), "metric": 91.5}, path)
    teacher = create_teacher("test_resnet", str(path), 10)
    assert torch.equal(teacher.fc.weight, source.fc.weight)


def test_ema_weights_are_taken_when_asked(tmp_path):
    raw, ema = (timm.create_model("test_resnet", num_classes=10) for _ in range(2))
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    assert torch.equal(read_state_dict(str(path), use_ema=True)["fc.weight"], ema.fc.weight)
    assert torch.equal(read_state_dict(str(path))["fc.weight"], raw.fc.weight)


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": torch.nn.ReLU()}, path)
    with pytest.raises(ValueError, match="refused by safe loading"):
        read_state_dict(str(path))


def test_timm_065_swin_layout_is_remapped(tmp_path):
    """timm 0.6.5 put Swin's patch merging at the end of each stage and named the classifier `head`."""
    kwargs = {"img_size": 32, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 2}
    source = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **kwargs)
    old = {}
    for key, value in source.state_dict().items():
        if "relative_position_index" in key or "attn_mask" in key:
            continue
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        old[key.replace("head.fc.", "head.")] = value
    path = tmp_path / "swin_065.safetensors"
    save_file(old, str(path))
    teacher = create_teacher("swin_tiny_patch4_window7_224", str(path), 10, kwargs)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(teacher(x), source.eval()(x))
