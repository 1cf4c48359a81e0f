"""benchmarks/distillation_study.py: its statistics, its resume logic, its failure lines, and a tiny real study."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import distillation_study
from benchmarks.distillation_study import (
    Progress,
    RunResult,
    main,
    paired_interval,
    prepare_run_folder,
    summarise_rows,
)

# Two-sided 95% Student-t quantiles from a printed table: 12.706 (1 degree of freedom), 2.776 (4).
T_975_DF1 = 12.7062
T_975_DF4 = 2.7764


def finished_run(folder: Path, top1: float, **metrics: float) -> None:
    folder.mkdir(parents=True)
    (folder / "all_results.json").write_text(json.dumps({"epoch": 1.0, "eval_top1": top1, "eval_top5": 99.0,
                                                         **metrics}))


def no_training(*args, **kwargs):
    raise AssertionError(f"the study started a process: {args}")


def test_paired_interval_is_the_student_t_interval_of_the_differences():
    mean, half_width = paired_interval([91.0, 93.0, 95.0, 97.0, 99.0], [90.0, 91.0, 92.0, 93.0, 94.0])
    # differences 1..5: mean 3, standard deviation sqrt(2.5), standard error sqrt(2.5 / 5)
    assert mean == pytest.approx(3.0)
    assert half_width == pytest.approx(T_975_DF4 * 0.5 ** 0.5, abs=1e-3)
    mean, half_width = paired_interval([80.0, 85.0], [79.0, 82.0])  # differences 1 and 3: standard error 1
    assert (mean, half_width) == pytest.approx((2.0, T_975_DF1), abs=1e-3)
    assert paired_interval([80.0], [78.5]) == (1.5, None)
    with pytest.raises(ValueError, match="as many values"):
        paired_interval([80.0, 81.0], [79.0])


def test_rows_are_paired_with_the_student_alone_over_the_seeds_both_finished():
    results = [RunResult("alone", 1, 90.0), RunResult("alone", 2, 92.0), RunResult("alone", 3, 94.0),
               RunResult("kd", 1, 91.0), RunResult("kd", 3, 97.0), RunResult("kd", 2, error="exit status 1"),
               RunResult("ofa", 4, 95.0)]
    alone, kd, ofa = summarise_rows(results, ["alone", "kd", "ofa", "pat"])
    assert alone.seeds == [1, 2, 3] and alone.difference is None
    assert kd.seeds == [1, 3] and kd.top1 == [91.0, 97.0]
    mean, half_width, pairs = kd.difference
    assert (mean, pairs) == (2.0, 2) and half_width == pytest.approx(T_975_DF1, abs=1e-3)
    assert ofa.difference is None  # no seed in common with the student alone


def test_a_finished_run_is_kept_and_a_half_finished_one_cleared(tmp_path):
    finished_run(tmp_path / "done", 97.5)
    assert prepare_run_folder(tmp_path / "done")["eval_top1"] == 97.5
    half = tmp_path / "half"
    half.mkdir()
    (half / "args.yaml").write_text("model: {}\n")
    (half / "all_results.json").write_text(json.dumps({"train_loss": 0.1}))  # written before the evaluation
    assert prepare_run_folder(half) is None and not half.exists()
    assert prepare_run_folder(tmp_path / "absent") is None
    finished_run(tmp_path / "teacher", 98.9)  # evaluated, stopped before its export
    assert prepare_run_folder(tmp_path / "teacher", required=["student/model.safetensors"]) is None
    assert not (tmp_path / "teacher").exists()


def test_a_resumed_study_reports_its_finished_runs_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(distillation_study.subprocess, "run", no_training)
    finished_run(tmp_path / "runs" / "alone-s1", 96.0, eval_ema_top1=95.0)
    finished_run(tmp_path / "runs" / "alone-s2", 98.0, eval_ema_top1=97.0)
    lines = []
    assert main(["--rows", "alone", "--seeds", "1,2", "--epochs", "3", "--output", str(tmp_path)], lines.append) == 0
    assert lines[0].startswith("2 runs (1 rows x 2 seeds), 2 already finished")
    assert "| student alone | 1,2 | 97.00 ± 1.41 | 96.00 ± 1.41 | – | 96.00 / 98.00 | – |" in lines[-1]
    assert (tmp_path / "results.md").read_text() == lines[-1]
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(r["row"], r["seed"], r["top1"], r["ema_top1"]) for r in runs] == [("alone", 1, 96.0, 95.0),
                                                                                ("alone", 2, 98.0, 97.0)]
    with pytest.raises(SystemExit):  # the same folder with another budget would mix two studies
        main(["--rows", "alone", "--seeds", "1,2", "--epochs", "4", "--output", str(tmp_path)], lines.append)


def test_report_writes_the_finished_runs_and_leaves_a_running_one_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(distillation_study.subprocess, "run", no_training)
    lines = []
    with pytest.raises(SystemExit):  # no study in the folder yet
        main(["--rows", "alone", "--output", str(tmp_path), "--report"], lines.append)
    (tmp_path / "study.json").write_text(json.dumps({"epochs": 3, "setting": "full", "extra_args": "",
                                                     "teacher_epochs": 6, "teacher_args": ""}))
    finished_run(tmp_path / "teacher", 99.0)
    finished_run(tmp_path / "runs" / "alone-s1", 96.0)
    finished_run(tmp_path / "runs" / "kd-s1", 97.0)
    running = tmp_path / "runs" / "kd-s2"
    running.mkdir()
    (running / "args.yaml").write_text("model: {}\n")
    assert main(["--rows", "alone,kd", "--seeds", "1,2", "--epochs", "3", "--output", str(tmp_path), "--report"],
                lines.append) == 0
    assert lines[-1] == "2 of 4 runs finished; not finished: alone seed 2, kd seed 2"
    assert "| KD | 1 | 97.00 | +1.00 (1 pair) | 97.00 | – |" in lines[-2]
    assert "teacher: ResNet-10-T, labels only, 6 epochs, top-1 99.00" in lines[-2]
    assert (running / "args.yaml").is_file()


def test_a_study_continues_from_a_committed_runs_json_training_only_the_missing_runs(tmp_path, monkeypatch):
    settings = {"epochs": 3, "setting": "full", "extra_args": "", "teacher_epochs": 6, "teacher_args": ""}
    runs = [{"row": row, "seed": seed, "top1": top1, "top5": 100.0, "ema_top1": None, "minutes": 5.0, "error": error}
            for row, seed, top1, error in (("alone", 1, 90.0, None), ("alone", 2, 92.0, None),
                                           ("kd", 1, 93.0, None), ("kd", 2, None, "exit status 1"))]
    (tmp_path / "runs.json").write_text(json.dumps({"settings": settings, "machine": "a CPU", "teacher_top1": 99.0,
                                                    "runs": runs}))  # as committed: no run folder, no study.json
    finished_run(tmp_path / "teacher", 98.5)
    (tmp_path / "teacher" / "student").mkdir()
    (tmp_path / "teacher" / "student" / "model.safetensors").write_bytes(b"weights")
    trained = []

    def fake_training(command, **kwargs):  # "trains" by writing the evaluation the study reads
        folder = Path(command[command.index("--output_dir") + 1])
        trained.append(folder.name)
        finished_run(folder, 95.0)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(distillation_study.subprocess, "run", fake_training)
    lines = []
    assert main(["--rows", "alone,kd", "--seeds", "1,2", "--epochs", "3", "--jobs", "1", "--output", str(tmp_path)],
                lines.append) == 0
    assert lines[0].startswith("4 runs (2 rows x 2 seeds), 3 already finished")
    assert trained == ["kd-s2"]  # the failed run is trained again, the recorded ones are kept
    assert "warning: this teacher reaches top-1 98.50, the recorded runs' teacher 99.00" in lines[1]
    assert "| KD | 1,2 | 94.00 ± 1.41 | +3.00 [+3.00, +3.00] (2 pairs) | 93.00 / 95.00 |" in lines[-1]
    kept = {(r["row"], r["seed"]): r for r in json.loads((tmp_path / "runs.json").read_text())["runs"]}
    assert kept[("alone", 1)]["minutes"] == 5.0 and kept[("kd", 2)]["top1"] == 95.0
    with pytest.raises(SystemExit):  # the recorded settings count as the study's
        main(["--rows", "alone", "--seeds", "1", "--epochs", "4", "--output", str(tmp_path)], lines.append)


def test_few_labels_leaves_out_crd_and_refuses_it_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["--rows", "alone,crd", "--setting", "few-labels", "--output", str(tmp_path)], print)
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "--setting few-labels: crd cannot train on unlabelled examples (its memory bank needs every example's "
        "class); leave it out of --rows")
    assert not (tmp_path / "study.json").exists()


def test_failed_runs_are_one_line_each_and_the_study_goes_on(tmp_path):
    lines = []
    status = main(["--rows", "alone", "--seeds", "1,2", "--epochs", "1", "--jobs", "1", "--threads", "1",
                   "--extra-args", "--no-such-flag 1", "--output", str(tmp_path)], lines.append)
    assert status == 1
    for seed in (1, 2):
        log = tmp_path / "logs" / f"alone-s{seed}.log"
        assert any(re.fullmatch(rf"\[{seed}/2\] alone seed {seed}: FAILED \(exit status 2: .*--no-such-flag.*; "
                                rf"log: {re.escape(str(log))}\) \(\d+\.\d min\) elapsed .*", line) for line in lines)
    assert lines[-1] == "2 of 2 runs failed: alone seed 1, alone seed 2"
    assert "Failed runs (2): alone seed 1 (exit status 2" in (tmp_path / "results.md").read_text()


def test_the_estimate_of_a_continued_study_counts_its_recorded_runs_minutes():
    lines = []
    recorded = [RunResult("alone", 1, top1=90.0, minutes=10.0), RunResult("kd", 1, top1=91.0, minutes=12.0),
                RunResult("pat", 1, error="diverged", minutes=1.0)]
    progress = Progress([("kd", 2), ("dkd", 1), ("dkd", 2)], recorded, total=6, jobs=2, echo=lines.append)
    progress.finished(RunResult("kd", 2, top1=92.0, minutes=14.0))
    # dkd has no run yet: each of its two runs is expected to take the mean of all finished runs, (10+12+14)/3,
    # shared by two jobs; the failed run's minute is no estimate.
    assert re.fullmatch(r"\[4/6\] kd seed 2: top-1 92\.00 \(14\.0 min\) elapsed \d+\.\d min, ~12 min left", lines[0])


def test_summarise_gathers_studies_by_budget(tmp_path):
    for epochs, top1 in ((48, [97.0, 98.0]), (32, [95.0, 96.0])):
        settings = {"epochs": epochs, "setting": "full", "extra_args": "", "teacher_epochs": 6, "teacher_args": ""}
        runs = [{"row": "alone", "seed": seed, "top1": value, "top5": 100.0, "ema_top1": None, "minutes": 2.0,
                 "error": None} for seed, value in zip((1, 2), top1)]
        (tmp_path / f"e{epochs}").mkdir()
        (tmp_path / f"e{epochs}" / "runs.json").write_text(json.dumps({"settings": settings, "machine": "a CPU",
                                                                       "teacher_top1": None, "runs": runs}))
    output = tmp_path / "budget.md"
    assert main(["--summarise", str(tmp_path / "e48"), str(tmp_path / "e32"), "--summary-output", str(output)],
                lambda line: None) == 0
    assert "- machine: a CPU\n" in output.read_text()
    rows = [line for line in output.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows == ["| 32 | student alone | 1,2 | 95.50 ± 0.71 | – | 95.00 / 96.00 | 2.0 |",
                    "| 48 | student alone | 1,2 | 97.50 ± 0.71 | – | 97.00 / 98.00 | 2.0 |"]


def test_a_tiny_study_trains_the_teacher_once_then_every_row_and_seed(tmp_path, monkeypatch):
    tiny = "--max-train-samples 64 --max-eval-samples 32 --workers 0"  # one batch of the config's 64
    argv = ["--rows", "alone,kd", "--seeds", "1,2", "--epochs", "1", "--jobs", "1", "--threads", "1",
            "--teacher-epochs", "1", "--teacher-args", tiny, "--extra-args", tiny, "--output", str(tmp_path)]
    lines = []
    assert main(argv, lines.append) == 0
    assert lines[1] == "training the teacher (1 epochs)" and lines[2].startswith("teacher: top-1 ")
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split(":")[0] for line in progress] == ["[1/4] kd seed 1", "[2/4] kd seed 2", "[3/4] alone seed 1",
                                                         "[4/4] alone seed 2"]
    assert re.search(r"\(\d+\.\d min\) elapsed \d+\.\d min, ~\d+ min left$", progress[0])
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert sorted((r["row"], r["seed"]) for r in runs["runs"]) == [("alone", 1), ("alone", 2), ("kd", 1), ("kd", 2)]
    assert all(0 <= r["top1"] <= 100 and r["error"] is None and r["minutes"] > 0 for r in runs["runs"])
    assert 0 <= runs["teacher_top1"] <= 100
    report = (tmp_path / "results.md").read_text()
    assert re.search(r"\| KD \| 1,2 \| [\d.]+ ± [\d.]+ \| [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] \(2 pairs\) \|", report)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(distillation_study.subprocess, "run", no_training)
    lines = []
    assert main(argv, lines.append) == 0  # nothing left to train, the teacher included
    assert lines[0].startswith("4 runs (2 rows x 2 seeds), 4 already finished")
    assert lines[-1] == report
