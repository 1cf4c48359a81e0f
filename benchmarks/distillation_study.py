"""A seeded distillation study on scikit-learn's digits: every row with several seeds, compared with the student alone.

    python benchmarks/distillation_study.py [--rows alone,kd,...] [--seeds 1,2,3,4,5] [--epochs N]
        [--setting full|few-images|few-labels] [--train-fraction F] [--label-fraction F] [--jobs N]
        [--output DIR] [--extra-args "..."]
    python benchmarks/distillation_study.py --summarise DIR [DIR ...] --summary-output FILE.md

1. trains the teacher (a ResNet-10-T on labels alone, on every training image and label) once, in OUTPUT/teacher;
2. trains every row x seed as its own `python -m pat_hf.train` process (the study depends on that command
   only, not on the package's modules), side by side on --jobs processes, longest rows first; a run whose
   folder holds finished results is kept, so an interrupted study continues where it stopped;
3. writes OUTPUT/results.md (per row: mean and standard deviation of top-1, raw and EMA where the runs keep an
   EMA, and the paired difference to the student alone over the same seeds with a 95% t-interval),
   OUTPUT/results.png (the means with their standard deviations) and OUTPUT/runs.json (every run).
A failed run is reported on one line with its log (OUTPUT/logs/ROW-sSEED.log); the others go on, and the study
exits non-zero at the end. --summarise gathers several finished studies (e.g. one per epoch budget) in one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the study runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats  # noqa: E402  (scikit-learn, a dependency of pat-hf, installs scipy)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reporting import describe_machine, write_report  # noqa: E402

CONFIG = "digits"  # shipped with the package: test_vit student, 32x32 inputs
# pat-hf's digits training split: 80% of scikit-learn's 1,797 images, stratified (tests/test_data.py pins it).
DIGITS_TRAIN_IMAGES = 1437
TEACHER_EPOCHS = 6
TEACHER_WEIGHTS = "student/model.safetensors"  # what a run exports, inside its output folder
DEFAULT_EPOCHS = 48
DEFAULT_SEEDS = (1, 2, 3, 4, 5)
# Region attention narrowed to the 32x32 inputs, as in the quick-start demo.
PAT = ["--distiller", "pat", "--pat-raa-dim", "64", "--pat-raa-num-queries", "16"]
# Each row keeps its distiller's defaults, the reference's (KD at temperature 1, as PAT's own KD term).
ROWS: dict[str, tuple[str, list[str]]] = {
    "alone": ("student alone", ["--distiller", "vanilla", "--teacher", ""]),
    "kd": ("KD", ["--distiller", "kd"]),
    "dkd": ("DKD", ["--distiller", "dkd"]),
    "dist": ("DIST", ["--distiller", "dist"]),
    "ofa": ("OFA", ["--distiller", "ofa"]),
    "fitnet": ("FitNet", ["--distiller", "fitnet"]),
    "crd": ("CRD", ["--distiller", "crd"]),
    "pat": ("PAT (reference mode)", [*PAT, "--pat-mode", "reference"]),
    "pat-corrected": ("PAT (corrected mode)", [*PAT, "--pat-mode", "corrected"]),
}
# Side-by-side runs finish together when the slowest start first.
LONGEST_FIRST = ("pat", "pat-corrected", "ofa", "crd", "fitnet", "dkd", "dist", "kd", "alone")
BASELINE = "alone"
SETTINGS = ("full", "few-images", "few-labels")
# CRD's memory bank keeps one entry per training example under its class: the training refuses it with unlabelled
# examples, so the few-labels setting leaves it out.
NEEDS_EVERY_LABEL = ("crd",)


@dataclass
class RunResult:
    row: str
    seed: int
    top1: float | None = None
    top5: float | None = None
    ema_top1: float | None = None
    minutes: float | None = None
    error: str | None = None


@dataclass
class RowSummary:
    row: str
    seeds: list[int]
    top1: list[float]
    ema_top1: list[float] | None
    minutes: float | None
    difference: tuple[float, float | None, int] | None  # paired mean difference to alone, its 95% half-width, pairs


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_interval(values: Sequence[float], baseline: Sequence[float],
                    confidence: float = 0.95) -> tuple[float, float | None]:
    """Mean of the paired differences `values - baseline` and the half-width of its two-sided Student-t
    interval (None with fewer than two pairs: no spread to estimate)."""
    if len(values) != len(baseline) or not values:
        raise ValueError(f"paired_interval needs as many values as baseline values, at least one; got "
                         f"{len(values)} and {len(baseline)}")
    differences = [a - b for a, b in zip(values, baseline)]
    mean, std = mean_std(differences)
    if std is None:
        return mean, None
    quantile = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1)
    return mean, quantile * std / math.sqrt(len(differences))


def finished_metrics(folder: Path) -> dict | None:
    """The metrics of a finished run in `folder`: its all_results.json once it holds the final evaluation
    (the file exists with the training metrics alone before that)."""
    path = folder / "all_results.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and "eval_top1" in metrics else None


def prepare_run_folder(folder: Path, required: Sequence[str] = ()) -> dict | None:
    """The metrics of the finished run in `folder` that also holds the `required` files; a half-finished run
    there is removed (so that the training starts afresh rather than refusing a used folder), None returned."""
    metrics = finished_metrics(folder)
    if metrics is not None and all((folder / name).is_file() for name in required):
        return metrics
    if folder.exists():
        shutil.rmtree(folder)
    return None


def recorded_study(output: Path) -> dict:
    """OUTPUT/runs.json as the study last wrote it ({} when there is none)."""
    path = output / "runs.json"
    return json.loads(path.read_text()) if path.exists() else {}


def recorded_runs(study: dict) -> dict[tuple[str, int], RunResult]:
    """Each run that a `recorded_study` holds. A finished run's folder keeps its metrics but not how long it
    took; and a study continued from a committed runs.json (the run folders are not committed) has no folders."""
    return {(run["row"], run["seed"]): RunResult(**run) for run in study.get("runs", [])}


def finished_or_recorded(row: str, seed: int, metrics: dict | None,
                         recorded: dict[tuple[str, int], RunResult]) -> RunResult | None:
    """The run's result from its folder's metrics, else from runs.json when it recorded it finished; None when
    the run is still to train."""
    kept = recorded.get((row, seed))
    if metrics is not None:
        return result_of(row, seed, metrics, kept and kept.minutes)
    if kept is not None and kept.error is None and kept.top1 is not None:
        return kept
    return None


def result_of(row: str, seed: int, metrics: dict, minutes: float | None) -> RunResult:
    return RunResult(row, seed, metrics["eval_top1"], metrics.get("eval_top5"), metrics.get("eval_ema_top1"),
                     minutes)


class Launcher:
    """Runs `python -m pat_hf.train` for one run, `threads` CPU threads each, its output in OUTPUT/logs."""

    def __init__(self, output: Path, threads: int) -> None:
        self.output = output
        self.threads = threads

    def __call__(self, name: str, flags: list[str]) -> tuple[dict | None, float, str | None]:
        """Train into OUTPUT/runs/NAME (OUTPUT/NAME for the teacher): (metrics, minutes, error line)."""
        folder = self.folder(name)
        log = self.log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pat_hf.train", "--config", CONFIG, "--output_dir", str(folder),
                   "--report_to", "none", "--disable_tqdm", "true", *flags]
        threads = str(self.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        with log.open("w") as stream:
            status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        minutes = (time.perf_counter() - start) / 60
        metrics = finished_metrics(folder)
        if status or metrics is None:
            return None, minutes, f"exit status {status}: {last_line(log)}"
        return metrics, minutes, None

    def folder(self, name: str) -> Path:
        return self.output / name if name == "teacher" else self.output / "runs" / name

    def log(self, name: str) -> Path:
        return self.output / "logs" / f"{name}.log"


def last_line(log: Path) -> str:
    """The last non-empty line of a log: pat-hf's one-line error, or the end of a traceback."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_name(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


def student_flags(args: argparse.Namespace) -> list[str]:
    """The flags every student run shares: its budget, its setting's data, the pass-through."""
    flags = ["--epochs", str(args.epochs)]
    if args.setting == "few-images":
        flags += ["--max-train-samples", str(round(args.train_fraction * DIGITS_TRAIN_IMAGES)),
                  "--data_seed", str(args.data_seed)]
    elif args.setting == "few-labels":
        flags += ["--label-fraction", str(args.label_fraction)]
    return flags + shlex.split(args.extra_args)


def study_settings(args: argparse.Namespace) -> dict:
    """What makes two runs of the same row and seed comparable: a study folder keeps one of these."""
    settings = {"epochs": args.epochs, "setting": args.setting, "extra_args": args.extra_args,
                "teacher_epochs": args.teacher_epochs, "teacher_args": args.teacher_args}
    if args.setting == "few-images":
        settings.update(train_fraction=args.train_fraction, data_seed=args.data_seed)
    if args.setting == "few-labels":
        settings["label_fraction"] = args.label_fraction
    return settings


class Progress:
    """One line per finished run, with the time so far and an estimate of the rest (the mean minutes of the
    row's finished runs, else of all finished runs, over the runs left, shared by the side-by-side jobs). The
    runs a continued study keeps count among the finished ones."""

    def __init__(self, pending: list[tuple[str, int]], recorded: list[RunResult], total: int, jobs: int,
                 echo: Callable[[str], None]) -> None:
        self.pending = list(pending)
        self.done = len(recorded)
        self.total = total
        self.jobs = jobs
        self.echo = echo
        self.minutes: dict[str, list[float]] = {}
        for result in recorded:
            self.record_minutes(result)
        self.start = time.perf_counter()

    def expected_minutes(self, row: str) -> float | None:
        everything = [m for values in self.minutes.values() for m in values]
        own = self.minutes.get(row)
        return statistics.fmean(own) if own else statistics.fmean(everything) if everything else None

    def record_minutes(self, result: RunResult) -> None:
        if result.minutes is not None and result.error is None:
            self.minutes.setdefault(result.row, []).append(result.minutes)

    def finished(self, result: RunResult) -> None:
        self.done += 1
        self.pending.remove((result.row, result.seed))
        self.record_minutes(result)
        outcome = f"FAILED ({result.error})" if result.error else f"top-1 {result.top1:.2f}"
        elapsed = (time.perf_counter() - self.start) / 60
        estimates = [self.expected_minutes(row) for row, _ in self.pending]
        left = "" if not self.pending or None in estimates else f", ~{sum(estimates) / self.jobs:.0f} min left"
        self.echo(f"[{self.done}/{self.total}] {result.row} seed {result.seed}: {outcome} "
                  f"({result.minutes:.1f} min) elapsed {elapsed:.1f} min{left}")


def summarise_rows(results: list[RunResult], rows: Sequence[str]) -> list[RowSummary]:
    """Per row (in `rows` order, rows with no finished run left out): the finished seeds' top-1 and the
    paired difference to the student alone over the seeds both finished."""
    finished = {(r.row, r.seed): r for r in results if r.error is None and r.top1 is not None}
    summaries = []
    for row in rows:
        runs = sorted((r for (name, _), r in finished.items() if name == row), key=lambda r: r.seed)
        if not runs:
            continue
        emas = [r.ema_top1 for r in runs]
        minutes = [r.minutes for r in runs if r.minutes is not None]
        difference = None
        if row != BASELINE:
            paired = [(r.top1, finished[(BASELINE, r.seed)].top1) for r in runs if (BASELINE, r.seed) in finished]
            if paired:
                mean, half_width = paired_interval([a for a, _ in paired], [b for _, b in paired])
                difference = (mean, half_width, len(paired))
        summaries.append(RowSummary(row, [r.seed for r in runs], [r.top1 for r in runs],
                                    None if None in emas else emas,
                                    statistics.fmean(minutes) if minutes else None, difference))
    return summaries


def format_mean_std(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_difference(difference: tuple[float, float | None, int] | None) -> str:
    if difference is None:
        return "–"
    mean, half_width, pairs = difference
    if half_width is None:
        return f"{mean:+.2f} (1 pair)"
    return f"{mean:+.2f} [{mean - half_width:+.2f}, {mean + half_width:+.2f}] ({pairs} pairs)"


def results_table(summaries: list[RowSummary]) -> list[str]:
    with_ema = any(s.ema_top1 for s in summaries)
    header = ["row", "seeds", "top-1 mean ± std"] + (["EMA top-1 mean ± std"] if with_ema else []) + \
        ["Δ top-1 vs alone [95% CI]", "top-1 per seed", "minutes per run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [ROWS[s.row][0], ",".join(map(str, s.seeds)), format_mean_std(s.top1)]
        if with_ema:
            cells.append(format_mean_std(s.ema_top1) if s.ema_top1 else "–")
        cells += [format_difference(s.difference), " / ".join(f"{v:.2f}" for v in s.top1),
                  "–" if s.minutes is None else f"{s.minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def setting_line(settings: dict) -> str:
    if settings["setting"] == "few-images":
        images = round(settings["train_fraction"] * DIGITS_TRAIN_IMAGES)
        return (f"few images: the students train on {images} of the {DIGITS_TRAIN_IMAGES} training images "
                f"(the same subset, in the same order, for every row and seed: --data_seed "
                f"{settings['data_seed']}), the teacher "
                f"on all of them")
    if settings["setting"] == "few-labels":
        return (f"few labels: the students see every training image and {settings['label_fraction']:.0%} of "
                f"the labels, the teacher all of them")
    return f"full: all {DIGITS_TRAIN_IMAGES} training images and labels"


def write_results(output: Path, settings: dict, results: list[RunResult], rows: Sequence[str],
                  teacher_top1: float | None, jobs: int) -> str:
    """OUTPUT/results.md, results.png and runs.json; returns the Markdown."""
    summaries = summarise_rows(results, rows)
    failed = [r for r in results if r.error]
    teacher = "not trained (no distilled row)" if teacher_top1 is None else f"top-1 {teacher_top1:.2f}"
    seeds = sorted({r.seed for r in results})
    lines = [
        f"# Distillation study on digits ({settings['epochs']} epochs)", "",
        f"- machine: {describe_machine()}; minutes per run are each run's wall-clock minutes under whatever ran "
        f"beside it (the study's last invocation ran {jobs} at a time; runs kept from earlier ones keep their own)",
        f"- student: test_vit (32x32, patch 4), {settings['epochs']} epochs, seeds {','.join(map(str, seeds))}",
        f"- setting: {setting_line(settings)}",
        f"- teacher: ResNet-10-T, labels only, {settings['teacher_epochs']} epochs, {teacher}",
        f"- extra training flags: {settings['extra_args'] or 'none'}",
        "- top-1 on the 360 held-out images (one image is 0.28 points); Δ is the paired difference to the "
        "student alone over the seeds both finished, with its 95% Student-t interval", "",
        *results_table(summaries),
    ]
    if failed:
        lines += ["", f"Failed runs ({len(failed)}): " + "; ".join(f"{r.row} seed {r.seed} ({r.error})"
                                                                  for r in failed)]
    markdown = "\n".join(lines) + "\n"
    write_report(output / "results.md", markdown)
    write_report(output / "runs.json", json.dumps({"settings": settings, "machine": describe_machine(),
                                                   "teacher_top1": teacher_top1,
                                                   "runs": [asdict(r) for r in results]}, indent=1) + "\n")
    if summaries:
        plot(output / "results.png", summaries, teacher_top1, settings)
    return markdown


def plot(path: Path, summaries: list[RowSummary], teacher_top1: float | None, settings: dict) -> None:
    figure, axes = plt.subplots(figsize=(1.1 * len(summaries) + 2.5, 4))
    means = [mean_std(s.top1)[0] for s in summaries]
    errors = [mean_std(s.top1)[1] or 0.0 for s in summaries]
    bars = axes.bar([ROWS[s.row][0] for s in summaries], means, yerr=errors, capsize=4, color="tab:blue")
    axes.bar_label(bars, labels=[f"{m:.1f}" for m in means], label_type="center", color="white")
    title = f"digits, {settings['setting']}, {settings['epochs']} epochs"
    if teacher_top1 is not None:
        axes.axhline(teacher_top1, color="tab:red", linestyle="--")
        title += f" (dashed: teacher, {teacher_top1:.1f})"
    low = min(m - e for m, e in zip(means, errors))
    # Zoomed on the bars: the differences that matter are a few points at most.
    axes.set_ylim(max(0.0, low - 5), min(100.0, max([*means, teacher_top1 or 0.0]) + 3))
    axes.set_ylabel("top-1 (%), mean ± std over seeds")
    axes.set_title(title)
    plt.setp(axes.get_xticklabels(), rotation=30, ha="right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def load_study(folder: Path) -> dict:
    path = folder / "runs.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{folder} holds no finished study ({path}: {error})") from None


def summarise_studies(folders: Sequence[Path]) -> str:
    """One Markdown table over several studies' runs.json (e.g. one study per epoch budget), by budget."""
    studies = sorted((load_study(folder) for folder in folders), key=lambda s: s["settings"]["epochs"])
    settings = {json.dumps({k: v for k, v in s["settings"].items() if k != "epochs"}, sort_keys=True)
                for s in studies}
    if len(settings) > 1:
        raise SystemExit("--summarise takes studies that differ in --epochs only")
    first = studies[0]["settings"]
    machines = sorted({s["machine"] for s in studies})
    lines = ["# Distillation study on digits: top-1 by epoch budget", "",
             f"- machine: {'; '.join(machines)}",
             f"- setting: {setting_line(first)}; extra training flags: {first['extra_args'] or 'none'}",
             "- top-1 on the 360 held-out images (one image is 0.28 points); Δ is the paired difference to the "
             "student alone over the same seeds, with its 95% Student-t interval", "",
             "| epochs | row | seeds | top-1 mean ± std | Δ top-1 vs alone [95% CI] | top-1 per seed | "
             "minutes per run |", "|---|---|---|---|---|---|---|"]
    for study in studies:
        results = [RunResult(**run) for run in study["runs"]]
        for s in summarise_rows(results, list(ROWS)):
            lines.append(f"| {study['settings']['epochs']} | {ROWS[s.row][0]} | {','.join(map(str, s.seeds))} | "
                         f"{format_mean_std(s.top1)} | {format_difference(s.difference)} | "
                         f"{' / '.join(f'{v:.2f}' for v in s.top1)} | "
                         f"{'–' if s.minutes is None else f'{s.minutes:.1f}'} |")
    return "\n".join(lines) + "\n"


def report_finished(output: Path, settings: dict, rows: list[str], seeds: list[int], jobs: int,
                    echo: Callable[[str], None], study: dict) -> int:
    """--report: the results of the runs of `rows` x `seeds` finished in `output`, without touching a run
    (one still training is left as it is)."""
    folders = Launcher(output, threads=1)
    recorded = recorded_runs(study)
    results, unfinished = [], []
    for row in rows:
        for seed in seeds:
            result = finished_or_recorded(row, seed, finished_metrics(folders.folder(run_name(row, seed))), recorded)
            if result is None:
                unfinished.append(f"{row} seed {seed}")
            else:
                results.append(result)
    teacher = finished_metrics(folders.folder("teacher"))
    teacher_top1 = teacher["eval_top1"] if teacher else study.get("teacher_top1")
    echo(write_results(output, settings, results, rows, teacher_top1, jobs))
    echo(f"{len(results)} of {len(rows) * len(seeds)} runs finished" +
         (f"; not finished: {', '.join(unfinished)}" if unfinished else ""))
    return 0


def parse_list(text: str, kind: type = str) -> list:
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", help=f"comma-separated, from {','.join(ROWS)} (default: all; few-labels: all but "
                                       f"{','.join(NEEDS_EVERY_LABEL)})")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated training seeds")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs of every student run")
    parser.add_argument("--setting", choices=SETTINGS, default="full")
    parser.add_argument("--train-fraction", type=float, default=0.1,
                        help="few-images: the fraction of the training images the students see")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="few-images: the seed of the subset (and of its order), the same for every run")
    parser.add_argument("--label-fraction", type=float, default=0.1,
                        help="few-labels: the fraction of the training labels the students see")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs side by side (default: cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (default: the cores shared out among the jobs)")
    parser.add_argument("--output", type=Path, default=ROOT / "output" / "distillation_study")
    parser.add_argument("--extra-args", default="", help="training flags added to every student run, quoted")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    parser.add_argument("--teacher-args", default="", help="training flags added to the teacher's run, quoted")
    parser.add_argument("--report", action="store_true", help=(
        "write OUTPUT's results from the runs finished so far and train nothing (a study still running, or "
        "stopped, keeps every run it has)"))
    parser.add_argument("--summarise", type=Path, nargs="+", metavar="DIR",
                        help="instead of training: gather these finished studies in one table by epoch budget")
    parser.add_argument("--summary-output", type=Path, help="--summarise: also write the table to this file")
    return parser


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> int:
    """Run (or continue) the study; returns the exit status: 0 when every run finished."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarise:
        table = summarise_studies(args.summarise)
        if args.summary_output:
            write_report(args.summary_output, table)
        echo(table)
        return 0
    cannot_train = NEEDS_EVERY_LABEL if args.setting == "few-labels" else ()
    rows = [row for row in ROWS if row not in cannot_train] if args.rows is None else parse_list(args.rows)
    unknown = [row for row in rows if row not in ROWS]
    if unknown or not rows:
        parser.error(f"unknown --rows {','.join(unknown)}; choose from {','.join(ROWS)}")
    refused = [row for row in rows if row in cannot_train]
    if refused:
        parser.error(f"--setting few-labels: {','.join(refused)} cannot train on unlabelled examples (its memory "
                     f"bank needs every example's class); leave it out of --rows")
    try:
        seeds = parse_list(args.seeds, int)
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, not {args.seeds!r}")
    if not seeds:
        parser.error("--seeds names no seed")
    for name in ("train_fraction", "label_fraction"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} is a fraction in (0, 1]")

    output = args.output
    settings = study_settings(args)
    settings_file = output / "study.json"
    # A study continued from a committed runs.json has no study.json: the settings recorded with the runs count.
    study = recorded_study(output)
    kept = json.loads(settings_file.read_text()) if settings_file.exists() else study.get("settings")
    if kept is not None and kept != settings:
        parser.error(f"{output} holds a study with other settings ({kept}); choose another --output")
    jobs = max(1, args.jobs)
    if args.report:
        if kept is None:
            parser.error(f"--report: {output} holds no study (no {settings_file.name} or runs.json)")
        return report_finished(output, settings, rows, seeds, jobs, echo, study)
    write_report(settings_file, json.dumps(settings, indent=1) + "\n")
    train = Launcher(output, args.threads or max(1, (os.cpu_count() or 1) // jobs))

    results: list[RunResult] = []
    recorded = recorded_runs(study)
    recorded_teacher_top1 = study.get("teacher_top1")
    pending = []
    for row in sorted(rows, key=LONGEST_FIRST.index):
        for seed in seeds:
            result = finished_or_recorded(row, seed, prepare_run_folder(train.folder(run_name(row, seed))), recorded)
            if result is None:
                pending.append((row, seed))
            else:
                results.append(result)
    total = len(rows) * len(seeds)
    echo(f"{total} runs ({len(rows)} rows x {len(seeds)} seeds), {len(results)} already finished; "
         f"{min(jobs, max(1, len(pending)))} at a time; logs in {output / 'logs'}")

    teacher_top1 = None
    if any(row != BASELINE for row in rows):
        # The evaluation is written before the export: a teacher stopped in between has no weights to give.
        teacher = prepare_run_folder(train.folder("teacher"), required=[TEACHER_WEIGHTS])
        if teacher is None:
            echo(f"training the teacher ({args.teacher_epochs} epochs)")
            teacher, minutes, error = train("teacher", [
                "--model", "resnet10t", "--model-kwargs", "{}", "--teacher", "", "--distiller", "vanilla",
                "--epochs", str(args.teacher_epochs), *shlex.split(args.teacher_args)])
            if error:
                echo(f"the teacher failed ({error}); its log: {train.log('teacher')}")
                return 1
            echo(f"teacher: top-1 {teacher['eval_top1']:.2f} ({minutes:.1f} min)")
        teacher_top1 = teacher["eval_top1"]
        if recorded_teacher_top1 is not None and teacher_top1 != recorded_teacher_top1:
            echo(f"warning: this teacher reaches top-1 {teacher_top1:.2f}, the recorded runs' teacher "
                 f"{recorded_teacher_top1:.2f}: the new rows learn from another teacher than the recorded ones")
    weights = str(train.folder("teacher") / TEACHER_WEIGHTS)

    shared = student_flags(args)
    progress = Progress(pending, results, total, min(jobs, max(1, len(pending))), echo)

    def run_one(row: str, seed: int) -> RunResult:
        teacher_flags = [] if row == BASELINE else ["--teacher-pretrained", weights]
        metrics, minutes, error = train(run_name(row, seed),
                                        [*teacher_flags, *ROWS[row][1], "--seed", str(seed), *shared])
        if error:
            return RunResult(row, seed, minutes=minutes,
                             error=f"{error}; log: {train.log(run_name(row, seed))}")
        return result_of(row, seed, metrics, minutes)

    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_one, row, seed) for row, seed in pending]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            progress.finished(result)
            # Kept after every run, so that a resumed study still knows the minutes of the runs it keeps.
            write_results(output, settings, results, rows, teacher_top1, jobs)

    echo(write_results(output, settings, results, rows, teacher_top1, jobs))
    failed = [r for r in results if r.error]
    if failed:
        echo(f"{len(failed)} of {total} runs failed: " + ", ".join(f"{r.row} seed {r.seed}" for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
