"""The offline demo: distil a CNN teacher into a ViT student on scikit-learn's digits, and print a table.

    python benchmarks/digits_demo.py [--epochs N] [--seeds 1,2,3] [--output DIR] [--rows alone,kd,...] [--jobs N]

1. trains the teacher (a ResNet-10-T, 6 epochs) on labels alone (the `vanilla` path) and exports it;
2. trains the ViT student alone, then with each distiller, from that teacher: the student runs are
   independent, so they run side by side (one process per CPU core, one thread each: on small models that
   gets more out of the cores than one run over all of them), longest first;
3. prints one line per finished run and the total time, then the table of top-1 / top-5 on the held-out 20%
   (per row: the seed's value, or the mean ± standard deviation and every seed's value with --seeds) with the
   wall-clock minutes of each run, also written to OUTPUT/results.md, and what the table can and cannot show;
4. prints the seeded comparison that the table cannot make, as benchmarks/distillation_study.py measured it
   (the committed tables of benchmarks/results/distillation_study/, with their machine, budget and seeds).
Each run's log is OUTPUT/NAME.log. Everything runs offline on the CPU (or a GPU if there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reporting import describe_machine  # noqa: E402

CONFIG = "digits"  # shipped with the package (pat_hf/config/recipes/digits.yaml)
TEACHER_EPOCHS = 6
# Region attention narrowed to the demo's 32x32 images.
PAT = ["--distiller", "pat", "--pat-raa-dim", "64", "--pat-raa-num-queries", "16"]
# Longest first, so that side-by-side runs finish together.
STUDENT_ROWS = {
    "pat": ("student + PAT (reference mode)", [*PAT, "--pat-mode", "reference"]),
    "pat-corrected": ("student + PAT (corrected mode)", [*PAT, "--pat-mode", "corrected"]),
    "ofa": ("student + OFA", ["--distiller", "ofa"]),
    "kd": ("student + KD", ["--distiller", "kd"]),
    "alone": ("student alone", ["--distiller", "vanilla", "--teacher", ""]),
}
DEFAULT_ROWS = ("alone", "kd", "ofa", "pat")
TABLE_ORDER = ("alone", "kd", "ofa", "pat", "pat-corrected")
# The seeded study's committed tables, one per setting, in the order they are printed.
STUDY_TABLES = ROOT / "benchmarks" / "results" / "distillation_study"
STUDY_SETTINGS = ("full", "few-labels", "few-images")


@dataclass
class Result:
    label: str
    top1: float
    top5: float
    minutes: float
    seed: int | None = None


class RunFailed(RuntimeError):
    pass


def run(name: str, label: str, output: Path, flags: list[str], threads: int, seed: int | None = None) -> Result:
    """One training run (with `seed`, else the config's) in its own process with `threads` CPU threads; its log
    goes to OUTPUT/NAME.log."""
    seed_flags = [] if seed is None else ["--seed", str(seed)]
    command = [sys.executable, "-m", "pat_hf.cli.train", "--config", CONFIG, "--output_dir", str(output / name),
               "--report_to", "none", "--disable_tqdm", "true", *flags, *seed_flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = output / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as stream:
        status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    minutes = (time.perf_counter() - start) / 60
    if status:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RunFailed(f"{label} failed (exit status {status}); the end of {log}:\n{tail}")
    metrics = json.loads((output / name / "all_results.json").read_text())
    return Result(label, metrics["eval_top1"], metrics["eval_top5"], minutes, seed)


def format_values(values: list[float]) -> str:
    """One seed's value, or the mean ± standard deviation and every seed's value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return (f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"({' / '.join(f'{v:.2f}' for v in values)})")


def results_table(teacher: Result, rows: list[list[Result]], seeds: list[int]) -> list[str]:
    """The demo's table: the teacher, then each student row over its seeds (in `seeds` order)."""
    several = len(seeds) > 1
    heading = (f"top-1 mean ± std (seeds {' / '.join(map(str, seeds))})" if several else f"top-1 (seed {seeds[0]})")
    lines = [f"| run | {heading} | top-5{' (mean)' if several else ''} | minutes per run |", "|---|---|---|---|",
             f"| {teacher.label} | {teacher.top1:.2f} | {teacher.top5:.2f} | {teacher.minutes:.1f} |"]
    for results in rows:
        lines.append(f"| {results[0].label} | {format_values([r.top1 for r in results])} | "
                     f"{statistics.fmean(r.top5 for r in results):.2f} | "
                     f"{statistics.fmean(r.minutes for r in results):.1f} |")
    return lines


def caveat(seeds: list[int], epochs: int | str) -> str:
    seeds_text = f"{len(seeds)} seeds per row" if len(seeds) > 1 else "one seed per row"
    return (f"What this table can show: {seeds_text}, {epochs} student epochs. At this budget the student has not "
            "converged, and on 360 held-out images (one image is 0.28 points) a run with another seed moves by "
            "several points, so the gaps between rows are not a ranking of the methods: the table shows that every "
            "path works. The comparison it cannot make follows.")


def shown(path: Path) -> str:
    """`path` as the README names it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def study_excerpts(folder: Path = STUDY_TABLES) -> list[str]:
    """The committed tables of benchmarks/distillation_study.py, one per setting (each file's header lines
    name the machine, budget and seeds), or a line saying that none is committed."""
    found = [path for path in (folder / setting / "results.md" for setting in STUDY_SETTINGS) if path.is_file()]
    if not found:
        return [f"No seeded comparison is committed in {shown(folder)} yet: run "
                "benchmarks/distillation_study.py."]
    lines = ["The seeded comparison, as benchmarks/distillation_study.py measured it (committed in "
             f"{shown(folder)}/; not run by this demo):"]
    for path in found:
        lines += ["", f"[{shown(path)}]", *path.read_text().strip().splitlines()[1:]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs of the student runs")
    parser.add_argument("--seeds", default="1", help="comma-separated training seeds of every student row")
    parser.add_argument("--output", type=Path, default=ROOT / "output" / "digits_demo")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"student rows to run, comma-separated, from {','.join(TABLE_ORDER)}")
    parser.add_argument("--jobs", type=int, default=None, help="student runs side by side (default: CPU cores)")
    args = parser.parse_args()
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in STUDENT_ROWS]
    if unknown:
        parser.error(f"unknown --rows {','.join(unknown)}; choose from {','.join(TABLE_ORDER)}")
    try:
        seeds = sorted({int(seed) for seed in args.seeds.split(",") if seed.strip()})
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, not {args.seeds!r}")
    if not seeds:
        parser.error("--seeds names no seed")
    if args.output.exists():
        parser.error(f"{args.output} exists; remove it or pass --output DIR")
    args.output.mkdir(parents=True)
    cores = os.cpu_count() or 1
    runs = [(row, seed) for row in sorted(rows, key=list(STUDENT_ROWS).index) for seed in seeds]
    jobs = max(1, min(args.jobs or cores, len(runs)))
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    total_runs = len(runs) + 1
    start = time.perf_counter()

    def report(done: int, result: Result) -> None:
        seed = "" if result.seed is None or len(seeds) == 1 else f" (seed {result.seed})"
        print(f"[{done}/{total_runs}] {result.label}{seed}: top-1 {result.top1:.2f}, top-5 {result.top5:.2f}, "
              f"{result.minutes:.1f} min", flush=True)

    teacher_label = f"teacher (ResNet-10-T, labels only, {TEACHER_EPOCHS} epochs)"
    print(f"training the teacher, then {len(runs)} student runs ({len(rows)} rows x {len(seeds)} seed(s)), "
          f"{jobs} at a time; logs in {args.output}", flush=True)
    try:
        teacher = run("teacher", teacher_label, args.output, [
            "--model", "resnet10t", "--model-kwargs", "{}", "--teacher", "", "--distiller", "vanilla",
            "--epochs", str(TEACHER_EPOCHS)], threads=cores)
        report(1, teacher)
        weights = str(args.output / "teacher" / "student" / "model.safetensors")
        results: dict[tuple[str, int], Result] = {}
        with ThreadPoolExecutor(jobs) as pool:
            futures = {pool.submit(run, f"{row}-s{seed}" if len(seeds) > 1 else row, STUDENT_ROWS[row][0],
                                   args.output, ["--teacher-pretrained", weights, *STUDENT_ROWS[row][1], *epochs],
                                   max(1, cores // jobs), seed): (row, seed)
                       for row, seed in runs}
            for future in as_completed(futures):
                row, seed = futures[future]
                results[(row, seed)] = future.result()
                report(len(results) + 1, results[(row, seed)])
    except RunFailed as error:
        sys.exit(str(error))
    total = (time.perf_counter() - start) / 60

    by_row = [[results[(row, seed)] for seed in seeds] for row in TABLE_ORDER if row in rows]
    lines = [f"Digits demo (scikit-learn digits, 1437 train / 360 held-out, 32x32) on {describe_machine()}; "
             f"{jobs} student runs side by side, {total:.1f} minutes in all", "",
             *results_table(teacher, by_row, seeds), "", caveat(seeds, args.epochs or "the config's")]
    table = "\n".join(lines)
    (args.output / "results.md").write_text(table + "\n")
    print(f"total: {total:.1f} minutes\n\n{table}\n\n" + "\n".join(study_excerpts()))


if __name__ == "__main__":
    main()
