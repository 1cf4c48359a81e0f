"""The benchmark scripts: their table logic (always run) and a seconds-long run of each (`-m benchmark`)."""

from __future__ import annotations

import re

import pytest

from benchmarks import data_throughput, step_time
from benchmarks.data_throughput import Throughput, workers_needed
from benchmarks.step_time import (
    PAIRS,
    STUDENT_STEP,
    TEACHER_BACKWARD,
    TEACHER_FORWARD,
    Measurement,
    distiller_hparams,
    floor_seconds,
    pair_table,
)
from pat_hf.distillers import get_distiller_class

COMPONENTS = {STUDENT_STEP: 0.020, TEACHER_FORWARD: 0.010, TEACHER_BACKWARD: 0.030}


def test_each_distiller_is_compared_with_its_own_floor():
    assert floor_seconds("vanilla", COMPONENTS) == pytest.approx(0.020)
    assert floor_seconds("kd", COMPONENTS) == pytest.approx(0.030)
    assert floor_seconds("ofa", COMPONENTS) == pytest.approx(0.030)
    assert floor_seconds("pat", COMPONENTS) == pytest.approx(0.060)
    assert floor_seconds("pat", {STUDENT_STEP: 0.020, TEACHER_FORWARD: 0.010, TEACHER_BACKWARD: None}) is None


def test_pair_table_reports_ratio_throughput_and_errors():
    floors = [Measurement(name, [seconds]) for name, seconds in COMPONENTS.items()]
    rows = [Measurement("pat", [0.110, 0.130, 0.120], peak_memory_bytes=3 * 2**30, extra_params=1234567),
            Measurement("ofa", error="OutOfMemoryError: CUDA out of memory")]
    table = pair_table("a → b", 128, floors, rows)
    pat_row = next(line for line in table.splitlines() if line.startswith("| pat |"))
    assert pat_row == "| pat | 120.0 ms | 1,066.7 | 3.00 GiB | 1,234,567 | 60.0 ms | 2.00× |"
    assert "| ofa | OutOfMemoryError: CUDA out of memory |" in table
    assert "| teacher fwd+bwd | 30.0 ms | – |" in table


def test_rounds_merge_into_one_median_and_the_highest_peak():
    row = Measurement("kd", [0.010, 0.030], peak_memory_bytes=2)
    row.merge(Measurement("kd", [0.020], peak_memory_bytes=5))
    row.merge(Measurement("kd", error="OutOfMemoryError"))
    assert row.seconds == pytest.approx(0.020) and row.peak_memory_bytes == 5 and row.error == "OutOfMemoryError"


def test_img_size_reaches_only_the_models_that_take_one():
    pair = PAIRS["convnext-deit"].resized(160)
    assert pair.img_size == 160
    assert pair.student_kwargs["img_size"] == 160 and "img_size" not in pair.teacher_kwargs
    assert PAIRS["convnext-deit"].resized(None) is PAIRS["convnext-deit"]


def test_distiller_hparams_take_the_overrides_the_distiller_has():
    hparams = distiller_hparams(get_distiller_class("pat"), {"pat_raa_dim": 32, "dkd_alpha": 3.0})
    assert hparams.pat_raa_dim == 32 and hparams.pat_raa_num_queries == 64
    assert distiller_hparams(get_distiller_class("kd"), {"pat_raa_dim": 32}) is None


def test_workers_needed_picks_the_fewest_that_reach_the_target_or_extrapolates():
    results = [Throughput("cnn", 0, 90.0), Throughput("cnn", 1, 100.0), Throughput("cnn", 2, 180.0)]
    assert workers_needed(results, 150.0) == 2
    assert workers_needed(results, 1000.0) == 12  # 90 images/s per worker with two workers
    assert workers_needed(results[:1], 1000.0) is None


@pytest.mark.benchmark
def test_step_time_runs_the_training_path_on_a_tiny_pair(tmp_path, capsys):
    output = tmp_path / "results" / "cpu.md"
    report = step_time.main(["--device", "cpu", "--pairs", "tiny", "--distillers", "kd", "pat", "--batch-size", "4",
                             "--warmup-steps", "1", "--steps", "1", "--rounds", "2", "--threads", "1",
                             "--num-classes", "10", "--profile-steps", "1", "--output", str(output)])
    assert output.read_text() == report
    for name in ("kd", "pat"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        step_ms, ratio = re.search(r"\| ([\d.,]+) ms \|.*\| ([\d.]+)× \|$", row).groups()
        assert float(step_ms.replace(",", "")) > 0 and float(ratio) > 0
    pat_extra = next(line for line in report.splitlines() if line.startswith("| pat |")).split("|")[5]
    assert int(pat_extra.replace(",", "")) > 0
    printed = capsys.readouterr().out
    assert printed.count("### Profile of") == 2  # kd and pat, in the first of the two rounds only
    assert "| student |" in printed and "| teacher |" in printed  # module rows by name


@pytest.mark.benchmark
def test_data_throughput_measures_each_worker_count(tmp_path):
    output = tmp_path / "data.md"
    report = data_throughput.main(["--synthetic-images", "8", "--workers", "0", "1", "--batch-size", "2",
                                   "--batches", "2", "--target-images-per-second", "2500", "--output", str(output)])
    rows = [line for line in report.splitlines() if re.match(r"\| (vit_mlp|cnn) \|", line)]
    assert [row.split("|")[1:3] for row in rows] == [[" vit_mlp ", " 0 "], [" vit_mlp ", " 1 "], [" cnn ", " 0 "],
                                                      [" cnn ", " 1 "]]
    assert all(float(row.split("|")[3].replace(",", "")) > 0 for row in rows)
    assert re.search(r"- cnn: 2,500 images/s needs about \d+ workers", report)
    assert output.read_text() == report


def test_digits_demo_table_shows_each_seed_and_says_what_it_cannot_show():
    from benchmarks.digits_demo import Result, caveat, results_table

    teacher = Result("teacher", 99.17, 100.0, 0.3)
    alone = [Result("student alone", 79.0, 99.0, 0.9, seed=1), Result("student alone", 75.0, 98.0, 1.1, seed=2)]
    assert results_table(teacher, [alone[:1]], [1]) == [
        "| run | top-1 (seed 1) | top-5 | minutes per run |", "|---|---|---|---|",
        "| teacher | 99.17 | 100.00 | 0.3 |", "| student alone | 79.00 | 99.00 | 0.9 |"]
    two_seeds = results_table(teacher, [alone], [1, 2])
    assert two_seeds[0] == "| run | top-1 mean ± std (seeds 1 / 2) | top-5 (mean) | minutes per run |"
    assert two_seeds[3] == "| student alone | 77.00 ± 2.83 (79.00 / 75.00) | 98.50 | 1.0 |"
    assert caveat([1], 16).startswith("What this table can show: one seed per row, 16 student epochs.")


def test_digits_demo_prints_the_committed_study_tables(tmp_path):
    from benchmarks.digits_demo import study_excerpts

    assert study_excerpts(tmp_path) == [f"No seeded comparison is committed in {tmp_path} yet: run "
                                        "benchmarks/distillation_study.py."]
    (tmp_path / "few-labels").mkdir()
    (tmp_path / "few-labels" / "results.md").write_text("# Distillation study\n\n- seeds 1,2,3\n\n| row |\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.md").write_text("# Distillation study\n\n| row |\n")
    lines = study_excerpts(tmp_path)
    assert lines[1:] == ["", f"[{tmp_path / 'full' / 'results.md'}]", "", "| row |",
                         "", f"[{tmp_path / 'few-labels' / 'results.md'}]", "", "- seeds 1,2,3", "", "| row |"]
