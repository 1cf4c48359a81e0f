"""Long runs stay flat: train many small steps and record the resident memory (RSS) every N steps.

A tiny PAT pair on the digits data with everything that could pile up over a run switched on: PAT's feedback,
an EMA of the student, the loss meters and logging every 10 steps, evaluation (metric states) and checkpoints
(with rotation) every 250 steps. Nothing may accumulate: the RSS after warm-up (the first evaluation and
checkpoint) must not grow beyond noise.

    python benchmarks/memory_flat.py                       # 2,000 steps, RSS every 100
    python benchmarks/memory_flat.py --steps 400 --every 50 --report benchmarks/results/memory_flat.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from benchmarks.reporting import describe_machine, write_report  # noqa: E402
from pat_hf.cli import train as pat_train  # noqa: E402

MIB = 2**20
# Growth after warm-up that still counts as noise (allocator and Python object churn).
NOISE_MIB = 24.0


class RecordMemory(TrainerCallback):
    """The process's resident memory every `every` optimizer steps."""

    def __init__(self, every: int):
        self.every = every
        self.rss: dict[int, float] = {}
        self._process = psutil.Process()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.rss[state.global_step] = self._process.memory_info().rss / MIB


@dataclass
class Verdict:
    rss: dict[int, float]
    warm_step: int
    growth_mib: float = field(init=False)
    slope_mib_per_1000: float = field(init=False)

    def __post_init__(self):
        after = {step: mib for step, mib in self.rss.items() if step >= self.warm_step}
        self.growth_mib = max(after.values()) - after[min(after)]
        steps, values = list(after), list(after.values())
        self.slope_mib_per_1000 = 1000 * statistics.linear_regression(steps, values).slope if len(after) > 1 else 0.0

    @property
    def flat(self) -> bool:
        return self.growth_mib <= NOISE_MIB

    def table(self) -> str:
        first = min(self.rss)
        rows = [f"| {step:,} | {mib:.1f} | {mib - self.rss[first]:+.1f} |" for step, mib in sorted(self.rss.items())]
        return "\n".join(["| step | RSS (MiB) | since step " + f"{first:,} |", "|---:|---:|---:|", *rows])

    def summary(self) -> str:
        return (f"after warm-up (step {self.warm_step:,}): largest growth {self.growth_mib:+.1f} MiB, trend "
                f"{self.slope_mib_per_1000:+.2f} MiB per 1,000 steps; noise allowance {NOISE_MIB:.0f} MiB: "
                f"{'flat' if self.flat else 'GROWING'}")


def run_flags(output_dir: Path, teacher: Path, steps: int) -> list[str]:
    checkpoint_every = max(steps // 8, 10)
    return ["--model", "test_vit", "--model-kwargs", '{"img_size": 32, "patch_size": 4}', "--img-size", "32",
            "--teacher", "test_resnet", "--teacher-pretrained", str(teacher), "--distiller", "pat",
            "--pat-raa-dim", "32", "--pat-raa-num-queries", "16", "--dataset", "digits", "--max-eval-samples", "64",
            "--batch-size", "16", "--max_steps", str(steps), "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "1",
            "--model-ema", "--model-ema-decay", "0.99", "--logging_steps", "10", "--eval_strategy", "steps",
            "--eval_steps", str(checkpoint_every), "--save_strategy", "steps", "--save_steps", str(checkpoint_every),
            "--save_total_limit", "2", "--report_to", "none", "--disable_tqdm", "true", "--log_level", "warning",
            "--output_dir", str(output_dir)]


def measure(steps: int, every: int) -> Verdict:
    import timm
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    recorder = RecordMemory(every)
    with tempfile.TemporaryDirectory() as folder:
        teacher = Path(folder) / "teacher.safetensors"
        torch.manual_seed(0)
        save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(teacher))
        pat_train.main(run_flags(Path(folder) / "run", teacher, steps), callbacks=[recorder])
    # Warm-up ends once the first evaluation and checkpoint are behind (a quarter of the run).
    warm_step = min(step for step in recorder.rss if step >= steps // 4)
    return Verdict(recorder.rss, warm_step)


def main(argv: list[str] | None = None) -> Verdict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="record the RSS every N steps")
    parser.add_argument("--report", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    verdict = measure(args.steps, args.every)
    text = (f"# Resident memory over {args.steps:,} training steps\n\n{describe_machine('cpu')}; tiny PAT pair "
            f"(test_resnet -> test_vit) on digits, EMA, logging every 10 steps, evaluation and checkpoints every "
            f"{max(args.steps // 8, 10)} steps.\n\n{verdict.table()}\n\n{verdict.summary()}\n")
    print(text)
    if args.report:
        write_report(args.report, text)
    return verdict


if __name__ == "__main__":
    sys.exit(0 if main().flat else 1)
