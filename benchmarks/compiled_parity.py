"""Compiled distillers against the reference: every fixture x distiller of ../shared/golden through torch.compile.

    python benchmarks/compiled_parity.py [--golden DIR] [--backend aot_eager|inductor] [--only PAIR/DISTILLER ...]
        [--output benchmarks/results/compiled_parity_cpu.md]

Each case is `python -m pat_hf.reference.check FIXTURE --distiller NAME --compile BACKEND` in process: two
training forwards and one backward of the compiled distiller, held to the fixtures' own tolerances (losses and
logit sums 1e-4 relative, gradient norms 1e-3). The table gives, per case, the largest relative error among the
losses and among the gradient norms, and whether every quantity is within its tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reporting import describe_machine, write_report  # noqa: E402
from pat_hf.reference.check import recorded_distillers, run_check  # noqa: E402

DEFAULT_GOLDEN = ROOT.parent / "shared" / "golden"


def case_row(fixture: Path, distiller: str, backend: str) -> tuple[str, bool]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    start = time.perf_counter()
    comparisons = run_check(fixture, distiller, backend)
    seconds = time.perf_counter() - start
    losses = [c.relative_error for c in comparisons if not c.name.startswith(("grad_norm", "extra_param"))]
    grads = [c.relative_error for c in comparisons if c.name.startswith("grad_norm")]
    ok = all(c.ok for c in comparisons)
    verdict = "within tolerance" if ok else "MISMATCH: " + ", ".join(c.name for c in comparisons if not c.ok)
    row = (f"| {fixture.stem} | {distiller} | {max(losses):.1e} | {max(grads):.1e} | {verdict} | "
           f"{seconds:.0f} |")
    print(row, flush=True)
    return row, ok


def report(rows: list[str], passed: int, total: int, backend: str, start: float) -> str:
    minutes = (time.perf_counter() - start) / 60
    checked = f"{len(rows)} of {total} cases checked, " if len(rows) < total else ""
    return "\n".join([
        f"# Compiled distillers against the reference fixtures ({backend})", "",
        f"torch {torch.__version__}, {describe_machine('cpu')}, {torch.get_num_threads()} torch thread(s); "
        f"`python benchmarks/compiled_parity.py --backend {backend}`; {minutes:.1f} min.", "",
        f"**{checked}{passed} of {len(rows)} within the fixtures' tolerances** (losses and logit sums 1e-4 "
        "relative, gradient norms 1e-3), compiled with torch.compile as --torch_compile compiles the distiller.", "",
        "| fixture | distiller | max rel. error, losses & logits | max rel. error, gradient norms | verdict | "
        "seconds |",
        "|---|---|---|---|---|---|", *rows, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN, help="folder of the reference fixtures")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (default: aot_eager)")
    parser.add_argument("--only", nargs="+", metavar="PAIR/DISTILLER", help="these cases only, e.g. swin_to_resnet/pat")
    parser.add_argument("--output", type=Path, help="write the Markdown table here")
    args = parser.parse_args(argv)
    fixtures = sorted(args.golden.glob("*.safetensors"))
    if not fixtures:
        parser.error(f"no fixture (*.safetensors) in {args.golden}: pass --golden DIR")
    cases = [(path, name) for path in fixtures for name in recorded_distillers(path)]
    if args.only:
        cases = [(path, name) for path, name in cases if f"{path.stem}/{name}" in args.only]
    # PAT and OFA first (their graphs hold the teacher's stages and, for PAT, prompts and the feedback between
    # steps): a run stopped early has checked what compilation is likeliest to break.
    cases.sort(key=lambda case: case[1] not in ("pat", "ofa"))
    start = time.perf_counter()
    rows, passed = [], 0
    for fixture, distiller in cases:
        row, ok = case_row(fixture, distiller, args.backend)
        rows.append(row)
        passed += ok
        if args.output:  # after every case: a run that is stopped still leaves the cases it checked
            write_report(args.output, report(rows, passed, len(cases), args.backend, start))
    return 0 if passed == len(cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
