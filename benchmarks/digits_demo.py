"""The offline demo: distil a CNN teacher into a ViT student on scikit-learn's digits, and print a table.

    python benchmarks/digits_demo.py [--epochs N] [--output DIR] [--rows alone,kd,...]

1. trains the teacher (a ResNet-10-T, 10 epochs) on labels alone (the `vanilla` path) and exports it;
2. trains the ViT student alone, then with each distiller, from that teacher;
3. prints top-1 / top-5 on the held-out 20% and the wall-clock minutes of each run, and writes them to
   OUTPUT/results.md. Everything runs offline on the CPU (or a GPU if there is one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reporting import describe_machine  # noqa: E402
from pat_hf import train as pat_train  # noqa: E402

CONFIG = "digits"  # shipped with the package (pat_hf/configs/digits.yaml)
TEACHER_EPOCHS = 10
# Region attention narrowed to the demo's 32x32 images.
PAT = ["--distiller", "pat", "--pat-raa-dim", "64", "--pat-raa-num-queries", "16"]
STUDENT_ROWS = {
    "alone": ("student alone", ["--distiller", "vanilla", "--teacher", ""]),
    "kd": ("student + KD", ["--distiller", "kd", "--kd-temperature", "4"]),
    "ofa": ("student + OFA", ["--distiller", "ofa"]),
    "pat": ("student + PAT (reference mode)", [*PAT, "--pat-mode", "reference"]),
    "pat-corrected": ("student + PAT (corrected mode)", [*PAT, "--pat-mode", "corrected"]),
}


def run(name: str, output: Path, flags: list[str]) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    metrics = pat_train.main(["--config", CONFIG, "--output_dir", str(output / name), "--report_to", "none",
                                "--disable_tqdm", "true", *flags])
    return metrics, (time.perf_counter() - start) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs of the student runs")
    parser.add_argument("--output", type=Path, default=ROOT / "output" / "digits_demo")
    parser.add_argument("--rows", default=",".join(STUDENT_ROWS), help="student rows to run, comma-separated")
    args = parser.parse_args()
    if args.output.exists():
        parser.error(f"{args.output} exists; remove it or pass --output DIR")
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []

    results = []
    metrics, minutes = run("teacher", args.output, ["--model", "resnet10t", "--model-kwargs", "{}", "--teacher", "",
                                                     "--distiller", "vanilla", "--epochs", str(TEACHER_EPOCHS)])
    results.append(("teacher (ResNet-10-T, labels only)", metrics, minutes))
    teacher = str(args.output / "teacher" / "student" / "model.safetensors")
    for key in args.rows.split(","):
        label, flags = STUDENT_ROWS[key]
        metrics, minutes = run(key, args.output, ["--teacher-pretrained", teacher, *flags, *epochs])
        results.append((label, metrics, minutes))

    lines = [f"Digits demo (scikit-learn digits, 1437 train / 360 held-out, 32x32) on {describe_machine()}", "",
             "| run | top-1 | top-5 | minutes |", "|---|---|---|---|"]
    lines += [f"| {label} | {m['eval_top1']:.2f} | {m['eval_top5']:.2f} | {minutes:.1f} |"
              for label, m, minutes in results]
    table = "\n".join(lines)
    (args.output / "results.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
