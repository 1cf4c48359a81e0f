"""benchmarks/paper_rows.py: its rows are the shipped experiment recipes, its commands run them, its expected values
have sources, and a run's summary is compared with them. Nothing here trains."""

from __future__ import annotations

import shlex

import pytest

from benchmarks import paper_rows
from benchmarks.paper_rows import EXPECTED, EXPERIMENTS, SOURCES, find_row, load_rows, main

RECIPES = sorted(f"experiments/{path.parent.name}/{path.stem}" for path in EXPERIMENTS.glob("*/*.yaml"))


def dry_run(capsys, *argv: str) -> list[str]:
    main(["--dry-run", *argv])
    return shlex.split(capsys.readouterr().out.strip())


def test_list_covers_exactly_the_31_recipes(capsys):
    assert len(RECIPES) == 31
    main(["--list"])
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert sorted(line.split()[-1] for line in lines) == RECIPES
    main(["--list", "--markdown"])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| cifar100/") or line.startswith("| imagenet/")]
    assert len(rows) == 31
    assert sorted(line.split("--config ")[1].split()[0].rstrip("`") for line in rows) == RECIPES
    assert "31 rows, 10 with a published number" in table


def test_rows_follow_the_reference_scripts():
    rows = load_rows()
    assert [row.key for row in rows] == [f"cifar100/{n}" for n in range(1, 16)] + \
        [f"imagenet/{n}" for n in range(1, 17)]
    row = find_row(rows, "cifar100/4")
    assert (row.distiller, row.teacher, row.student, row.base, row.epochs) == \
        ("pat", "swin_tiny_patch4_window7_224", "resnet18", "cnn", 300)
    assert row.pair == "Swin-T → ResNet18"
    assert find_row(rows, "imagenet/12").pair == "ConvNeXt-T → Swin-N"
    assert find_row(rows, "12_pat_convnext_tiny-swin_pico") is find_row(rows, "cifar100/12")
    assert find_row(rows, "experiments/imagenet/09_pat_convnext_tiny-deit_tiny.yaml").key == "imagenet/9"
    with pytest.raises(ValueError, match="DATASET/N"):
        find_row(rows, "7")  # both scripts have a row 7


def test_dry_run_of_a_cifar_row_is_one_gpu_at_the_recipe_batch(capsys):
    command = dry_run(capsys, "cifar100/4", "--epochs", "3")
    assert command[1:] == [
        "launch", "--config_file", "accelerate_configs/single_gpu.yaml", "run_distill.py",
        "--config", "experiments/cifar100/04_pat_swin_tiny-resnet18", "--epochs", "3",
        "--output_dir", "runs/paper_rows/cifar100/04_pat_swin_tiny-resnet18-e3"]
    assert command[0].endswith("accelerate")


def test_dry_run_of_an_imagenet_row_keeps_the_four_process_global_batch(capsys):
    command = dry_run(capsys, "09_pat_convnext_tiny-deit_tiny", "--epochs", "2", "--data_dir", "/data/imagenet",
                      "--teacher-pretrained", "hf-hub:timm/convnext_tiny.fb_in1k", "--launcher", "python",
                      "--", "--amp-dtype", "bfloat16")
    assert command[1:] == [
        "-m", "pat_hf.train", "--config", "experiments/imagenet/09_pat_convnext_tiny-deit_tiny", "--epochs", "2",
        "--output_dir", "runs/paper_rows/imagenet/09_pat_convnext_tiny-deit_tiny-e2", "--batch-size", "512",
        "--data_dir", "/data/imagenet", "--teacher-pretrained", "hf-hub:timm/convnext_tiny.fb_in1k",
        "--amp-dtype", "bfloat16"]


def test_every_expected_value_names_its_source_and_row():
    keys = {(row.dataset, row.number) for row in load_rows()}
    assert set(EXPECTED) <= keys
    assert all(value.source in SOURCES and 0 < value.top1 < 100 for value in EXPECTED.values())
    rows = {row.key: row for row in load_rows()}
    assert paper_rows.expected_text(rows["cifar100/10"]) == "79.59 [PN]"
    assert paper_rows.expected_text(rows["cifar100/2"]) == "no published number found"


def test_measured_pairs_take_the_measured_step_and_others_are_scaled():
    rows = {row.key: row for row in load_rows()}
    ms, how = paper_rows.step_time_ms(rows["cifar100/10"])
    assert ms == pytest.approx(127.9) and how.startswith("measured")
    assert paper_rows.gpu_hours(rows["cifar100/10"]) == pytest.approx(300 * 50_000 * 0.1279 / 128 / 3600)
    assert paper_rows.step_time_ms(rows["cifar100/4"])[0] == pytest.approx(137.9)
    # A bigger teacher, a longer step; the same teacher with another student of the family, the same step.
    assert paper_rows.step_time_ms(rows["cifar100/6"])[0] > 137.9
    assert paper_rows.step_time_ms(rows["cifar100/7"]) == (pytest.approx(137.9), "from Swin-T → ResNet18 PAT")


def test_a_run_is_refused_without_cuda_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(paper_rows.subprocess, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["cifar100/1", "--epochs", "1"])


def test_a_finished_run_is_compared_with_the_expected_value(tmp_path):
    (tmp_path / "summary.csv").write_text(
        "epoch,train_loss,eval_top1,eval_ema_top1,eval_max_top1\n"
        "1,4.0,70.10,69.00,70.10\n2,3.5,80.00,80.50,80.50\n3,3.4,79.90,80.20,80.20\n")
    final, ema, best = paper_rows.read_summary(tmp_path)
    assert (final, ema, best) == (79.90, 80.20, 80.50)
    rows = {row.key: row for row in load_rows()}
    text = paper_rows.comparison(rows["cifar100/4"], 3, final, ema, best)
    assert "final top-1 79.90 (EMA 80.20), best 80.50" in text
    assert "expected 81.22" in text and "gap -0.72 points" in text and "all 300 epochs" in text
    assert "no published number found" in paper_rows.comparison(rows["cifar100/5"], 3, final, ema, best)


def test_reproducing_md_embeds_the_current_table():
    page = (paper_rows.ROOT / "docs" / "REPRODUCING.md").read_text()
    assert paper_rows.markdown_table(load_rows()) in page
