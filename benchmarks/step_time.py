"""Training-step time of distillers against the floor their teacher and student set.

    python benchmarks/step_time.py                     # narrow pairs on the CPU, ConvNeXt-T -> DeiT-T and
                                                       # Swin-T -> ResNet-18 on a GPU
    python benchmarks/step_time.py --device cuda --batch-size 128 --precision bf16 --channels-last \
        --output benchmarks/results/gpu_h100.md

Every step goes through the code path training uses: the distiller inside the model accelerate prepares
(`Accelerator(mixed_precision=...)`, so fp16 brings accelerate's GradScaler), the trainer's timm optimizer
over the distiller, `accelerator.backward`, the optimizer step and zero_grad, on one fixed random batch.
The same run measures the floor: the student's own step (the `vanilla` distiller), the teacher's forward
without gradients, and the teacher's forward+backward to its input. A distiller's ratio is its step over
the floor it cannot go below:
  * PAT: student step + teacher no-grad forward (unprompted logits) + teacher forward+backward (the
    prompted pass, whose gradient reaches the prompts);
  * every other distiller with a teacher: student step + teacher no-grad forward (logit distillers need the
    logits, feature distillers the stage features of the same forward); what their own modules cost is
    overhead above that floor;
  * vanilla: its own step.
The median of the timed steps is reported; CUDA is synchronised around each timed step only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import TorchDynamoPlugin  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.reporting import describe_machine, write_report  # noqa: E402
from pat_hf.config.arguments import RecipeArguments  # noqa: E402
from pat_hf.distillers import DistillArguments, DistillContext, Distiller, get_distiller_class  # noqa: E402
from pat_hf.models.factory import create_model  # noqa: E402
from pat_hf.training.host_memory import keep_freed_host_memory  # noqa: E402
from pat_hf.training.schedule import create_timm_optimizer  # noqa: E402

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
STUDENT_STEP, TEACHER_FORWARD, TEACHER_BACKWARD = "student step", "teacher no-grad forward", "teacher fwd+bwd"
FLOOR_PARTS = {
    "vanilla": (STUDENT_STEP,),
    "pat": (STUDENT_STEP, TEACHER_FORWARD, TEACHER_BACKWARD),
}
DEFAULT_FLOOR_PARTS = (STUDENT_STEP, TEACHER_FORWARD)
FLOOR_LEGEND = "; ".join([*(f"{name}: {' + '.join(parts)}" for name, parts in FLOOR_PARTS.items()),
                          f"the others: {' + '.join(DEFAULT_FLOOR_PARTS)}"])


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair; models whose kwargs name `img_size` are rebuilt for --img-size."""

    teacher: str
    student: str
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    # Hyper-parameters that the pair's size needs (PAT's region attention must fit a 32x32 student).
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.teacher} → {self.student}"

    def resized(self, img_size: int | None) -> Pair:
        if img_size is None or img_size == self.img_size:
            return self

        def sized(kwargs: dict[str, Any]) -> dict[str, Any]:
            return {**kwargs, "img_size": img_size} if "img_size" in kwargs else kwargs

        return dataclasses.replace(self, teacher_kwargs=sized(self.teacher_kwargs),
                                   student_kwargs=sized(self.student_kwargs), img_size=img_size)


PAIRS = {
    "convnext-deit": Pair("convnext_tiny", "deit_tiny_patch16_224", student_kwargs={"img_size": 224}),
    "swin-resnet": Pair("swin_tiny_patch4_window7_224", "resnet18", teacher_kwargs={"img_size": 224}),
    # The narrow variants of the parity fixtures' pairs: same classes and depths, fewer channels.
    "convnext-deit-narrow": Pair("convnext_tiny", "deit_tiny_patch16_224", {"dims": (32, 64, 128, 256)},
                                 {"img_size": 224, "embed_dim": 48, "num_heads": 3}),
    "swin-resnet-narrow": Pair("swin_tiny_patch4_window7_224", "resnet18",
                               {"img_size": 224, "embed_dim": 32, "drop_path_rate": 0.0}, {"layers": (1, 1, 1, 1)}),
    # timm's test models at 32x32: seconds per run, for smoke tests.
    "tiny": Pair("test_convnext", "test_vit", {}, {"img_size": 32, "patch_size": 4}, img_size=32,
                 hparams={"pat_raa_dim": 32, "pat_raa_num_queries": 16}),
}
GPU_PAIRS = ("convnext-deit", "swin-resnet")
CPU_PAIRS = ("convnext-deit-narrow", "swin-resnet-narrow")


@dataclass(frozen=True)
class Settings:
    device: str
    batch_size: int
    precision: str
    channels_last: bool
    compile: bool
    warmup_steps: int
    timed_steps: int
    num_classes: int
    opt: str
    lr: float
    weight_decay: float
    hparams: dict[str, Any]
    rounds: int = 1
    profile_steps: int = 0

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        layout = ", channels-last" if self.channels_last else ""
        compiled = ", torch.compile" if self.compile else ""
        return (f"batch {self.batch_size}, {self.precision}{layout}{compiled}, {self.num_classes} classes, "
                f"timm {self.opt}, median of {self.rounds} × {self.timed_steps} steps (rounds of every row in turn, "
                f"each after {self.warmup_steps} warm-up)")


@dataclass
class Measurement:
    """One measured row: a distiller's step or a floor component, over one or more rounds."""

    name: str
    durations: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    extra_params: int | None = None
    error: str | None = None

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.durations) if self.durations else None

    def merge(self, other: Measurement) -> None:
        """Take in another round's measurement of the same row."""
        self.durations += other.durations
        peaks = [p for p in (self.peak_memory_bytes, other.peak_memory_bytes) if p is not None]
        self.peak_memory_bytes = max(peaks) if peaks else None
        self.error = self.error or other.error


# ---- building what training builds ----


def distiller_hparams(cls: type[Distiller], overrides: dict[str, Any]) -> Any:
    """The distiller's own hyper-parameter dataclass at its defaults, with those of `overrides` it has."""
    if cls.Arguments is None:
        return None
    names = {f.name for f in dataclasses.fields(cls.Arguments) if f.init}
    return cls.Arguments(**{k: v for k, v in overrides.items() if k in names})


def build_distiller(name: str, student: nn.Module, teacher: nn.Module, pair: Pair, settings: Settings,
                    train_labels: torch.Tensor) -> Distiller:
    """As pat_hf.cli.train builds it (plain cross-entropy: no mixup or label smoothing here)."""
    cls = get_distiller_class(name)
    context = DistillContext(input_size=(3, pair.img_size, pair.img_size), num_classes=settings.num_classes,
                             train_labels=train_labels)
    hparams = distiller_hparams(cls, {**pair.hparams, **settings.hparams})
    return cls(student, teacher, DistillArguments(distiller=name), hparams, context)


def create_training_optimizer(distiller: Distiller, settings: Settings) -> torch.optim.Optimizer:
    """The optimizer DistillationTrainer.create_optimizer builds, through the same function."""
    return create_timm_optimizer(distiller, RecipeArguments(opt=settings.opt), settings.lr, settings.weight_decay)


def create_pair_models(pair: Pair, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """A random-init student and a frozen teacher in eval mode (weights do not change the step time)."""
    torch.manual_seed(0)
    teacher = create_model(pair.teacher, num_classes, pair.teacher_kwargs).requires_grad_(False).eval()
    student = create_model(pair.student, num_classes, pair.student_kwargs)
    return student, teacher


def make_accelerator(settings: Settings) -> Accelerator:
    return Accelerator(mixed_precision=PRECISIONS[settings.precision], cpu=not settings.on_cuda)


def compiled(module: nn.Module, settings: Settings) -> nn.Module:
    """`module` as accelerate's prepare compiles it under --torch_compile (inductor, the Trainer's default),
    done here rather than through the Accelerator's dynamo plugin, which the process's accelerate state fixes
    once: with --compile both, eager and compiled rows share one Accelerator."""
    if not settings.compile:
        return module
    # A fresh cache per row: every distiller's forward is the same code object, which dynamo recompiles for
    # each new instance only up to its recompile limit before it silently runs eager.
    torch._dynamo.reset()
    return torch.compile(module, **TorchDynamoPlugin(backend="inductor").to_kwargs())


# ---- timing ----


def time_steps(step: Callable[[], None], settings: Settings) -> list[float]:
    """Seconds of each timed step after the warm-up steps; CUDA is synchronised around the timed ones only."""
    for _ in range(settings.warmup_steps):
        step()
    durations = []
    for _ in range(settings.timed_steps):
        if settings.on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if settings.on_cuda:
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    return durations


@contextlib.contextmanager
def measuring(measurement: Measurement, settings: Settings, accelerator: Accelerator) -> Iterator[None]:
    """Track the peak CUDA memory of what runs inside. A failure (out of memory, a distiller that cannot
    handle the pair) becomes the row's error, so that one failing row leaves the others measured."""
    gc.collect()  # what the previous row left behind
    if settings.on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    except Exception as error:  # noqa: BLE001  (any failure is reported in the table)
        first_line = next(iter(str(error).splitlines()), "")[:160]
        measurement.error = f"{type(error).__name__}: {first_line}"
    finally:
        accelerator.free_memory()
    if settings.on_cuda:
        measurement.peak_memory_bytes = torch.cuda.max_memory_allocated()


def random_batch(settings: Settings, img_size: int, device: torch.device, num_examples: int,
                 with_index: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(settings.batch_size, 3, img_size, img_size, generator=generator)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = {"pixel_values": images,
             "labels": torch.randint(0, settings.num_classes, (settings.batch_size,), generator=generator)}
    if with_index:
        batch["index"] = torch.randint(0, num_examples, (settings.batch_size,), generator=generator)
    return {k: v.to(device) for k, v in batch.items()}


def measure_distiller(name: str, pair: Pair, settings: Settings, accelerator: Accelerator,
                      profile: bool = False) -> Measurement:
    """Training-step times of `name` on `pair`, through accelerate's prepared model and optimizer; with
    `profile`, a profile of settings.profile_steps more steps is printed."""
    measurement = Measurement(name)
    with measuring(measurement, settings, accelerator):
        student, teacher = create_pair_models(pair, settings.num_classes)
        # CRD draws negatives among the other classes' examples: a dataset of 10 examples per class.
        train_labels = torch.arange(settings.num_classes).repeat_interleave(10)
        distiller = build_distiller(name, student, teacher, pair, settings, train_labels)
        if settings.channels_last:
            distiller.to(memory_format=torch.channels_last)
        measurement.extra_params = sum(p.numel() for p in distiller.extra_parameters())
        optimizer = create_training_optimizer(distiller, settings)
        model, optimizer = accelerator.prepare(distiller, optimizer)
        model = compiled(model, settings)
        model.train()
        batch = random_batch(settings, pair.img_size, accelerator.device, len(train_labels),
                             "index" in type(distiller).batch_keys)

        def step() -> None:
            outputs = model(**batch)
            accelerator.backward(outputs["loss"])
            optimizer.step()
            optimizer.zero_grad()

        measurement.durations = time_steps(step, settings)
        if profile and settings.profile_steps:
            print_profile(f"{pair.label}: {name}", step, distiller, settings)
    return measurement


def measure_teacher(pair: Pair, settings: Settings, accelerator: Accelerator) -> list[Measurement]:
    """The teacher's forward without gradients and its forward+backward to the input, under the same
    autocast and memory format as the distillers' steps."""
    _, teacher = create_pair_models(pair, settings.num_classes)
    teacher.to(accelerator.device)
    if settings.channels_last:
        teacher.to(memory_format=torch.channels_last)
    run = compiled(teacher, settings)
    images = random_batch(settings, pair.img_size, accelerator.device, 1, False)["pixel_values"]

    def forward() -> None:
        with torch.no_grad(), accelerator.autocast():
            run(images)

    def forward_backward() -> None:
        leaf = images.detach().requires_grad_(True)
        with accelerator.autocast():
            logits = run(leaf)
        torch.autograd.grad(logits.float().sum(), leaf)

    measurements = []
    for name, step in ((TEACHER_FORWARD, forward), (TEACHER_BACKWARD, forward_backward)):
        measurement = Measurement(name)
        with measuring(measurement, settings, accelerator):
            measurement.durations = time_steps(step, settings)
        measurements.append(measurement)
    return measurements


# ---- profiling ----


@contextlib.contextmanager
def labelled_modules(root: nn.Module, max_depth: int = 3) -> Iterator[None]:
    """Name every submodule's forward (down to `max_depth` dots) as a `module::NAME` profiler range."""
    handles, open_ranges = [], {}

    def enter(name: str) -> Callable:
        def hook(module, args):
            open_ranges.setdefault(name, []).append(torch.profiler.record_function(f"module::{name}").__enter__())
        return hook

    def leave(name: str) -> Callable:
        def hook(module, args, output):
            open_ranges[name].pop().__exit__(None, None, None)
        return hook

    for name, module in root.named_modules():
        if name and name.count(".") < max_depth:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def print_profile(title: str, step: Callable[[], None], distiller: Distiller, settings: Settings,
                  rows: int = 20) -> None:
    """Top operators by self CPU time and the distiller's submodules by total forward CPU time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if settings.on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with labelled_modules(distiller), torch.profiler.profile(activities=activities) as profile:
        for _ in range(settings.profile_steps):
            step()
    if settings.on_cuda:
        torch.cuda.synchronize()
    events = profile.key_averages()
    per_step = 1e3 * settings.profile_steps  # microseconds summed over the steps -> ms per step
    operators = sorted((e for e in events if not e.key.startswith("module::")),
                       key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    modules = sorted((e for e in events if e.key.startswith("module::")),
                     key=lambda e: e.cpu_time_total, reverse=True)[:rows]
    print(f"\n### Profile of {title} ({settings.profile_steps} steps; ms per step)\n")
    print("| operator | self CPU ms | calls |\n|---|---|---|")
    for event in operators:
        print(f"| {event.key} | {event.self_cpu_time_total / per_step:.1f} | {event.count // settings.profile_steps} |")
    print("\n| module forward | total CPU ms | calls |\n|---|---|---|")
    for event in modules:
        print(f"| {event.key.removeprefix('module::')} | {event.cpu_time_total / per_step:.1f} "
              f"| {event.count // settings.profile_steps} |")


# ---- the table ----


def floor_parts(distiller: str) -> tuple[str, ...]:
    """The components of `distiller`'s floor (see the module docstring)."""
    return FLOOR_PARTS.get(distiller, DEFAULT_FLOOR_PARTS)


def floor_seconds(distiller: str, components: dict[str, float | None]) -> float | None:
    """The sum of the floor's components, None when one of them was not measured."""
    parts = [components.get(part) for part in floor_parts(distiller)]
    return None if any(p is None for p in parts) else sum(parts)


def format_ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def format_gib(size: int | None) -> str:
    return "–" if size is None else f"{size / 2**30:.2f} GiB"


def pair_table(pair_label: str, batch_size: int, floors: list[Measurement], rows: list[Measurement]) -> str:
    """Markdown: the floor components, then one row per distiller with its ratio to its floor."""
    components = {m.name: m.seconds for m in floors}
    lines = [f"#### {pair_label}", "",
             "| component | time | peak memory |", "|---|---|---|"]
    for m in floors:
        lines.append(f"| {m.name} | {m.error or format_ms(m.seconds)} | {format_gib(m.peak_memory_bytes)} |")
    lines += ["", "| distiller | step | images/s | peak memory | extra params | floor | ratio to floor |",
              "|---|---|---|---|---|---|---|"]
    for m in rows:
        if m.error:
            lines.append(f"| {m.name} | {m.error} | – | {format_gib(m.peak_memory_bytes)} | – | – | – |")
            continue
        floor = floor_seconds(m.name, components)
        ratio = "–" if floor is None or m.seconds is None else f"{m.seconds / floor:.2f}×"
        extra = "–" if m.extra_params is None else f"{m.extra_params:,}"
        lines.append(f"| {m.name} | {format_ms(m.seconds)} | {batch_size / m.seconds:,.1f} "
                     f"| {format_gib(m.peak_memory_bytes)} | {extra} | {format_ms(floor)} | {ratio} |")
    return "\n".join(lines)


def measure_round(pair: Pair, distillers: list[str], settings: Settings, accelerator: Accelerator,
                  profile: bool) -> list[Measurement]:
    """Every row once: the student's step (vanilla), the teacher's two passes, then the other distillers."""
    vanilla = measure_distiller("vanilla", pair, settings, accelerator, profile and "vanilla" in distillers)
    student_step = Measurement(STUDENT_STEP, list(vanilla.durations), vanilla.peak_memory_bytes, error=vanilla.error)
    others = [measure_distiller(name, pair, settings, accelerator, profile) for name in distillers if name != "vanilla"]
    return [vanilla, student_step, *measure_teacher(pair, settings, accelerator), *others]


def benchmark_pair(pair: Pair, distillers: list[str], settings: Settings, accelerator: Accelerator) -> str:
    """The pair's table. With several rounds every row is measured once per round, in turn, so that other work
    on a shared machine slows all rows alike rather than whichever ran at the time."""
    rows: dict[str, Measurement] = {}
    for round_index in range(settings.rounds):
        for measurement in measure_round(pair, distillers, settings, accelerator, profile=round_index == 0):
            if measurement.name in rows:
                rows[measurement.name].merge(measurement)
            else:
                rows[measurement.name] = measurement
    for name in distillers:
        print(f"{pair.label}: {name} {rows[name].error or format_ms(rows[name].seconds)}", file=sys.stderr)
    floors = [rows[name] for name in (STUDENT_STEP, TEACHER_FORWARD, TEACHER_BACKWARD)]
    return pair_table(pair.label, settings.batch_size, floors, [rows[name] for name in distillers])


def compare_compiled(pair: Pair, distillers: list[str], settings: Settings, accelerator: Accelerator) -> str:
    """The pair's table eager, its table compiled, then each row's two step times side by side."""
    with_compile = dataclasses.replace(settings, compile=True)
    eager_rows, compiled_rows = {}, {}
    tables = []
    for mode, mode_settings, rows in (("eager", settings, eager_rows), ("compiled", with_compile, compiled_rows)):
        measured: dict[str, Measurement] = {}
        for _ in range(settings.rounds):
            for measurement in measure_round(pair, distillers, mode_settings, accelerator, profile=False):
                if measurement.name in measured:
                    measured[measurement.name].merge(measurement)
                else:
                    measured[measurement.name] = measurement
        rows.update(measured)
        floors = [measured[name] for name in (STUDENT_STEP, TEACHER_FORWARD, TEACHER_BACKWARD)]
        table = pair_table(f"{pair.label}, {mode}", settings.batch_size, floors, [measured[n] for n in distillers])
        tables.append(table)
    lines = [f"#### {pair.label}: eager vs torch.compile", "", "| row | eager | compiled | speed-up |",
             "|---|---|---|---|"]
    for name in [*distillers[:1], *(n for n in (TEACHER_FORWARD, TEACHER_BACKWARD)), *distillers[1:]]:
        e, c = eager_rows[name], compiled_rows[name]
        speedup = "–" if e.seconds is None or c.seconds is None else f"{e.seconds / c.seconds:.2f}×"
        lines.append(f"| {name} | {e.error or format_ms(e.seconds)} | {c.error or format_ms(c.seconds)} | {speedup} |")
        print(f"{pair.label}: {name} eager {format_ms(e.seconds)} compiled {format_ms(c.seconds)}", file=sys.stderr)
    return "\n\n".join(["\n".join(lines), *tables])


def report_header(settings: Settings, pair_sizes: set[int]) -> str:
    sizes = "/".join(f"{s}×{s}" for s in sorted(pair_sizes))
    return (f"### Step time on {describe_machine(settings.device)}\n\n"
            f"{sizes}, {settings.describe()}; torch {torch.__version__}, timm {timm.__version__}, "
            f"{torch.get_num_threads()} CPU threads.\n\nFloor: {FLOOR_LEGEND}. Ratio: step / floor.")


# ---- command line ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=None, help=(
        f"preset pairs (default: {' '.join(GPU_PAIRS)} on a GPU, {' '.join(CPU_PAIRS)} on the CPU)"))
    parser.add_argument("--teacher", help="a custom pair instead of presets: teacher timm name (with --student)")
    parser.add_argument("--student", help="a custom pair: student timm name")
    parser.add_argument("--teacher-kwargs", default="{}", help="JSON kwargs for the custom teacher")
    parser.add_argument("--student-kwargs", default="{}", help="JSON kwargs for the custom student")
    parser.add_argument("--distillers", nargs="+", default=["vanilla", "kd", "pat"],
                        help="distillers to time; vanilla, the student's own step, is always measured")
    parser.add_argument("--distiller-args", default="{}",
                        help="JSON hyper-parameters, given to each distiller that has them, e.g. "
                             "'{\"pat_raa_dim\": 256}'")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on a GPU, 8 on the CPU")
    parser.add_argument("--img-size", type=int, default=None, help="default: the pair's (224; tiny: 32)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="fp16 runs accelerate's GradScaler and needs CUDA")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", nargs="?", const="only", choices=("only", "both"), default=None, help=(
        "torch.compile (inductor) as --torch_compile does; `--compile both`: every pair eager, then compiled, "
        "and a table of the two step times"))
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5 on a GPU, 1 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 15 on a GPU, 3 on the CPU)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every row this many times in turn (steadier on a shared machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--opt", default="sgd", help="timm optimizer name, as --opt of training")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after timing, profile this many steps of each distiller and print the top operators")
    parser.add_argument("--output", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        parser.error("--precision fp16 (with a GradScaler) needs --device cuda; use bf16 on the CPU")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if bool(args.teacher) != bool(args.student):
        parser.error("a custom pair needs both --teacher and --student")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    on_cuda = args.device.startswith("cuda")
    return Settings(device=args.device, batch_size=args.batch_size or (128 if on_cuda else 8),
                    precision=args.precision, channels_last=args.channels_last, compile=args.compile == "only",
                    warmup_steps=args.warmup_steps if args.warmup_steps is not None else (5 if on_cuda else 1),
                    timed_steps=args.steps or (15 if on_cuda else 3), num_classes=args.num_classes, opt=args.opt,
                    lr=1e-3, weight_decay=0.05, hparams=json.loads(args.distiller_args), rounds=args.rounds,
                    profile_steps=args.profile_steps)


def selected_pairs(args: argparse.Namespace) -> list[Pair]:
    if args.teacher:
        pairs = [Pair(args.teacher, args.student, json.loads(args.teacher_kwargs), json.loads(args.student_kwargs))]
    else:
        names = args.pairs or (GPU_PAIRS if args.device.startswith("cuda") else CPU_PAIRS)
        pairs = [PAIRS[name] for name in names]
    return [pair.resized(args.img_size) for pair in pairs]


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the Markdown report and return it."""
    args = parse_args(argv)
    keep_freed_host_memory()  # as pat_hf.cli.train does
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from(args)
    pairs = selected_pairs(args)
    accelerator = make_accelerator(settings)
    header = report_header(settings, {pair.img_size for pair in pairs})
    tables = []
    for pair in pairs:
        if args.compile == "both":
            tables.append(compare_compiled(pair, args.distillers, settings, accelerator))
        else:
            tables.append(benchmark_pair(pair, args.distillers, settings, accelerator))
        report = "\n\n".join([header, *tables]) + "\n"
        if args.output:
            # After every pair, so that a run stopped by a time limit still leaves the pairs it measured.
            write_report(args.output, report)
    print(report)
    return report


if __name__ == "__main__":
    main()
