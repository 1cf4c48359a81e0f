"""What a student saves against its teacher on the CPU: the model card's cost table for the step-time pairs.

    OMP_NUM_THREADS=1 python benchmarks/deployment_cost.py [--pairs convnext-deit swin-resnet ...] [--threads 1]
        [--runs 10] [--output benchmarks/results/deployment_cost_cpu.md]

For each pair of benchmarks/step_time.py (random weights: latency and size do not depend on them), the
teacher and the student are measured alike by `pat_hf.export.cost.measure_costs`, the function that writes
every export's cost.json and its card's table: parameters, GMACs per image (torch's FlopCounterMode), and CPU
latency at batch 1 and batch 32 (the median of --runs forward passes in inference mode after 3 warm-up passes,
--threads torch threads). Run it alone on the machine: latency is wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reporting import describe_machine, write_report  # noqa: E402
from benchmarks.step_time import PAIRS, create_pair_models  # noqa: E402
from pat_hf.export.cost import cost_table, measure_costs  # noqa: E402

DEFAULT_PAIRS = ("convnext-deit", "swin-resnet", "convnext-deit-narrow", "swin-resnet-narrow")
NUM_CLASSES = 1000


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(DEFAULT_PAIRS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every measurement")
    parser.add_argument("--runs", type=int, default=10, help="timed forward passes per latency (median)")
    parser.add_argument("--output", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sections = []
    for name in args.pairs:
        pair = PAIRS[name]
        student, teacher = create_pair_models(pair, NUM_CLASSES)
        size = (3, pair.img_size, pair.img_size)
        cost = measure_costs(student.eval(), teacher, size, student_name=pair.student, teacher_name=pair.teacher,
                             runs=args.runs, threads=args.threads)
        kwargs = ", ".join(f"{role} {given}" for role, given in (("teacher", pair.teacher_kwargs),
                                                                   ("student", pair.student_kwargs)) if given)
        sections.append(f"#### {pair.label}{f' ({kwargs})' if kwargs else ''}\n\n{cost_table(cost)}")
        print(f"{pair.label}: speed-up {cost['speedup']}", file=sys.stderr, flush=True)
    report = "\n\n".join([
        f"### Student vs teacher on {describe_machine('cpu')}",
        f"Random weights, {NUM_CLASSES} classes; `python benchmarks/deployment_cost.py --threads {args.threads} "
        f"--runs {args.runs}`, torch {torch.__version__}; {(time.perf_counter() - start) / 60:.1f} min. Top-1 "
        "and size on disk are left empty: these models are untrained and not saved.", *sections]) + "\n"
    if args.output:
        write_report(args.output, report)
    print(report)
    return report


if __name__ == "__main__":
    main()
