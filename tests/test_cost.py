"""Cost facts: parameters, size on disk, GMACs against hand counts, CPU latency, cost.json and the card's table."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pat_hf.export.cost import (
    COST_FILE,
    cost_table,
    count_parameters,
    cpu_latency_ms,
    gmacs,
    measure_costs,
    model_cost,
    write_cost,
)
from tests.tiny_models import INPUT_SIZE, tiny_model

RUNS = {"runs": 2, "warmup": 1, "threads": 1}


def _conv_linear() -> nn.Module:
    """3x10x10 -> conv 3->8, 3x3, same padding -> 800 features -> linear 800->5."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    student, teacher = tiny_model("vit"), tiny_model("resnet")
    files = {}
    for name, model in (("student", student), ("teacher", teacher)):
        files[name] = folder / f"{name}.safetensors"
        save_file(model.state_dict(), str(files[name]))
    cost = measure_costs(student, teacher, INPUT_SIZE, student_weights=files["student"],
                         teacher_weights=files["teacher"], student_top1=91.25, teacher_top1=95.5, **RUNS)
    return student, teacher, files, cost


def test_parameters_are_every_parameter_counted_once():
    model = tiny_model("vit")
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0


def test_gmacs_of_a_conv_and_a_linear_layer_equal_the_hand_count():
    conv_macs = 8 * 10 * 10 * 3 * 3 * 3  # an output value is a 3x3x3 dot product
    linear_macs = 800 * 5
    assert gmacs(_conv_linear(), (3, 10, 10)) * 1e9 == pytest.approx(conv_macs + linear_macs)
    assert gmacs(nn.Linear(16, 4), (16,)) * 1e9 == pytest.approx(64)


def test_measuring_leaves_the_model_in_its_mode_and_the_thread_count_alone():
    model = _conv_linear().train()
    threads = torch.get_num_threads()
    assert cpu_latency_ms(model, (3, 10, 10), 4, runs=2, warmup=0, threads=threads + 1) > 0
    assert model.training and torch.get_num_threads() == threads


def test_latency_needs_a_timed_run():
    with pytest.raises(ValueError, match="at least 1 timed run"):
        cpu_latency_ms(_conv_linear(), (3, 10, 10), 1, runs=0)


def test_model_cost_has_every_fact(tmp_path):
    model = _conv_linear()
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    cost = model_cost(model, (3, 10, 10), name="conv-linear", weights_file=weights, batch_sizes=(1, 3), **RUNS)
    assert cost["model"] == "conv-linear" and cost["top1"] is None
    assert cost["params"] == count_parameters(model)
    assert cost["size_bytes"] == weights.stat().st_size
    assert cost["gmacs"] == pytest.approx(gmacs(model, (3, 10, 10)))
    assert cost["input_size"] == [3, 10, 10]
    assert set(cost["latency_ms"]) == {"batch_1", "batch_3"} and all(v > 0 for v in cost["latency_ms"].values())


def test_student_against_teacher_ratios_and_measurement_facts(pair):
    student, teacher, files, cost = pair
    assert cost["student"]["model"] == "test_vit" and cost["teacher"]["model"] == "test_resnet"
    assert cost["student"]["size_bytes"] == files["student"].stat().st_size
    for batch in ("batch_1", "batch_32"):
        assert cost["student"]["latency_ms"][batch] > 0 and cost["teacher"]["latency_ms"][batch] > 0
        assert cost["speedup"][batch] == pytest.approx(
            cost["teacher"]["latency_ms"][batch] / cost["student"]["latency_ms"][batch])
    assert cost["params_ratio"] == pytest.approx(count_parameters(teacher) / count_parameters(student))
    assert cost["gmacs_ratio"] == pytest.approx(cost["teacher"]["gmacs"] / cost["student"]["gmacs"])
    assert cost["top1_change"] == pytest.approx(91.25 - 95.5)
    assert cost["latency"]["torch_threads"] == 1 and cost["latency"]["runs"] == 2
    assert cost["latency"]["cpu"] and cost["latency"]["statistic"] == "median"


def test_cost_json_is_written_whole(pair, tmp_path):
    cost = pair[3]
    path = write_cost(tmp_path, cost)
    assert path == tmp_path / COST_FILE and json.loads(path.read_text()) == cost
    assert [p.name for p in tmp_path.iterdir()] == [COST_FILE]


def test_markdown_table_compares_teacher_and_student(pair):
    cost = pair[3]
    lines = cost_table(cost).splitlines()
    assert lines[0] == "| | teacher `test_resnet` | student `test_vit` | teacher ÷ student |"
    rows = {line.split(" | ")[0].removeprefix("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]
            if line.startswith("| ")}
    assert list(rows) == ["top-1 (%)", "parameters (M)", "size on disk (MB)", "GMACs per image",
                          "CPU latency, batch 1 (ms)", "CPU latency, batch 32 (ms)"]
    assert rows["top-1 (%)"] == ["95.50", "91.25", "-4.25 points (student − teacher)"]
    assert rows["parameters (M)"][1] == f"{cost['student']['params'] / 1e6:.3g}"
    assert rows["parameters (M)"][2] == f"{cost['params_ratio']:.3g}×"
    assert rows["CPU latency, batch 32 (ms)"] == [f"{cost['teacher']['latency_ms']['batch_32']:.3g}",
                                                  f"{cost['student']['latency_ms']['batch_32']:.3g}",
                                                  f"{cost['speedup']['batch_32']:.3g}×"]
    assert lines[-1].startswith("Latency: median of 2 forward passes after 1 warm-up passes")
    assert "1 torch thread(s), input 3×32×32" in lines[-1]


def test_table_leaves_unknown_accuracy_and_size_blank(pair):
    student, teacher = pair[0], pair[1]
    cost = measure_costs(student, teacher, INPUT_SIZE, batch_sizes=(1,), **RUNS)
    rows = [line for line in cost_table(cost).splitlines() if line.startswith(("| top-1", "| size"))]
    assert rows == ["| top-1 (%) |  |  |  |", "| size on disk (MB) |  |  |  |"]
