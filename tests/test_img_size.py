"""`--img-size` builds both models for that size: a ViT, a Swin and a CNN at a non-default size, each once as
teacher and once as student, a few training steps through `pat_hf.cli.train.main`."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from transformers import TrainerCallback

from pat_hf.cli import evaluate as evaluate_cli
from pat_hf.cli import train as pat_train
from pat_hf.models.factory import create_model, create_teacher

SIZE = 64  # none of the three models' default (test_vit and test_resnet: 160, Swin: 224)
SWIN = "swin_tiny_patch4_window7_224"
MODELS = {
    "test_vit": {},
    SWIN: {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2},
    "test_resnet": {},
}
# (student, teacher, distiller): every model is once the student and once the teacher.
PAIRS = [("test_vit", SWIN, "fitnet"), (SWIN, "test_resnet", "ofa"), ("test_resnet", "test_vit", "kd")]


def save_at_default_size(directory: Path, name: str) -> str:
    """A teacher checkpoint saved for the model's own default input size, not the run's."""
    torch.manual_seed(0)
    path = directory / f"{name}.safetensors"
    save_file(timm.create_model(name, num_classes=10, **MODELS[name]).state_dict(), str(path))
    return str(path)


class KeepDistiller(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.distiller = model


def run_flags(output: Path, student: str, teacher: str, teacher_file: str, *extra: str) -> list[str]:
    return ["--model", student, "--model-kwargs", json.dumps(MODELS[student]),
            "--teacher", teacher, "--teacher-kwargs", json.dumps(MODELS[teacher]),
            "--teacher-pretrained", teacher_file, "--img-size", str(SIZE), "--dataset", "digits",
            "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "8", "--epochs", "1",
            "--lr", "0.001", "--opt", "adamw", "--smoothing", "0", "--output_dir", str(output),
            "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", *extra]


@pytest.mark.parametrize("student,teacher,distiller", PAIRS, ids=[f"{t}-to-{s}" for s, t, _ in PAIRS])
def test_both_models_are_built_for_the_image_size(tmp_path, student, teacher, distiller):
    keep = KeepDistiller()
    flags = run_flags(tmp_path / "run", student, teacher, save_at_default_size(tmp_path, teacher),
                      "--distiller", distiller)
    metrics = pat_train.main(flags, callbacks=[keep])
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    for name, model in ((student, keep.distiller.student), (teacher, keep.distiller.teacher)):
        if name != "test_resnet":
            assert tuple(model.patch_embed.img_size) == (SIZE, SIZE)
        assert model(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 10)
    config = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
    # The exported student rebuilds at the run's size where its class takes one; a CNN needs none.
    assert config["model_args"].get("img_size") in ([None] if student == "test_resnet" else [SIZE, [SIZE, SIZE]])
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'run' / 'student'}", pretrained=True).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), keep.distiller.student.eval()(x), atol=1e-5)


def test_a_checkpoint_of_a_student_built_for_the_size_evaluates_at_that_size(tmp_path):
    output = tmp_path / "run"
    flags = [*run_flags(output, "test_vit", "test_resnet", "unused"), "--teacher", "", "--distiller", "vanilla",
             "--save_strategy", "epoch"]
    metrics = pat_train.main(flags)
    result = evaluate_cli.main([str(output / "checkpoint-4")])
    assert result["top1"] == pytest.approx(metrics["eval_top1"])


def test_a_vit_teacher_saved_at_another_size_gets_its_position_embeddings_resampled(tmp_path):
    path = save_at_default_size(tmp_path, "test_vit")
    saved = timm.create_model("test_vit", num_classes=10)
    saved.load_state_dict(load_file(path))
    teacher = create_teacher("test_vit", path, 10, img_size=SIZE)
    expected = resample_abs_pos_embed(saved.pos_embed, new_size=[SIZE // 16, SIZE // 16], num_prefix_tokens=1)
    assert teacher.pos_embed.shape == (1, 1 + (SIZE // 16) ** 2, saved.embed_dim)
    assert torch.allclose(teacher.pos_embed, expected)
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, saved.blocks[0].attn.qkv.weight)


def test_a_checkpoint_timm_cannot_adapt_is_refused_in_one_line(tmp_path):
    """Mixer's token-mixing layers are sized by the token count: no filter can adapt them."""
    kwargs = {"embed_dim": 16, "num_blocks": 4, "patch_size": 8, "img_size": 32}
    path = tmp_path / "mixer.safetensors"
    save_file(create_model("mixer_s16_224", 10, kwargs).state_dict(), str(path))
    narrowed = {k: v for k, v in kwargs.items() if k != "img_size"}
    mismatch = r"blocks.0.mlp_tokens.fc1.weight is \(8, 16\) there and \(8, 64\) in the model"
    with pytest.raises(ValueError, match=mismatch) as error:
        create_teacher("mixer_s16_224", str(path), 10, narrowed, img_size=SIZE)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags,message", [
    (["--model", "test_vit", "--img-size", "40"],
     "test_vit cannot run at an input size of 40x40 (--img-size): Input height (40) should be divisible by patch "
     "size (16)"),
    (["--model", "test_vit", "--model-kwargs", '{"img_size": 32}', "--img-size", "64"],
     "test_vit: img_size 32 in its kwargs contradicts the run's input size 64x64 (--img-size)"),
])
def test_an_image_size_a_model_cannot_take_fails_in_one_line_before_anything_is_written(tmp_path, flags, message):
    output = tmp_path / "run"
    argv = [*flags, "--teacher", "", "--distiller", "vanilla", "--dataset", "digits", "--max-train-samples", "16",
            "--output_dir", str(output), "--report_to", "none"]
    with pytest.raises(ValueError) as error:
        pat_train.main(argv)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not output.exists()


def test_a_cnn_takes_no_img_size_and_runs_at_the_size():
    model = create_model("test_resnet", 10, img_size=(48, 80))
    assert model(torch.zeros(1, 3, 48, 80)).shape == (1, 10)
