"""Which timm families export to ONNX (fp32 and int8) and pass the export check: one line per family.

    OMP_NUM_THREADS=1 python benchmarks/export_coverage.py [--families levit,swin_transformer] [--output FILE.md]
        [--max-memory-gb 6] [--jobs 2]

The families, their smallest variants (random weights, narrow kwargs where even that is huge) and their input
sizes are family_coverage.py's. Each is exported as pat-hf exports a student (a timm folder with config.json),
then `pat_hf.export.onnx.export_student_onnx` writes model.onnx and model_int8.onnx (static QDQ, calibrated on
digits images) and checks both against PyTorch on other digits images, resized to the family's input and
normalised with its mean and std. Random weights give meaningless accuracies, so only the checks count: fp32
within 1e-4 of the logit range, int8 agreeing with PyTorch's top-1 on at least 90% of the images. Each family
runs in a child process, stopped above --max-memory-gb (some exports take tens of GB) or after 3 x --timeout;
--jobs children run side by side (the table is a check, not a timing: the seconds per family are wall times).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.family_coverage import SIZES, escape, one_line, prepare_family, time_limit  # noqa: E402
from benchmarks.reporting import describe_machine, write_report  # noqa: E402
from pat_hf.export.card import ModelCardInfo  # noqa: E402
from pat_hf.export.onnx import OnnxCheckError, OnnxExportResult, QuantizationError, export_student_onnx  # noqa: E402
from pat_hf.export.student import export_student  # noqa: E402
from pat_hf.models.factory import exported_model_kwargs  # noqa: E402

CHECK_IMAGES = 64
CALIBRATION_IMAGES = 64
BATCH_SIZE = 32
ROW_MARKER = "export-coverage-row: "
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "export_coverage_cpu.md"


@dataclass
class Row:
    family: str
    variant: str = "-"
    fp32: str = ""  # "passes (...)" or why not
    int8: str = ""
    seconds: float = 0.0

    @property
    def fp32_passes(self) -> bool:
        return self.fp32.startswith("passes")

    @property
    def int8_passes(self) -> bool:
        return self.int8.startswith("passes")


def digits_images(start: int, count: int, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """Digits images as RGB at `size`, normalised as the model expects."""
    images = torch.tensor(load_digits().images[start:start + count], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    images = F.interpolate(images / 16, size=size, mode="bilinear")
    return (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def ensure_nonzero_classifier(model: nn.Module) -> None:
    """Some families (Mixer, ResMLP, ...) start with a zero classifier: all logits 0 would make the checks vacuous."""
    weight = getattr(model.get_classifier(), "weight", None)
    if weight is not None and not weight.detach().abs().sum():
        torch.manual_seed(0)
        nn.init.normal_(weight, std=0.5)


def describe(result: OnnxExportResult) -> tuple[str, str]:
    fp32, int8 = result.fp32, result.int8
    fp32_text = f"{'passes' if fp32.passed else 'fails'} (max diff {fp32.max_abs_diff:.1e}, logit range " \
                f"{fp32.logit_range:.3g})"
    if int8 is None:  # exported without --int8
        return fp32_text, "not exported"
    int8_text = f"{'passes' if int8.passed else 'fails'} (top-1 agreement {int8.top1_agreement:.0%}, " \
                f"{int8.size_bytes / max(fp32.size_bytes, 1):.0%} of the fp32 size)"
    if result.quantization.get("shape_inference"):
        int8_text += "; after ONNX's shape inference (ONNX Runtime's symbolic one failed)"
    return fp32_text, int8_text


def run_family(module: str, sizes: tuple[int, ...], timeout: float, workdir: Path) -> Row:
    row = Row(module)
    family = prepare_family(module, sizes, timeout)
    if family.error:
        row.fp32 = row.int8 = f"not built: {family.error}"
        return row
    row.variant = f"{family.variant} ({family.params / 1e6:.1f} M, {family.size} px)" + \
        (f" {family.kwargs}" if family.kwargs else "")
    model = family.model
    family.model = None
    ensure_nonzero_classifier(model)
    data_config = timm.data.resolve_data_config({}, model=model)
    data_config["input_size"] = (3, family.size, family.size)
    folder = workdir / module / "student"
    card = ModelCardInfo(student=family.variant, teacher="", teacher_weights="", distiller="kd", dataset="digits")
    mean, std = data_config["mean"], data_config["std"]
    batches = [(images, None) for images in
               digits_images(0, CHECK_IMAGES, family.size, mean, std).split(BATCH_SIZE)]
    calibration = digits_images(1000, CALIBRATION_IMAGES, family.size, mean, std)
    try:
        with time_limit(timeout):
            export_student(model, folder, model_kwargs=exported_model_kwargs(model, family.kwargs, family.size),
                           data_config=data_config, class_names=None, card=card)
            result = export_student_onnx(folder, batches, int8=True, calibration=calibration)
        row.fp32, row.int8 = describe(result)
    except OnnxCheckError as error:
        row.fp32, row.int8 = describe(error.result)
    except QuantizationError as error:
        row.int8 = f"fails: {one_line(error)}"
        try:  # the fp32 export was fine: check it alone
            with time_limit(timeout):
                row.fp32 = describe(export_student_onnx(folder, batches))[0]
        except OnnxCheckError as check_error:
            row.fp32 = describe(check_error.result)[0]
        except Exception as fp32_error:  # e.g. ONNX Runtime cannot load the exported graph at all
            row.fp32 = f"fails: {one_line(fp32_error)}"
    except Exception as error:
        row.fp32 = row.int8 = f"fails: {one_line(error)}"
    return row


def markdown(rows: list[Row], minutes: float, threads: int, jobs: int = 1) -> str:
    fp32 = sum(r.fp32_passes for r in rows)
    int8 = sum(r.int8_passes for r in rows)
    both = sum(r.fp32_passes and r.int8_passes for r in rows)
    lines = [
        "# ONNX export coverage of timm families",
        "",
        f"timm {timm.__version__}, torch {torch.__version__}, {describe_machine('cpu')}, {threads} torch "
        f"thread(s), {jobs} famil{'y' if jobs == 1 else 'ies'} at a time; {len(rows)} of timm's "
        f"{len(timm.list_modules())} families (family_coverage.py's smallest variants, random weights); checks on "
        f"{CHECK_IMAGES} digits images, int8 calibrated on {CALIBRATION_IMAGES} others; {minutes:.1f} min.",
        "",
        f"**fp32 ONNX passes its check for {fp32} of {len(rows)} families, int8 for {int8} of {len(rows)}; "
        f"both for {both}.** fp32 passes when max |ONNX Runtime - PyTorch| <= 1e-4 × the logit range; int8 "
        f"when its top-1 agrees with PyTorch's on at least 90% of the images.",
        "",
        "| family | variant (params, input) | fp32 | int8 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.family} | {escape(r.variant)} | {escape(r.fp32)} | {escape(r.int8)} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_isolated(module: str, args: argparse.Namespace, workdir: Path) -> Row:
    """One family in a child process: a family whose export exhausts the memory, or crashes the interpreter,
    becomes a failed row instead of the end of the run (or of the machine's other work)."""
    command = [sys.executable, __file__, "--worker", module, "--workdir", str(workdir), "--timeout",
               str(args.timeout), "--threads", str(args.threads)]
    limit = args.max_memory_gb * 2**30
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.DEVNULL, text=True)
        process, peak, start = psutil.Process(child.pid), 0, time.perf_counter()
        while child.poll() is None:
            with contextlib.suppress(psutil.Error):  # the child may end between two looks
                peak = max(peak, process.memory_info().rss)
            if peak > limit or time.perf_counter() - start > 3 * args.timeout:
                child.kill()
                child.wait()
                reason = f"used more than {args.max_memory_gb:g} GB of memory" if peak > limit else "timed out"
                return Row(module, fp32=f"fails: {reason}", int8=f"fails: {reason}")
            time.sleep(0.2)
        output.seek(0)
        line = next((line for line in output.read().splitlines() if line.startswith(ROW_MARKER)), None)
    if line is None:
        return Row(module, fp32=f"fails: the process ended with status {child.returncode}",
                   int8=f"fails: the process ended with status {child.returncode}")
    return Row(**json.loads(line.removeprefix(ROW_MARKER)))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="", help="comma-separated timm modules (default: all)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the Markdown report")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per family's build and per export")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--max-memory-gb", type=float, default=6, help="stop a family's export above this memory")
    parser.add_argument("--jobs", type=int, default=1, help="families exported side by side, each in its process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one family, in a child process
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.worker:
        try:
            row = run_family(args.worker, SIZES, args.timeout, args.workdir)
        except Exception as error:  # a family whose build itself breaks is a row, not the end of the run
            row = Row(args.worker, fp32=f"fails: {one_line(error)}", int8=f"fails: {one_line(error)}")
        print(ROW_MARKER + json.dumps(dataclasses.asdict(row)), flush=True)
        return ""
    modules = args.families.split(",") if args.families else timm.list_modules()
    unknown = sorted(set(modules) - set(timm.list_modules()))
    if unknown:
        parser.error(f"not timm modules: {', '.join(unknown)}; see timm.list_modules()")
    start = time.perf_counter()
    finished: dict[str, Row] = {}

    def report() -> str:
        rows = [finished[module] for module in modules if module in finished]  # timm's order, whatever finished
        return markdown(rows, (time.perf_counter() - start) / 60, args.threads, args.jobs)

    def timed(module: str, workdir: Path) -> Row:
        family_start = time.perf_counter()
        row = run_isolated(module, args, workdir)
        row.seconds = time.perf_counter() - family_start
        return row

    with tempfile.TemporaryDirectory(prefix="export-coverage-") as workdir, ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(timed, module, Path(workdir)): module for module in modules}
        for future in as_completed(futures):
            row = finished[futures[future]] = future.result()
            print(f"[{len(finished)}/{len(modules)}] {row.family}: {row.variant}: fp32 {row.fp32}; int8 {row.int8} "
                  f"({row.seconds:.0f} s)", flush=True)
            # Rewritten after every family: a long run that is stopped still leaves its table.
            write_report(args.output, report())
    return report()

if __name__ == "__main__":
    main()
