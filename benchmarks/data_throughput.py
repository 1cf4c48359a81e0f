"""Images per second that data loading (JPEG decode + the ImageNet recipes' augmentation) delivers, by workers.

    python benchmarks/data_throughput.py                                  # a synthetic folder of JPEGs
    python benchmarks/data_throughput.py --data-dir /data/imagenet --workers 0 4 8 16 \
        --target-images-per-second 2500

The images go through what training runs: pat_hf.data's loading of a local `train/CLASS/*.jpg` folder, the
training transform that pat_hf.data.build_transforms makes from a shipped ImageNet config (vit_mlp:
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, a 224 random-resized crop, and Mixup/CutMix in the
collate; cnn: the crop and flip alone), into a torch DataLoader with 0, 1, 2, ... workers. A step rate
(images/s of the training step, e.g. `benchmarks/step_time.py`'s) then says how many workers keep a GPU fed.
Without --data-dir, a folder of synthetic JPEGs of ImageNet-like sizes is written to a temporary directory.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from benchmarks.reporting import cpu_name, write_report  # noqa: E402
from pat_hf.cli.parser import parse_arguments  # noqa: E402
from pat_hf.data.examples import attach_transform  # noqa: E402
from pat_hf.data.labels import num_classes_of  # noqa: E402
from pat_hf.data.sources import load_splits  # noqa: E402
from pat_hf.data.transforms import MixupCollator, build_mixup, build_transforms, collate, resolve_data_config_for  # noqa: E402
from pat_hf.models.factory import create_model  # noqa: E402

RECIPES = ("vit_mlp", "cnn")
# Common ImageNet-1k training image sizes (width, height); the set averages about 400x350.
IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480))


@dataclass(frozen=True)
class Throughput:
    recipe: str
    workers: int
    images_per_second: float

    @property
    def per_process(self) -> float:
        """Images/s each loading process delivers (with no workers, the main process does the work)."""
        return self.images_per_second / max(self.workers, 1)


def write_synthetic_folder(root: Path, num_images: int, num_classes: int = 10, seed: int = 0) -> Path:
    """`root/train/CLASS/*.jpg`: smooth random colour fields with grain, at ImageNet-like sizes and quality,
    so that decoding costs about what a photo of the same size costs."""
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        width, height = IMAGENET_LIKE_SIZES[rng.integers(len(IMAGENET_LIKE_SIZES))]
        coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        grain = rng.normal(0.0, 8.0, smooth.shape)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        folder = root / "train" / f"class_{index % num_classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)
    return root


def training_loader(data_dir: Path, recipe: str, workers: int, batch_size: int, num_batches: int,
                    model: str) -> DataLoader:
    """The training images of `data_dir` with `recipe`'s transform and collate, sampled with replacement
    so that any folder gives `num_batches` batches."""
    args = parse_arguments(["--config", f"imagenet/{recipe}", "--dataset", str(data_dir), "--val-split", "train",
                            "--batch-size", str(batch_size), "--model", model])
    train_set, _, source = load_splits(args.data)
    num_classes = num_classes_of(train_set)
    data_config = resolve_data_config_for(args.data, create_model(model, num_classes), args.model.img_size, source)
    train_transform, _ = build_transforms(args.data, data_config)
    mixup = build_mixup(args.data, num_classes, batch_size)
    dataset = attach_transform(train_set, train_transform)
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * num_batches)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      collate_fn=MixupCollator(mixup) if mixup else collate)


def measure(loader: DataLoader, timed_batches: int) -> float:
    """Images/s over `timed_batches` batches, counted from the first batch's arrival (so that starting the
    workers is not counted)."""
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    images = sum(len(next(batches)["pixel_values"]) for _ in range(timed_batches))
    elapsed = time.perf_counter() - start
    del batches
    return images / elapsed


def workers_needed(results: list[Throughput], target: float) -> int | None:
    """The fewest measured workers that reach `target` images/s; otherwise an extrapolation from the
    per-worker rate of the run with the most workers (None without a run that had workers)."""
    reaching = sorted(r.workers for r in results if r.workers > 0 and r.images_per_second >= target)
    if reaching:
        return reaching[0]
    with_workers = [r for r in results if r.workers > 0]
    if not with_workers:
        return None
    most = max(with_workers, key=lambda r: r.workers)
    return math.ceil(target / most.per_process)


def report(results: list[Throughput], target: float | None, description: str) -> str:
    lines = [f"### Data loading on {description}", "",
             f"With 0 workers the main process loads, with torch's {torch.get_num_threads()} threads; each worker "
             f"runs with one (torch's DataLoader sets it).", "",
             "| recipe | workers | images/s | images/s per process |", "|---|---|---|---|"]
    lines += [f"| {r.recipe} | {r.workers} | {r.images_per_second:,.1f} | {r.per_process:,.1f} |" for r in results]
    if target:
        lines.append("")
        for recipe in dict.fromkeys(r.recipe for r in results):
            needed = workers_needed([r for r in results if r.recipe == recipe], target)
            verdict = "measure with at least one worker" if needed is None else f"about {needed} workers"
            lines.append(f"- {recipe}: {target:,.0f} images/s needs {verdict}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="a folder with train/CLASS/*.jpg (default: synthetic)")
    parser.add_argument("--synthetic-images", type=int, default=256, help="JPEGs to write without --data-dir")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES),
                        help="shipped ImageNet configs whose data settings to use")
    parser.add_argument("--workers", type=int, nargs="+", default=list(range(min(os.cpu_count() or 1, 4) + 1)),
                        help="DataLoader worker counts to measure (default: 0 up to min(4, cores))")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the main process, which loads when there are no workers")
    parser.add_argument("--model", default="resnet18", help="timm model whose data config (mean, std) applies")
    parser.add_argument("--target-images-per-second", type=float, default=None,
                        help="a training step rate to feed: prints the workers it needs")
    parser.add_argument("--output", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.data_dir is not None and not (args.data_dir / "train").is_dir():
        parser.error(f"--data-dir {args.data_dir} has no train/ folder; it needs train/CLASS/*.jpg")
    if min(args.workers) < 0:
        parser.error("--workers takes counts of 0 or more")
    return args


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown report and return it."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pat_hf_jpegs_") as scratch:
        data_dir = args.data_dir or write_synthetic_folder(Path(scratch), args.synthetic_images)
        results = []
        for recipe in args.recipes:
            for workers in args.workers:
                loader = training_loader(data_dir, recipe, workers, args.batch_size, args.batches + 1, args.model)
                results.append(Throughput(recipe, workers, measure(loader, args.batches)))
                print(f"{recipe}, {workers} workers: {results[-1].images_per_second:,.1f} images/s",
                      file=sys.stderr)
    source = f"{args.data_dir}" if args.data_dir else f"{args.synthetic_images} synthetic JPEGs"
    description = (f"{cpu_name()}, {os.cpu_count()} CPU cores ({source}, batch {args.batch_size}, "
                   f"{args.batches} timed batches, torch {torch.__version__})")
    text = report(results, args.target_images_per_second, description)
    print(text)
    if args.output:
        write_report(args.output, text)
    return text


if __name__ == "__main__":
    main()
