"""The end of a run measures what a deployer asks: the student's cost against its teacher (student/cost.json, the
model card, all_results.json) and, with --export-onnx / --export-int8, checked ONNX files in the export."""

import json

import pytest
from huggingface_hub import ModelCard

from pat_hf.cli import train as pat_train
from tests.helpers import save_teacher, tiny_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    teacher = save_teacher(root)
    output = root / "run"
    metrics = pat_train.main(tiny_run(output, teacher, "--distiller", "kd", "--cost-runs", "2", "--export-onnx",
                                      "--export-int8"))
    return output, metrics


def test_cost_json_compares_the_student_with_its_teacher(finished_run):
    output, metrics = finished_run
    cost = json.loads((output / "student" / "cost.json").read_text())
    assert cost["student"]["model"] == "test_vit" and cost["teacher"]["model"] == "test_resnet"
    assert cost["student"]["top1"] == pytest.approx(metrics["eval_top1"])
    assert 0 <= cost["teacher"]["top1"] <= 100
    assert cost["student"]["size_bytes"] == (output / "student" / "model.safetensors").stat().st_size
    assert cost["params_ratio"] == pytest.approx(cost["teacher"]["params"] / cost["student"]["params"])
    assert set(cost["student"]["latency_ms"]) == {"batch_1", "batch_32"}
    assert cost["latency"]["runs"] == 2 and cost["latency"]["statistic"] == "median"


def test_all_results_and_the_card_carry_the_cost(finished_run):
    output, _ = finished_run
    results = json.loads((output / "all_results.json").read_text())
    cost = json.loads((output / "student" / "cost.json").read_text())
    assert results["cost_params_ratio"] == pytest.approx(cost["params_ratio"])
    assert results["cost_speedup_batch_1"] == pytest.approx(cost["speedup"]["batch_1"])
    assert "eval_top1" in results  # the Trainer's metrics are kept beside them
    card = ModelCard.load(output / "student" / "README.md")
    assert "## Cost: teacher vs student" in card.text
    assert "| teacher `test_resnet` | student `test_vit` | teacher ÷ student |" in card.text
    assert "| parameters (M) |" in card.text and "CPU latency, batch 1 (ms)" in card.text


def test_onnx_files_are_written_checked_and_listed_on_the_card(finished_run):
    output, _ = finished_run
    student = output / "student"
    check = json.loads((student / "onnx_check.json").read_text())
    assert (student / "model.onnx").is_file() and (student / "model_int8.onnx").is_file()
    assert check["passed"] and check["fp32"]["images"] == 32
    card = ModelCard.load(student / "README.md").text
    assert "`model.onnx`" in card and "`model_int8.onnx`" in card and "onnxruntime" in card


def test_without_a_teacher_there_is_no_comparison(tmp_path):
    output = tmp_path / "run"
    pat_train.main(tiny_run(output, None, "--distiller", "vanilla", "--cost-runs", "2"))
    assert not (output / "student" / "cost.json").exists()
    assert "## Cost" not in (output / "student" / "README.md").read_text()


def test_int8_without_onnx_is_refused():
    with pytest.raises(ValueError, match="--export-int8 needs --export-onnx"):
        pat_train.main(tiny_run("unused", None, "--export-int8"))


def test_evaluate_benchmark_measures_the_export_against_the_runs_teacher(finished_run, tmp_path, capsys):
    from pat_hf.cli.evaluate import main as pat_hf_evaluate

    output, metrics = finished_run
    result = pat_hf_evaluate([str(output / "student"), "--benchmark", "--benchmark_runs", "2",
                              "--no_progress_bar", "--json", str(tmp_path / "result.json")])
    assert result["top1"] == pytest.approx(metrics["eval_top1"])
    cost = result["cost"]
    assert cost["student"]["top1"] == pytest.approx(result["top1"]) and cost["teacher"]["model"] == "test_resnet"
    assert cost["latency"]["runs"] == 2
    assert json.loads((output / "student" / "cost.json").read_text()) == json.loads(json.dumps(cost))
    assert json.loads((tmp_path / "result.json").read_text())["cost"]["params_ratio"] == cost["params_ratio"]
    assert "| parameters (M) |" in capsys.readouterr().out
