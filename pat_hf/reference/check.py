"""Check a distiller against a fixture computed by the reference implementation.

    python -m pat_hf.reference.check PATH/NAME.safetensors [--distiller NAME] [--compile BACKEND]

Reads NAME.json beside the weights (models, kwargs, hyper-parameters in the reference's names, and what the
reference computed), builds the pair, loads the converted reference state, runs two training-mode forwards
and one backward exactly as the fixture's README describes, prints ours against the reference, and exits
non-zero if a loss or logit sum differs by more than 1e-4 relative, or a gradient norm by more than 1e-3.

NAME.safetensors holds `input.x1/x2` (images), `input.y1/y2` (labels), `teacher.*` and `student.*` (timm 0.6.5
names) and `extra.DISTILLER.*` (the distiller's modules in the reference's names, before any forward). A CRD
fixture adds what the reference's data pipeline supplied, so that its forwards replay exactly:
  * `input.train_labels` (N,): the class of every training example (N sizes the memory banks);
  * `input.index1/2` (B,): each batch example's position in the training set;
  * `input.contrast_index1/2` (B, 1 + K): the index again, then the K negatives the reference's dataset drew.
NAME.json: `teacher`/`student` ({name, kwargs}), `num_classes`, `img_size`, `args` (hyper-parameters in the
reference's CLI names) and, per distiller, `step1`/`step2` (loss dicts), `step2_logits_sum`,
`step2_logits_abs_sum`, `grad_norm_student`, `grad_norm_extra`, `grad_norm_extra_by_module` (by the
reference's top-level module name; modules without parameters may be left out) and `extra_param_count`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pat_hf.cli.failures import run_command
from pat_hf.config.checks import OneLineArgumentParser
from pat_hf.distillers import DistillArguments, DistillContext, Distiller, get_distiller_class
from pat_hf.models.factory import create_model
from pat_hf.reference.convert import (
    load_reference_distiller_state,
    load_reference_model_weights,
    split_prefixed,
)

LOSS_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3
# Batch keys besides images and labels that a fixture may carry per step, as `input.KEY1` and `input.KEY2`.
REPLAYED_BATCH_KEYS = ("index", "contrast_index")


@dataclass
class Comparison:
    name: str
    ours: float
    reference: float
    tolerance: float

    @property
    def relative_error(self) -> float:
        return abs(self.ours - self.reference) / max(abs(self.reference), 1e-12)

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance


def _hparams(distiller_cls: type[Distiller], reference_args: dict):
    if distiller_cls.Arguments is None:
        return None
    names = {f.name for f in dataclasses.fields(distiller_cls.Arguments)}
    return distiller_cls.Arguments(**{key: value for key, value in reference_args.items() if key in names})


def build_distiller(fixture: dict, state: dict[str, torch.Tensor], distiller_name: str) -> Distiller:
    num_classes, size = fixture["num_classes"], fixture["img_size"]
    teacher = create_model(fixture["teacher"]["name"], num_classes, fixture["teacher"]["kwargs"])
    student = create_model(fixture["student"]["name"], num_classes, fixture["student"]["kwargs"])
    load_reference_model_weights(teacher, split_prefixed(state, "teacher."))
    load_reference_model_weights(student, split_prefixed(state, "student."))
    args = fixture["args"]
    common_names = {f.name for f in dataclasses.fields(DistillArguments)}
    common = DistillArguments(**{k: v for k, v in args.items() if k in common_names}, distiller=distiller_name)
    distiller_cls = get_distiller_class(distiller_name)
    extra_state = split_prefixed(state, f"extra.{distiller_name}.")
    context = DistillContext(input_size=(3, size, size), num_classes=num_classes,
                             train_labels=state.get("input.train_labels"), criterion=F.cross_entropy)
    hparams = _hparams(distiller_cls, args)
    distiller = distiller_cls.from_reference_state(student, teacher, common, hparams, context, extra_state)
    load_reference_distiller_state(distiller, distiller_name, extra_state)
    return distiller


def _replayed_batch(state: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The batch keys the reference's data pipeline gave with step `step`'s batch (CRD's indices)."""
    return {key: state[f"input.{key}{step}"] for key in REPLAYED_BATCH_KEYS if f"input.{key}{step}" in state}


def _grad_norm(parameters) -> float:
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    return float(torch.sqrt(sum((g**2).sum() for g in grads))) if grads else 0.0


def run_check(fixture_path: Path, distiller_name: str, compile_backend: str | None = None) -> list[Comparison]:
    """Ours against the reference on one fixture; with `compile_backend`, the forwards run through
    `torch.compile(distiller, backend=compile_backend)`, as --torch_compile runs them, and the same tolerances hold."""
    fixture = json.loads(fixture_path.with_suffix(".json").read_text())
    state = load_file(str(fixture_path))
    recorded = fixture["distillers"][distiller_name]
    distiller = build_distiller(fixture, state, distiller_name)
    distiller.train()
    forward = torch.compile(distiller, backend=compile_backend) if compile_backend else distiller
    comparisons = []
    for step in (1, 2):
        out = forward(state[f"input.x{step}"].float(), state[f"input.y{step}"], **_replayed_batch(state, step))
        for key, value in recorded[f"step{step}"].items():
            comparisons.append(Comparison(f"step{step}.{key}", float(out[key].detach()), value, LOSS_TOLERANCE))
    logits = out["logits"].detach()
    comparisons.append(Comparison("step2_logits_sum", float(logits.sum()), recorded["step2_logits_sum"],
                                  LOSS_TOLERANCE))
    comparisons.append(Comparison("step2_logits_abs_sum", float(logits.abs().sum()),
                                  recorded["step2_logits_abs_sum"], LOSS_TOLERANCE))

    distiller.zero_grad()
    out["loss"].backward()
    comparisons.append(Comparison("grad_norm_student", _grad_norm(distiller.student.parameters()),
                                  recorded["grad_norm_student"], GRAD_TOLERANCE))
    comparisons.append(Comparison("grad_norm_extra", _grad_norm(distiller.extra_parameters()),
                                  recorded["grad_norm_extra"], GRAD_TOLERANCE))
    renames = get_distiller_class(distiller_name).reference_module_names
    for name, module in distiller.extra_modules().items():
        if next(module.parameters(), None) is None:  # CRD's memory and sampler: no gradient to compare
            continue
        reference_name = renames.get(name, name)
        comparisons.append(Comparison(f"grad_norm_extra.{reference_name}", _grad_norm(module.parameters()),
                                      recorded["grad_norm_extra_by_module"][reference_name], GRAD_TOLERANCE))
    extra_params = sum(p.numel() for p in distiller.extra_parameters())
    comparisons.append(Comparison("extra_param_count", extra_params, recorded["extra_param_count"], 0.0))
    return comparisons


def recorded_distillers(fixture_path: Path) -> list[str]:
    """The distillers a fixture pins (those the reference could run)."""
    fixture = json.loads(fixture_path.with_suffix(".json").read_text())
    return [name for name, record in fixture["distillers"].items() if "error" not in record]


def format_table(pair: str, distiller: str, comparisons: list[Comparison]) -> str:
    lines = [f"{pair} / {distiller}", f"  {'quantity':42s} {'ours':>16s} {'reference':>16s} {'rel. err':>9s}"]
    for c in comparisons:
        flag = "" if c.ok else "  <-- MISMATCH"
        lines.append(f"  {c.name:42s} {c.ours:16.8g} {c.reference:16.8g} {c.relative_error:9.1e}{flag}")
    return "\n".join(lines)


CHECK_PROG = "python -m pat_hf.reference.check"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog=CHECK_PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path, help="NAME.safetensors (NAME.json must lie beside it)")
    parser.add_argument("--distiller", help="check this distiller only (default: every one the fixture records)")
    parser.add_argument("--compile", metavar="BACKEND", help=(
        "run the forwards through torch.compile with this backend (inductor, as --torch_compile does; aot_eager "
        "traces the same graphs without generating code) and hold them to the same tolerances"))
    args = parser.parse_args(argv)
    if not args.fixture.is_file() or not args.fixture.with_suffix(".json").is_file():
        parser.error(f"{args.fixture} and {args.fixture.with_suffix('.json')} must both exist")
    torch.manual_seed(0)
    names = [args.distiller] if args.distiller else recorded_distillers(args.fixture)
    failed = False
    for name in names:
        comparisons = run_check(args.fixture, name, args.compile)
        label = f"{args.fixture.stem} (torch.compile, {args.compile})" if args.compile else args.fixture.stem
        print(format_table(label, name, comparisons))
        failed |= not all(c.ok for c in comparisons)
    print("MISMATCH" if failed else "OK: every quantity within tolerance")
    return 1 if failed else 0


def _main_with_status(argv: list[str]) -> None:
    status = main(argv)
    if status:
        raise SystemExit(status)


def command(argv: list[str] | None = None) -> None:
    """`main` under the failure contract (pat_hf/cli/failures.py); a parity mismatch keeps its own status 1,
    after the table that shows it."""
    run_command(CHECK_PROG, _main_with_status, argv)


if __name__ == "__main__":
    command()
