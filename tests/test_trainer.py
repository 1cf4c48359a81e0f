"""The DistillationTrainer and pat_hf.cli.train end to end, on tiny models and the digits data."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import TrainerCallback

from pat_hf.cli import train as pat_train
from pat_hf.cli.parser import parse_arguments
from pat_hf.distillers import DistillArguments, DistillContext
from pat_hf.distillers.kd import KD
from pat_hf.models.factory import create_model
from tests.helpers import save_teacher, tiny_run


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, teacher_file):
    output = tmp_path_factory.mktemp("kd_run")
    metrics = pat_train.main(tiny_run(output, teacher_file, "--distiller", "kd", "--kd-temperature", "2"))
    return output, metrics


def test_run_writes_state_metrics_and_student(kd_run):
    output, metrics = kd_run
    assert {"eval_top1", "eval_top5", "eval_loss"} <= set(metrics)
    assert 0.0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 100.0
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 64 examples / batch 16, one epoch
    assert sorted(p.name for p in (output / "student").iterdir()) == ["README.md", "config.json", "cost.json",
                                                                       "model.safetensors", "training_curves.png"]


def test_loss_components_and_throughput_are_logged(kd_run):
    history = json.loads((kd_run[0] / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert train_logs and all({"loss_gt", "loss_kd", "learning_rate", "train_images_per_second"} <= set(h)
                              for h in train_logs)
    for h in train_logs:
        assert h["loss"] == pytest.approx(h["loss_gt"] + h["loss_kd"], rel=1e-3)


def test_teacher_is_not_in_checkpoints(kd_run):
    checkpoint = next(kd_run[0].glob("checkpoint-*"))
    keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert keys and not any(k.startswith("teacher.") for k in keys)
    assert any(k.startswith("student.") for k in keys)


def test_teacher_stays_frozen_in_eval_mode_and_out_of_the_optimizer():
    teacher, student = create_model("test_resnet", 10), create_model("test_resnet", 10)
    distiller = KD(student, teacher, DistillArguments(distiller="kd"), None, DistillContext((3, 32, 32), 10))
    distiller.train()
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    running_mean = teacher.bn1.running_mean.clone()
    out = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    out["loss"].backward()
    assert torch.equal(teacher.bn1.running_mean, running_mean)
    assert all(p.grad is None for p in teacher.parameters())
    from pat_hf.training.trainer import DistillationTrainer

    args = parse_arguments(["--output_dir", "/tmp/unused", "--report_to", "none", "--use_cpu",
                            "--eval_strategy", "no"]).training
    trainer = DistillationTrainer(model=distiller, args=args)
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}


def test_weight_decay_skips_biases_and_norms():
    from pat_hf.training.trainer import DistillationTrainer

    student = create_model("test_resnet", 10)
    distiller = KD(student, create_model("test_resnet", 10), DistillArguments(distiller="kd"), None,
                   DistillContext((3, 32, 32), 10))
    args = parse_arguments(["--output_dir", "/tmp/unused", "--report_to", "none", "--use_cpu",
                            "--weight-decay", "0.01", "--eval_strategy", "no"]).training
    groups = DistillationTrainer(model=distiller, args=args).create_optimizer().param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in student.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1 and not name.endswith(".bias")), name


class RecordContext(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.context = model.context


def test_student_alone_without_teacher(tmp_path):
    recorder = RecordContext()
    metrics = pat_train.main(tiny_run(tmp_path, None, "--distiller", "vanilla"), callbacks=[recorder])
    assert "eval_top1" in metrics
    assert recorder.context.train_labels is None  # only distillers that need them (CRD) get the labels


def test_evaluation_loss_is_the_students_cross_entropy_as_in_any_hf_model():
    student = create_model("test_resnet", 10)
    distiller = KD(student, create_model("test_resnet", 10), DistillArguments(distiller="kd"), None,
                   DistillContext((3, 32, 32), 10)).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 9])
    out = distiller(x, y)
    assert torch.allclose(out["loss"], F.cross_entropy(student(x), y))
    assert torch.equal(distiller(x, F.one_hot(y, 10).float() * 0.9 + 0.01)["loss"], out["loss"])  # hard labels
    assert set(distiller(x)) == {"logits"}


@pytest.mark.parametrize("flags,message", [
    (["--distiller", "kd", "--teacher", "test_resnet", "--teacher-pretrained", "/nonexistent/t.safetensors"],
     "teacher checkpoint not found"),
    (["--model", "no_such_net"], "unknown timm model 'no_such_net'"),
    (["--distiller", "kd", "--teacher", ""], "--distiller kd needs a teacher"),
    (["--mixup", "0.8", "--batch-size", "15"], "even batch size"),
    (["--dataset", "digits", "--label-column", "fine_label"], "no column 'fine_label'"),
    (["--num-classes", "5"], "--num-classes 5 is fewer than the 10 classes of the dataset"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, flags, message):
    output = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        pat_train.main(tiny_run(output, None, "--distiller", "vanilla") + flags)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not output.exists()


def test_class_count_mismatch_fails_before_anything_is_written(tmp_path):
    teacher = save_teacher(tmp_path, num_classes=100)
    output = tmp_path / "run"
    with pytest.raises(ValueError, match="100-class classifier but the model has 10 classes"):
        pat_train.main(tiny_run(output, teacher, "--distiller", "kd"))
    assert not output.exists()


def test_an_earlier_run_is_not_overwritten(kd_run, teacher_file):
    with pytest.raises(FileExistsError, match="already holds checkpoints; pass --resume"):
        pat_train.main(tiny_run(kd_run[0], teacher_file, "--distiller", "kd"))


def test_exported_student_loads_in_timm_and_transformers_with_equal_logits(kd_run):
    import timm
    from transformers import AutoModelForImageClassification

    student_dir = kd_run[0] / "student"
    config = json.loads((student_dir / "config.json").read_text())
    assert config["architecture"] == "test_vit" and "num_classes" not in config["model_args"]
    card = (student_dir / "README.md").read_text()
    assert "library_name: timm" in card and "test_resnet" in card and "`kd`" in card and "Top-1 accuracy" in card
    x = torch.randn(3, 3, 32, 32)
    in_timm = timm.create_model(f"local-dir:{student_dir}", pretrained=True).eval()
    in_transformers = AutoModelForImageClassification.from_pretrained(str(student_dir)).eval()
    with torch.no_grad():
        assert torch.equal(in_timm(x), in_transformers(x).logits)
    trained = load_file(str(student_dir / "model.safetensors"))
    assert torch.equal(trained["head.weight"], in_timm.head.weight)


def test_push_to_hub_uploads_the_exported_student_not_a_checkpoint(tmp_path, fake_hub):
    pat_train.main(tiny_run(tmp_path / "run", None, "--distiller", "vanilla", "--push-to-hub",
                              "--hub_model_id", "someone/digits-vit"))
    (upload,) = fake_hub.named("upload_folder")
    assert fake_hub.named("create_repo")[0][1] == "someone/digits-vit"
    assert upload[1] == "someone/digits-vit"
    assert upload[2] == str(tmp_path / "run" / "student")
    assert upload[-1] == ["README.md", "config.json", "model.safetensors", "training_curves.png"]
    assert 'hf-hub:someone/digits-vit' in (tmp_path / "run" / "student" / "README.md").read_text()
