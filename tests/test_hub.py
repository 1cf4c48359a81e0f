"""Publishing a student: the model card and its Hub metadata, the training curves, and pushing (to a fake HfApi)."""

import contextlib
import io
import json
import shutil
import sys
from types import SimpleNamespace

import httpx2
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import hf_raise_for_status
from PIL import Image
from transformers import TrainerCallback, pipeline

from pat_hf.cli import evaluate as pat_evaluate
from pat_hf.cli import push
from pat_hf.cli import train as pat_train
from pat_hf.export import hub
from pat_hf.export.card import ModelCardInfo, model_card
from pat_hf.export.hub import HubPushError
from tests.helpers import FakeHfApi, save_teacher, tiny_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RecordTrainingStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        FakeHfApi.calls.append(("train_begin",))


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """A KD run with an EMA student, pushed with --hub_revision and --hub-create-pr under a bare repo name."""
    output = tmp_path_factory.mktemp("pushed") / "run"
    teacher = save_teacher(tmp_path_factory.mktemp("teacher"))
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeHfApi, "calls", [])
        patch.setattr(FakeHfApi, "refuse", None)
        patch.setattr(hub, "HfApi", FakeHfApi)
        with contextlib.redirect_stdout(stdout):
            metrics = pat_train.main(tiny_run(
                output, teacher, "--distiller", "kd", "--kd-temperature", "2", "--model-ema", "--model-ema-decay",
                "0.9", "--epochs", "2", "--push-to-hub", "--hub_model_id", "digits-vit",
                "--hub_revision", "experiments", "--hub-create-pr"), callbacks=[RecordTrainingStart()])
        calls = list(FakeHfApi.calls)
    return SimpleNamespace(output=output, student=output / "student", metrics=metrics, calls=calls,
                           stdout=stdout.getvalue())


def _names(calls):
    return [call[0] for call in calls if call[0] != "init"]


def test_repository_is_created_and_checked_before_training_and_uploaded_after(pushed_run):
    assert _names(pushed_run.calls) == ["create_repo", "auth_check", "create_branch", "train_begin",
                                        "upload_folder"]


def test_the_repo_id_the_hub_resolved_is_used_afterwards(pushed_run):
    calls = {call[0]: call for call in pushed_run.calls}
    assert calls["create_repo"][1] == "digits-vit"
    assert calls["auth_check"][1:] == ("someone/digits-vit", True)
    assert calls["create_branch"][1:3] == ("someone/digits-vit", "experiments")
    assert calls["upload_folder"][1] == "someone/digits-vit"


def test_push_honours_revision_pull_request_and_names_the_run_in_the_commit(pushed_run):
    upload = next(call for call in pushed_run.calls if call[0] == "upload_folder")
    _, _, folder, message, revision, create_pr, files = upload
    assert folder == str(pushed_run.student) and (revision, create_pr) == ("experiments", True)
    assert files == ["README.md", "config.json", "cost.json", "model.safetensors", "training_curves.png"]
    top1 = round(pushed_run.metrics["eval_top1"], 2)
    assert message == f"Add test_vit distilled from test_resnet with kd (top-1 {top1:.2f} on digits)"
    assert "pushed the student to https://huggingface.co/someone/digits-vit/discussions/1" in pushed_run.stdout


def test_export_location_is_printed_at_the_default_log_level(pushed_run):
    assert f"exported the student to {pushed_run.student}" in pushed_run.stdout


def test_card_metadata_parses_back_to_the_evaluated_numbers(pushed_run):
    card = ModelCard.load(pushed_run.student / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("timm", "image-classification", "apache-2.0")
    assert data.datasets == ["digits"] and data.metrics == ["accuracy"] and data.base_model is None
    assert data.model_name == "digits-vit"
    parsed = {(r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    metrics = pushed_run.metrics
    assert parsed == {
        ("accuracy", "Top-1 accuracy"): round(metrics["eval_top1"], 2),
        ("top_5_accuracy", "Top-5 accuracy"): round(metrics["eval_top5"], 2),
        ("ema_accuracy", "Top-1 accuracy (ema student)"): round(metrics["eval_ema_top1"], 2),
        ("ema_top_5_accuracy", "Top-5 accuracy (ema student)"): round(metrics["eval_ema_top5"], 2),
    }
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in data.eval_results} == {
        ("image-classification", "digits", "validation")}


def test_card_lists_only_the_settings_of_this_run(pushed_run):
    text = (pushed_run.student / "README.md").read_text()
    assert "`kd_temperature`: `2.0`" in text and "`model_ema_decay`: `[0.9]`" in text
    for other in ("pat_", "ofa_", "dkd_", "crd_", "fitnet_", "decay_epochs", "momentum", "amp_dtype", "resume"):
        assert f"`{other}" not in text, other


def test_card_names_the_teacher_weights_and_embeds_the_training_curves(pushed_run):
    text = (pushed_run.student / "README.md").read_text()
    assert "| teacher weights | checkpoint file `test_resnet_teacher.safetensors` |" in text
    assert "![Training curves](training_curves.png)" in text
    assert (pushed_run.student / "training_curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_usage_snippets_point_at_the_repository_after_the_push(pushed_run):
    text = (pushed_run.student / "README.md").read_text()
    for snippet in ('timm.create_model("hf-hub:someone/digits-vit"', 'from_pretrained("someone/digits-vit")',
                    'pipeline("image-classification", model="someone/digits-vit")'):
        assert snippet in text
    assert "local-dir:" not in text and str(pushed_run.output) not in text


def test_config_drops_the_pretrained_tag_of_weights_the_student_never_had(pushed_run):
    config = json.loads((pushed_run.student / "config.json").read_text())
    assert config["architecture"] == "test_vit"
    assert "tag" not in config["pretrained_cfg"] and "license" not in config["pretrained_cfg"]
    assert "in1k" not in (pushed_run.student / "config.json").read_text()


def test_train_and_all_results_are_written(pushed_run):
    train = json.loads((pushed_run.output / "train_results.json").read_text())
    combined = json.loads((pushed_run.output / "all_results.json").read_text())
    assert "train_loss" in train and "train_runtime" in train
    assert {"train_loss", "train_runtime", "eval_top1", "eval_top5", "eval_ema_top1"} <= set(combined)
    assert combined["eval_top1"] == pushed_run.metrics["eval_top1"]


def test_pipeline_and_image_processor_match_timm(pushed_run):
    student = timm.create_model(f"local-dir:{pushed_run.student}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(student))
    image = Image.fromarray((torch.rand(20, 24, 3) * 255).to(torch.uint8).numpy())
    with torch.no_grad():
        probabilities = student(transform(image).unsqueeze(0)).softmax(-1)[0]
    classifier = pipeline("image-classification", model=str(pushed_run.student))
    predictions = classifier(image, top_k=5)
    expected = probabilities.topk(5)
    assert [p["label"] for p in predictions] == [str(int(i)) for i in expected.indices]
    assert [p["score"] for p in predictions] == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_evaluate_shows_a_progress_bar(pushed_run, capsys):
    result = pat_evaluate.main([str(pushed_run.student), "--batch_size", "8"])
    assert result["top1"] == pytest.approx(pushed_run.metrics["eval_top1"])
    assert "evaluating: 100%" in capsys.readouterr().err


def test_card_base_model_is_a_hub_teacher_and_no_teacher_is_said():
    info = ModelCardInfo(student="deit_tiny_patch16_224", teacher="resnet18",
                         teacher_weights="hf-hub:timm/resnet18.a1_in1k", distiller="pat", dataset="uoft-cs/cifar100",
                         eval_split="test", metrics={"eval_top1": 71.234, "eval_top5": 91.5})
    card = ModelCard(str(model_card(info, "deit-pat", "/runs/x/student")))
    assert card.data.base_model == "timm/resnet18.a1_in1k" and card.data.datasets == ["uoft-cs/cifar100"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"accuracy": 71.23,
                                                                               "top_5_accuracy": 91.5}
    assert "[timm/resnet18.a1_in1k](https://huggingface.co/timm/resnet18.a1_in1k)" in card.text
    assert 'timm.create_model("local-dir:/runs/x/student"' in card.text and "@article{lin2025pat" in card.text
    alone = model_card(ModelCardInfo(student="resnet18", teacher="", teacher_weights="", distiller="vanilla",
                                     dataset="digits"), "alone", "/runs/alone/student")
    assert alone.data.base_model is None and "none: the student was trained on labels alone" in alone.text
    assert "model-index" not in str(alone)


def _http_error(status: int) -> Exception:
    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
    try:
        hf_raise_for_status(response)
    except Exception as error:
        return error
    raise AssertionError(f"HTTP {status} did not raise")


def test_a_refused_token_fails_in_one_line_before_anything_is_written(tmp_path, fake_hub, monkeypatch, capsys):
    fake_hub.refuse = _http_error(401)
    output = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["pat-hf-train", *tiny_run(output, None, "--distiller", "vanilla",
                                                                 "--push-to-hub", "--hub_model_id", "me/x")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        pat_train.cli()
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("pat-hf-train: cannot push to the Hub repository 'me/x': Client error '401")
    assert "hf auth login" in message and "\n" not in message
    assert _names(fake_hub.calls) == ["create_repo"] and not output.exists()


def test_a_token_without_write_access_fails_at_the_write_check(tmp_path, fake_hub, monkeypatch):
    class ReadOnlyHfApi(FakeHfApi):
        def auth_check(self, repo_id, *, write=False):
            self._record("auth_check", repo_id, write)
            raise _http_error(403)

    monkeypatch.setattr(hub, "HfApi", ReadOnlyHfApi)
    with pytest.raises(HubPushError, match="cannot push to the Hub repository 'someone/x': 403 Forbidden"):
        pat_train.main(tiny_run(tmp_path / "run", None, "--distiller", "vanilla", "--push-to-hub",
                                "--hub_model_id", "x"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("repo_id,reason", [("bad id!!", "Repo id must use alphanumeric chars"),
                                            ("someone/fine", "offline mode is enabled")])
def test_the_real_hub_client_refuses_offline_and_malformed_ids_in_one_line(repo_id, reason):
    with pytest.raises(HubPushError) as error:
        hub.prepare_repo(repo_id, token="hf_not_a_token")
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_pat_hf_push_uploads_an_existing_export(pushed_run, tmp_path, fake_hub, capsys):
    export = tmp_path / "student"
    shutil.copytree(pushed_run.student, export)
    url = push.main([str(export), "other", "--private", "--revision", "v1", "--create-pr", "--token", "hf_x"])
    assert url == "https://huggingface.co/someone/other/discussions/1"
    calls = {call[0]: call for call in fake_hub.calls}
    assert calls["init"] == ("init", "hf_x") and calls["create_repo"][1:3] == ("other", True)
    assert calls["create_branch"][1:3] == ("someone/other", "v1")
    assert calls["upload_folder"][1] == "someone/other" and calls["upload_folder"][4:6] == ("v1", True)
    assert calls["upload_folder"][3].startswith("Add test_vit distilled from test_resnet with kd (top-1 ")
    assert 'from_pretrained("someone/other")' in (export / "README.md").read_text()
    assert ModelCard.load(export / "README.md").data.model_name == "other"
    assert "pushed" in capsys.readouterr().out


def test_pat_hf_push_refuses_a_folder_that_is_not_an_export(tmp_path, fake_hub, capsys):
    with pytest.raises(SystemExit):
        push.main([str(tmp_path), "someone/x"])
    assert "is not an exported student (no config.json, model.safetensors, README.md)" in capsys.readouterr().err
    assert fake_hub.calls == []
