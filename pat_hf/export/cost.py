"""Cost facts of a model and of a student against its teacher: parameters, size on disk, GMACs, CPU latency.

    cost = measure_costs(student, teacher, (3, 32, 32), student_weights="student/model.safetensors",
                         student_top1=97.2, teacher_top1=98.1, threads=1)
    write_cost("student", cost)   # student/cost.json
    print(cost_table(cost))       # the teacher-vs-student Markdown table of the model card

GMACs come from torch's own `FlopCounterMode`: it runs the model once and counts the FLOPs of the operators that
carry nearly all of a vision model's compute (convolutions, matrix products, attention), whatever the
architecture (no tracing, so no model is refused, unlike fvcore's jit-based counter), and needs no extra package.
A multiply-accumulate is two FLOPs. Element-wise operators (activations, norms, additions) are not counted, the
convention of fvcore and of published GMAC figures.

Latency is CPU wall time of one forward pass in inference mode, the median of `runs` timed passes after `warmup`
untimed ones; the result names the torch thread count and the CPU, without which a latency means little.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pat_hf.training.atomic import write_text_atomically

COST_FILE = "cost.json"
DEFAULT_BATCH_SIZES = (1, 32)
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _on_cpu_in_eval(model: nn.Module) -> Iterator[nn.Module]:
    """The model on the CPU in eval mode for the block, then back on its device and in its mode."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.to("cpu").eval()
    try:
        yield model
    finally:
        model.to(device).train(was_training)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def gmacs(model: nn.Module, input_size: Sequence[int]) -> float:
    """Multiply-accumulates of one forward pass of one image of `input_size` (C, H, W), in billions."""
    with _on_cpu_in_eval(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 2 / 1e9


def cpu_latency_ms(model: nn.Module, input_size: Sequence[int], batch_size: int, *, runs: int = DEFAULT_RUNS,
                   warmup: int = DEFAULT_WARMUP, threads: int | None = None) -> float:
    """Median CPU time of one forward pass of a batch, in milliseconds."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"latency needs at least 1 timed run and no negative warm-up, got {runs} and {warmup}")
    images = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))
    times = []
    with _on_cpu_in_eval(model), _torch_threads(threads), torch.inference_mode():
        for run in range(warmup + runs):
            start = time.perf_counter()
            model(images)
            if run >= warmup:  # the first passes pay for allocations and kernel selection
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def model_cost(model: nn.Module, input_size: Sequence[int], *, name: str | None = None,
               weights_file: str | os.PathLike | None = None, top1: float | None = None,
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, runs: int = DEFAULT_RUNS,
               warmup: int = DEFAULT_WARMUP, threads: int | None = None) -> dict[str, Any]:
    """The cost facts of one model: {"model", "top1", "params", "size_bytes", "gmacs", "input_size",
    "latency_ms": {"batch_1": ..., "batch_32": ...}}; `size_bytes` is None without a weights file."""
    if name is None:
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return {
        "model": name,
        "top1": top1,
        "params": count_parameters(model),
        "size_bytes": os.path.getsize(weights_file) if weights_file is not None else None,
        "gmacs": gmacs(model, input_size),
        "input_size": list(input_size),
        "latency_ms": {f"batch_{size}": cpu_latency_ms(model, input_size, size, runs=runs, warmup=warmup,
                                                       threads=threads) for size in batch_sizes},
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def measure_costs(student: nn.Module, teacher: nn.Module, input_size: Sequence[int], *,
                  teacher_input_size: Sequence[int] | None = None, student_name: str | None = None,
                  teacher_name: str | None = None, student_weights: str | os.PathLike | None = None,
                  teacher_weights: str | os.PathLike | None = None, student_top1: float | None = None,
                  teacher_top1: float | None = None, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                  runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                  threads: int | None = None) -> dict[str, Any]:
    """The student's and the teacher's cost facts, measured alike, and how much the student saves: the content
    of `cost.json`. `speedup` is teacher latency / student latency per batch size; `params_ratio` and
    `gmacs_ratio` are teacher / student (above 1: the student is smaller)."""
    measure = {"batch_sizes": batch_sizes, "runs": runs, "warmup": warmup, "threads": threads}
    student_cost = model_cost(student, input_size, name=student_name, weights_file=student_weights,
                              top1=student_top1, **measure)
    teacher_cost = model_cost(teacher, teacher_input_size or input_size, name=teacher_name,
                              weights_file=teacher_weights, top1=teacher_top1, **measure)
    return {
        "student": student_cost,
        "teacher": teacher_cost,
        "speedup": {key: _ratio(teacher_cost["latency_ms"][key], value)
                    for key, value in student_cost["latency_ms"].items()},
        "params_ratio": _ratio(teacher_cost["params"], student_cost["params"]),
        "gmacs_ratio": _ratio(teacher_cost["gmacs"], student_cost["gmacs"]),
        "top1_change": None if student_top1 is None or teacher_top1 is None else student_top1 - teacher_top1,
        "latency": {"device": "cpu", "cpu": cpu_name(), "torch_threads": threads or torch.get_num_threads(),
                    "runs": runs, "warmup": warmup, "statistic": "median"},
    }


def _number(value: float | None, unit: str = "", digits: str = ".3g") -> str:
    return "" if value is None else f"{value:{digits}}{unit}"


def cost_table(cost: dict[str, Any]) -> str:
    """The teacher-vs-student Markdown table of a `measure_costs` result, with a line saying how latency was
    measured. Its last column is what the student saves (teacher ÷ student: above 1 it is smaller or faster),
    and the change in top-1."""
    student, teacher = cost["student"], cost["teacher"]
    megabytes = [None if c["size_bytes"] is None else c["size_bytes"] / 1e6 for c in (teacher, student)]
    rows = [
        ("top-1 (%)", _number(teacher["top1"], digits=".2f"), _number(student["top1"], digits=".2f"),
         _number(cost["top1_change"], " points (student − teacher)", "+.2f")),
        ("parameters (M)", _number(teacher["params"] / 1e6), _number(student["params"] / 1e6),
         _number(cost["params_ratio"], "×")),
        ("size on disk (MB)", _number(megabytes[0]), _number(megabytes[1]),
         _number(_ratio(*megabytes), "×")),
        ("GMACs per image", _number(teacher["gmacs"]), _number(student["gmacs"]),
         _number(cost["gmacs_ratio"], "×")),
    ]
    for key, value in student["latency_ms"].items():
        rows.append((f"CPU latency, batch {key.removeprefix('batch_')} (ms)",
                     _number(teacher["latency_ms"].get(key)), _number(value),
                     _number(cost["speedup"][key], "×")))
    lines = [f"| | teacher `{teacher['model']}` | student `{student['model']}` | teacher ÷ student |",
             "|---|---|---|---|", *(f"| {' | '.join(row)} |" for row in rows)]
    latency = cost["latency"]
    size = "×".join(map(str, student["input_size"]))
    lines += ["", f"Latency: median of {latency['runs']} forward passes after {latency['warmup']} warm-up passes, "
                  f"{latency['cpu']}, {latency['torch_threads']} torch thread(s), input {size}."]
    return "\n".join(lines)


def write_cost(folder: str | os.PathLike, cost: dict[str, Any]) -> Path:
    """Write `cost` as FOLDER/cost.json in one step (a reader never sees half of it)."""
    path = Path(folder) / COST_FILE
    write_text_atomically(path, json.dumps(cost, indent=2) + "\n")
    return path


def add_cost_to_results(output_dir: str | os.PathLike, cost: dict[str, Any]) -> None:
    """The headline ratios of `cost` in the run's all_results.json (`cost_*` keys), beside its metrics."""
    flat = {f"cost_speedup_{key}": value for key, value in cost["speedup"].items()}
    flat |= {"cost_params_ratio": cost["params_ratio"], "cost_gmacs_ratio": cost["gmacs_ratio"],
             "cost_teacher_top1": cost["teacher"]["top1"], "cost_student_params": cost["student"]["params"],
             "cost_student_gmacs": cost["student"]["gmacs"]}
    path = Path(output_dir) / "all_results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    write_text_atomically(path, json.dumps({**results, **flat}, indent=4, sort_keys=True) + "\n")
