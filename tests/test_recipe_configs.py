"""The reference's YAML configs and scripted experiments, and the recipe flags' validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from timm.loss import BinaryCrossEntropy

from pat_hf.cli.parser import parse_arguments
from pat_hf.data.transforms import build_criterion

torch.set_num_threads(1)
# The reference's default distiller (ofa) may not be in this checkout; the recipe does not depend on it.
DISTILLER = ["--distiller", "vanilla", "--teacher", ""]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The reference's YAML recipes, value by value (docs/REFERENCE.md, Recipe).
REFERENCE_CONFIGS = {
    "cifar/cnn.yaml": dict(epochs=300, batch_size=128, lr=0.05, min_lr=1e-3, opt="sgd", weight_decay=2e-3,
                           sched="cosine", warmup_epochs=3, color_jitter=0, smoothing=0.1, num_classes=100),
    "cifar/vit_mlp.yaml": dict(epochs=300, batch_size=128, lr=5e-4, min_lr=1e-5, opt="adamw", weight_decay=0.05,
                               sched="cosine", warmup_epochs=20, warmup_lr=5e-7, clip_grad=5.0, smoothing=0.1,
                               color_jitter=0.4, reprob=0.25, aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
                               num_classes=100),
    "imagenet/cnn.yaml": dict(epochs=100, batch_size=64, lr=0.1, min_lr=1e-6, opt="sgd", weight_decay=1e-4,
                              sched="step", decay_epochs=30, warmup_epochs=3, color_jitter=0, smoothing=0.1),
    "imagenet/vit_mlp.yaml": dict(epochs=300, batch_size=128, lr=5e-4, min_lr=1e-6, opt="adamw", weight_decay=0.05,
                                  sched="cosine", warmup_epochs=20, warmup_lr=5e-7, clip_grad=5.0, drop=0,
                                  drop_path=0, smoothing=0.1, color_jitter=0.4, reprob=0.25,
                                  aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, model_ema=True,
                                  model_ema_decay=[0.99996]),
    "imagenet/stronger.yaml": dict(epochs=300, batch_size=256, lr=5e-3, opt="lamb", sched="cosine",
                                   weight_decay=0.02, warmup_epochs=5, warmup_lr=1e-6, smoothing=0.0, drop=0,
                                   drop_path=0.05, aug_repeats=3, aa="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0,
                                   color_jitter=0, crop_pct=0.95, bce_loss=True, model_ema=True,
                                   model_ema_decay=[0.9998]),
}
# Where each reference key lands once parsed.
FIELD_OF_KEY = {
    "epochs": ("training", "num_train_epochs"), "batch_size": ("training", "per_device_train_batch_size"),
    "lr": ("training", "learning_rate"), "weight_decay": ("training", "weight_decay"),
    "clip_grad": ("training", "max_grad_norm"), "min_lr": ("recipe", "min_lr"), "opt": ("recipe", "opt"),
    "sched": ("recipe", "sched"), "warmup_epochs": ("recipe", "warmup_epochs"), "warmup_lr": ("recipe", "warmup_lr"),
    "decay_epochs": ("recipe", "decay_epochs"), "model_ema": ("recipe", "model_ema"),
    "model_ema_decay": ("recipe", "model_ema_decay"), "color_jitter": ("data", "color_jitter"),
    "smoothing": ("data", "smoothing"), "reprob": ("data", "reprob"), "aa": ("data", "aa"),
    "mixup": ("data", "mixup"), "cutmix": ("data", "cutmix"), "aug_repeats": ("data", "aug_repeats"),
    "crop_pct": ("data", "crop_pct"), "bce_loss": ("data", "bce_loss"), "num_classes": ("model", "num_classes"),
    "drop": ("model", "drop"), "drop_path": ("model", "drop_path"),
}


def assert_parsed(args, key: str, expected) -> None:
    section, name = FIELD_OF_KEY[key]
    value = getattr(getattr(args, section), name)
    if isinstance(expected, bool | str):
        assert value == expected, key
    else:  # YAML's 5.0e-4 and Python's 5e-4 may differ in the last bit
        assert value == pytest.approx(expected, rel=1e-12), key


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_config_matches_the_reference(name):
    expected = REFERENCE_CONFIGS[name]
    assert set(yaml.safe_load((CONFIGS / name).read_text())) == set(expected)
    args = parse_arguments(["--config", str(CONFIGS / name), *DISTILLER])
    for key, value in expected.items():
        assert_parsed(args, key, value)


def test_gradient_clipping_only_where_configured():
    assert parse_arguments(DISTILLER).training.max_grad_norm == 0  # the Trainer's default of 1.0 must not apply
    assert parse_arguments(["--config", str(CONFIGS / "cifar/cnn.yaml"), *DISTILLER]).training.max_grad_norm == 0
    assert parse_arguments(["--config", str(CONFIGS / "imagenet/cnn.yaml"), *DISTILLER]).training.max_grad_norm == 0
    assert parse_arguments(["--config", str(CONFIGS / "cifar/vit_mlp.yaml"), *DISTILLER]).training.max_grad_norm == 5.0
    assert parse_arguments(["--config", str(CONFIGS / "cifar/vit_mlp.yaml"), "--clip-grad", "1", *DISTILLER]
                           ).training.max_grad_norm == 1.0


def test_stronger_config_trains_with_binary_cross_entropy():
    args = parse_arguments(["--config", str(CONFIGS / "imagenet/stronger.yaml"), *DISTILLER])
    assert isinstance(build_criterion(args.data, bce_loss=args.data.bce_loss), BinaryCrossEntropy)


# The reference's scripted experiments (docs/REFERENCE.md, Experiments): (distiller, teacher, student, base
# config), by script row.
CIFAR_ROWS = [("ofa", "swin_tiny_patch4_window7_224", "resnet18", "cnn"),
              ("ofa", "swin_tiny_patch4_window7_224", "resmlp_12_224", "vit_mlp"),
              ("fitnet", "swin_tiny_patch4_window7_224", "resnet18", "cnn"),
              ("pat", "swin_tiny_patch4_window7_224", "resnet18", "cnn"),
              ("pat", "vit_small_patch16_224", "resnet18", "cnn"),
              ("pat", "mixer_b16_224", "resnet18", "cnn"),
              ("pat", "swin_tiny_patch4_window7_224", "mobilenetv2_100", "cnn"),
              ("pat", "vit_small_patch16_224", "mobilenetv2_100", "cnn"),
              ("pat", "mixer_b16_224", "mobilenetv2_100", "cnn"),
              ("pat", "convnext_tiny", "deit_tiny_patch16_224", "vit_mlp"),
              ("pat", "mixer_b16_224", "deit_tiny_patch16_224", "vit_mlp"),
              ("pat", "convnext_tiny", "swin_pico", "vit_mlp"),
              ("pat", "mixer_b16_224", "swin_pico", "vit_mlp"),
              ("pat", "convnext_tiny", "resmlp_12_224", "vit_mlp"),
              ("pat", "swin_tiny_patch4_window7_224", "resmlp_12_224", "vit_mlp")]
IMAGENET_ROWS = [("ofa", "deit_tiny_patch16_224", "resnet18", "cnn"),
                 ("pat", "deit_tiny_patch16_224", "resnet18", "cnn"),
                 ("pat", "swin_tiny_patch4_window7_224", "resnet18", "cnn"),
                 ("pat", "mixer_b16_224", "resnet18", "cnn"),
                 ("pat", "deit_tiny_patch16_224", "mobilenetv2_100", "cnn"),
                 ("pat", "swin_tiny_patch4_window7_224", "mobilenetv2_100", "cnn"),
                 ("pat", "mixer_b16_224", "mobilenetv2_100", "cnn"),
                 ("pat", "resnet50", "deit_tiny_patch16_224", "vit_mlp"),
                 ("pat", "convnext_tiny", "deit_tiny_patch16_224", "vit_mlp"),
                 ("pat", "mixer_b16_224", "deit_tiny_patch16_224", "vit_mlp"),
                 ("pat", "resnet50", "swin_nano", "vit_mlp"),
                 ("pat", "convnext_tiny", "swin_nano", "vit_mlp"),
                 ("pat", "mixer_b16_224", "swin_nano", "vit_mlp"),
                 ("pat", "resnet50", "resmlp_12_224", "vit_mlp"),
                 ("pat", "convnext_tiny", "resmlp_12_224", "vit_mlp"),
                 ("pat", "swin_tiny_patch4_window7_224", "resmlp_12_224", "vit_mlp")]
IMAGENET_TEACHER_FILES = {"deit_tiny_patch16_224": "deit_tiny_patch16_224-a1311bcf.pth",
                          "swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224.pth",
                          "mixer_b16_224": "jx_mixer_b16_224-76587d61.pth",
                          "resnet50": "resnet50_a1_0-14fe96d1.pth", "convnext_tiny": "convnext_tiny_1k_224_ema.pth"}
# The reference's Swin-P / Swin-N: Swin-T with these overrides (its custom_model definitions).
SWIN_VARIANTS = {"swin_pico": 48, "swin_nano": 64}
EXPERIMENTS = [("cifar100", i + 1, row) for i, row in enumerate(CIFAR_ROWS)] + \
              [("imagenet", i + 1, row) for i, row in enumerate(IMAGENET_ROWS)]


def test_one_config_per_scripted_experiment():
    assert len(CIFAR_ROWS) == 15 and len(IMAGENET_ROWS) == 16
    for dataset, rows in (("cifar100", CIFAR_ROWS), ("imagenet", IMAGENET_ROWS)):
        files = sorted((CONFIGS / "experiments" / dataset).glob("*.yaml"))
        assert [int(f.name[:2]) for f in files] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize(("dataset", "number", "row"), EXPERIMENTS, ids=[f"{d}-{n:02d}" for d, n, _ in EXPERIMENTS])
def test_experiment_config(dataset, number, row):
    distiller, teacher, student, base = row
    (path,) = (CONFIGS / "experiments" / dataset).glob(f"{number:02d}_*.yaml")
    args = parse_arguments(["--config", str(path)])
    assert (args.distill.distiller, args.model.teacher) == (distiller, teacher)
    if student in SWIN_VARIANTS:
        assert args.model.model == "swin_tiny_patch4_window7_224"
        assert args.model.model_kwargs == {"embed_dim": SWIN_VARIANTS[student], "depths": [2, 2, 2, 2],
                                           "num_heads": [2, 4, 8, 16]}
    else:
        assert (args.model.model, args.model.model_kwargs) == (student, {})
    teacher_file = (f"pretrained/cifar_teachers/{teacher}_cifar100.pth" if dataset == "cifar100"
                    else f"pretrained/imagenet_teachers/{IMAGENET_TEACHER_FILES[teacher]}")
    assert args.model.teacher_pretrained == teacher_file
    assert args.data.dataset == dataset
    assert args.recipe.amp and args.recipe.model_ema  # both scripts pass --amp --model-ema
    assert args.training.output_dir == f"runs/{dataset}/{path.stem}"
    # The base config's values come through.
    for key, value in REFERENCE_CONFIGS[f"{'cifar' if dataset == 'cifar100' else 'imagenet'}/{base}.yaml"].items():
        if key not in ("model_ema",):
            assert_parsed(args, key, value)
    if dataset == "imagenet" and distiller == "ofa":
        assert args.hparams.ofa_eps == [1.5]


def test_base_key_chains_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("lr: 0.5\nepochs: 7\nclip-grad: 2.0\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nepochs: 8\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nmax_grad_norm: 3.0\n")
    args = parse_arguments(["--config", str(tmp_path / "sub" / "leaf.yaml"), "--lr", "0.25", *DISTILLER])
    assert (args.training.learning_rate, args.training.num_train_epochs, args.training.max_grad_norm) == (0.25, 8, 3)
    (tmp_path / "root.yaml").write_text("base: sub/leaf.yaml\n")
    with pytest.raises(ValueError, match="includes a file that includes it"):
        parse_arguments(["--config", str(tmp_path / "sub" / "leaf.yaml"), *DISTILLER])


@pytest.mark.parametrize(("flags", "message"), [
    (["--opt", "adamx"], "unknown optimizer --opt 'adamx'"),
    (["--sched", "cosinus"], "unknown scheduler --sched 'cosinus'"),
    (["--export-ema"], "--export-ema needs --model-ema"),
    (["--aug-repeats", "3"], "--aug-repeats needs a distributed run"),
])
def test_bad_recipe_flags_fail_before_writing(tmp_path, flags, message):
    from pat_hf.cli import train as pat_train

    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        pat_train.main(["--output_dir", str(tmp_path / "run"), "--report_to", "none", *DISTILLER, *flags])
    assert not (tmp_path / "run").exists()


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: only the package's own copy can be found
    by_name = parse_arguments(["--config", "cifar/vit_mlp", *DISTILLER])
    by_path = parse_arguments(["--config", "configs/cifar/vit_mlp.yaml", *DISTILLER])
    assert by_name.training.learning_rate == by_path.training.learning_rate == pytest.approx(5e-4)
    assert parse_arguments(["--config", "experiments/cifar100/04_pat_swin_tiny-resnet18"]).distill.distiller == "pat"
    with pytest.raises(FileNotFoundError, match="config not found: cifar/cnnn is neither a file nor a shipped"):
        parse_arguments(["--config", "cifar/cnnn", *DISTILLER])
