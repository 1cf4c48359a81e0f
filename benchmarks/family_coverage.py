"""Which timm architecture families the feature distillers handle: a table of works / the one-line error.

    python benchmarks/family_coverage.py [--families levit,swin_transformer] [--output FILE.md]

A family is a timm model module (`timm.list_modules()`); its smallest variant (parameters counted on the meta
device) is built with random weights, with narrow kwargs only where even that variant is huge. Each family
gets the smallest input it accepts (sizes tried in order, `img_size` passed where the model takes one). Then
`kd`, `fitnet`, `ofa` and `pat` in both modes train it for two steps (forward, backward, SGD) through the
distiller API, once as teacher and once as student, against a fixed partner of the other kind: `test_resnet`
for token models, `test_vit` for feature-map models (or `--partner NAME` for every family).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pat_hf.distillers import DistillArguments, DistillContext, get_distiller_class  # noqa: E402
from pat_hf.models.factory import create_model  # noqa: E402
from pat_hf.models.stages.layer import StageLayer  # noqa: E402

# (column name, registry name, hyper-parameter overrides)
DISTILLERS = [
    ("kd", "kd", {}),
    ("fitnet", "fitnet", {}),
    ("ofa", "ofa", {}),
    ("pat-reference", "pat", {"pat_mode": "reference"}),
    ("pat-corrected", "pat", {"pat_mode": "corrected"}),
]
ROLES = ("teacher", "student")
SIZES = (32, 48, 64, 72, 96, 112, 120, 128, 160, 192, 224, 256)  # then the variant's own size
NUM_CLASSES = 10
BATCH_SIZE = 2
STEPS = 2
# Families whose smallest variant is still a base-size model: same depth and layout, a tiny width.
NARROW_KWARGS: dict[str, dict] = {
    "beit": {"embed_dim": 192, "num_heads": 3},
    "deepseek_vit": {"embed_dim": 192, "num_heads": 3},
    "gemma4_vit": {"embed_dim": 192, "num_heads": 3, "num_kv_heads": 3, "head_dim": 64, "intermediate_size": 768},
    "naflexvit": {"embed_dim": 192, "num_heads": 3},
    "qwen3_vit": {"embed_dim": 192, "num_heads": 3},
    "vision_transformer_sam": {"embed_dim": 192, "num_heads": 3},
    "vgg": {"mlp_ratio": 0.25},
}
PARTNERS = {True: "test_resnet", False: "test_vit"}  # keyed by "the family's stages are token sequences"


class CaseTimeout(Exception):
    pass


@dataclass
class Family:
    module: str
    variant: str = ""
    params: int = 0
    kwargs: dict | None = None
    size: int = 0
    model: nn.Module | None = None
    is_sequence: bool = False
    error: str = ""  # why no case of this family can run at all
    stage_error: str = ""  # why its stages cannot be built (the feature distillers then fail with it)


def one_line(error: BaseException) -> str:
    """`Type: first line of the message [where]`, the innermost frame inside pat_hf (else timm) as where."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    frames = traceback.extract_tb(error.__traceback__)
    where = next((f for f in reversed(frames) if "/pat_hf/" in f.filename), None) or \
        next((f for f in reversed(frames) if "/timm/" in f.filename), None)
    location = ""
    if where is not None:
        package = "pat_hf" if "/pat_hf/" in where.filename else "timm"
        location = f" [{package}/{where.filename.split(f'/{package}/', 1)[1]}:{where.lineno}]"
    return f"{type(error).__name__}: {message[:240]}{location}"


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(_signum, _frame):
        raise CaseTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def count_parameters(name: str, kwargs: dict) -> int | None:
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def smallest_variant(module: str) -> tuple[str, int] | None:
    counts = [(count_parameters(name, NARROW_KWARGS.get(module, {})), name)
              for name in timm.list_models(module=module)]
    counts = [(count, name) for count, name in counts if count is not None]
    return (min(counts)[1], min(counts)[0]) if counts else None


def prepare_family(module: str, sizes: tuple[int, ...], timeout: float) -> Family:
    """The smallest variant at the smallest size it runs at (and, if any does, builds its stages at)."""
    family = Family(module, kwargs=NARROW_KWARGS.get(module, {}))
    found = smallest_variant(module)
    if found is None:
        family.error = "no variant can be built"
        return family
    family.variant, family.params = found
    first_running: tuple[int, nn.Module, str] | None = None
    errors = []
    own_size = timm.models.get_pretrained_cfg(family.variant).input_size[-1]
    for size in dict.fromkeys([*sizes, own_size]):
        try:
            with time_limit(timeout):
                torch.manual_seed(0)
                model = create_model(family.variant, NUM_CLASSES, family.kwargs, img_size=size)
        except Exception as error:
            errors.append(one_line(error))
            continue
        try:
            with time_limit(timeout):
                layer = StageLayer(model, (3, size, size))
        except Exception as error:
            first_running = first_running or (size, model, one_line(error))
            continue
        family.size, family.model, family.is_sequence = size, model, layer.is_sequence
        return family
    if first_running is None:
        family.error = f"runs at none of the sizes {', '.join(map(str, sizes))}: {errors[-1]}"
        return family
    family.size, family.model, family.stage_error = first_running
    family.is_sequence = False
    return family


def build_partner(name: str, size: int) -> nn.Module:
    torch.manual_seed(1)
    return create_model(name, NUM_CLASSES, img_size=size)


def run_case(family: Family, partner: nn.Module, role: str, registry_name: str, overrides: dict) -> None:
    """Two training steps of one distiller with the family in one role; raises on any failure."""
    distiller_cls = get_distiller_class(registry_name)
    hparams = distiller_cls.Arguments(**overrides) if distiller_cls.Arguments else None
    model, other = copy.deepcopy(family.model), copy.deepcopy(partner)
    student, teacher = (other, model) if role == "teacher" else (model, other)
    input_size = (3, family.size, family.size)
    context = DistillContext(input_size=input_size, num_classes=NUM_CLASSES,
                             train_labels=torch.arange(4 * BATCH_SIZE) % NUM_CLASSES)
    distiller = distiller_cls(student, teacher, DistillArguments(distiller=registry_name), hparams, context).train()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        images = torch.randn(BATCH_SIZE, *input_size, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=generator)
        loss = distiller(images, labels)["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def family_results(family: Family, partner_name: str | None, timeout: float) -> dict[tuple[str, str], str]:
    """(role, distiller column) -> "works" or the one-line error."""
    if family.error:
        return {(role, column): family.error for role in ROLES for column, _, _ in DISTILLERS}
    partner_name = partner_name or PARTNERS[family.is_sequence]
    try:
        partner = build_partner(partner_name, family.size)
    except Exception as error:
        return {(role, column): f"partner {partner_name}: {one_line(error)}"
                for role in ROLES for column, _, _ in DISTILLERS}
    results = {}
    for role in ROLES:
        for column, registry_name, overrides in DISTILLERS:
            needs_stages = get_distiller_class(registry_name).requires_stages
            if family.stage_error and needs_stages:
                results[role, column] = family.stage_error
                continue
            try:
                with time_limit(timeout):
                    run_case(family, partner, role, registry_name, overrides)
                results[role, column] = "works"
            except Exception as error:
                results[role, column] = one_line(error)
    return results


def escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    return f"{cpu or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s)"


def markdown(families: list[Family], results: dict[str, dict], partner: str | None, minutes: float) -> str:
    columns = [column for column, _, _ in DISTILLERS]
    works_everywhere = [f.module for f in families if all(r == "works" for r in results[f.module].values())]
    cases = [r for f in families for r in results[f.module].values()]
    lines = [
        "# timm family coverage",
        "",
        f"timm {timm.__version__}, torch {torch.__version__}, {machine()}; {len(families)} families, "
        f"{STEPS} training steps per case at batch {BATCH_SIZE}, random weights; partner: "
        f"{partner or 'test_resnet for token models, test_vit for feature-map models'}; {minutes:.1f} min.",
        "",
        f"**{len(works_everywhere)} of {len(families)} families work in every role with every distiller**; "
        f"{cases.count('works')} of {len(cases)} cases work.",
        "",
        "| distiller | works as teacher | works as student | families working in both roles |",
        "|---|---|---|---|",
    ]
    for column in columns:
        as_role = {role: sum(results[f.module][role, column] == "works" for f in families) for role in ROLES}
        both = sum(all(results[f.module][role, column] == "works" for role in ROLES) for f in families)
        lines.append(f"| {column} | {as_role['teacher']} / {len(families)} | {as_role['student']} / {len(families)} "
                     f"| {both} / {len(families)} |")
    lines += ["", "| family | variant (params, input) | role | distiller | result |", "|---|---|---|---|---|"]
    for family in families:
        variant = (f"{family.variant} ({family.params / 1e6:.1f} M, {family.size} px)"
                   if family.size else family.variant or "-")
        if family.kwargs:
            variant += f" {family.kwargs}"
        for role in ROLES:
            for column in columns:
                lines.append(f"| {family.module} | {escape(variant)} | {role} | {column} | "
                             f"{escape(results[family.module][role, column])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="", help="comma-separated timm modules (default: all)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this Markdown file")
    parser.add_argument("--partner", default=None, help="one partner model for every family (default: by kind)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case (and per model build)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="input sizes to try, in order")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    modules = args.families.split(",") if args.families else timm.list_modules()
    unknown = sorted(set(modules) - set(timm.list_modules()))
    if unknown:
        parser.error(f"not timm modules: {', '.join(unknown)}; see timm.list_modules()")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    start = time.perf_counter()
    families, results = [], {}
    for module in modules:
        family = prepare_family(module, sizes, args.timeout)
        results[module] = family_results(family, args.partner, args.timeout)
        family.model = None
        families.append(family)
        failed = sum(r != "works" for r in results[module].values())
        print(f"{module}: {family.variant or '-'} at {family.size or '-'} px, {failed} of "
              f"{len(results[module])} cases fail ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    table = markdown(families, results, args.partner, (time.perf_counter() - start) / 60)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(table)
        partial.replace(args.output)
    return table


if __name__ == "__main__":
    main()
