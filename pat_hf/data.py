"""Datasets, transforms and mixing: `datasets` for loading, timm for every transform and for Mixup/CutMix.

Every source is normalised to two columns, `image` and `label`, and a train and an evaluation split: map-style
`datasets.Dataset`s, or with --streaming `datasets.IterableDataset`s read as they are consumed. Nothing is
decoded at start-up: each image is decoded here when its example is drawn, so that an unreadable one is skipped
and counted (or, with --strict-images, stops the run naming it), and every image mode (grey, palette, alpha,
CMYK, 16-bit) becomes 8-bit RGB. Transforms run at each draw, so augmentation differs from epoch to epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset
from datasets.distributed import split_dataset_by_node
from PIL import Image, UnidentifiedImageError
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from pat_hf.arguments import DataArguments

logger = logging.getLogger(__name__)

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
EVAL_SPLIT_CANDIDATES = ("validation", "val", "valid", "test")
# Files that `datasets` reads as tables (a folder holding any is loaded by format, not as an image tree).
DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tar")
# The batch key carrying how many examples of the batch were dropped as unreadable (a tensor, so that it
# survives data-loader worker processes); the trainer pops it before the model sees the batch.
SKIPPED_IMAGES = "skipped_images"
# Examples and batches a resumed streaming run passes over without decoding (it trained on them already).
RESUME_SKIPPED = "resume_skipped"
# Rows read from a stream at a time (their images stay encoded until drawn).
STREAM_READ_BATCH = 64
# Shards a map-style split is cut into when it is streamed (--streaming with digits or a save_to_disk folder).
LOCAL_STREAM_SHARDS = 64
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# What PIL raises on a file that is not an image, is truncated or cannot become RGB (SyntaxError: some
# plugins' header parsers).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class DatasetSource:
    """How to load a known dataset: where it lives and which columns hold the image and the label."""

    path: str
    image_column: str
    label_column: str
    eval_split: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    eval_interpolation: str | None = None


KNOWN_DATASETS = {
    # The reference normalises CIFAR with its own statistics and evaluates with bilinear resizing (docs/REFERENCE.md,
    # Data).
    "cifar100": DatasetSource("uoft-cs/cifar100", "img", "fine_label", "test", CIFAR_MEAN, CIFAR_STD, "bilinear"),
    "imagenet-1k": DatasetSource("ILSVRC/imagenet-1k", "image", "label", "validation"),
}
# Teacher and student see the same normalised images, whatever their timm configs say: like CIFAR, the shipped
# digits get statistics of their own (pixel mean and std over the whole set, grey replicated to RGB).
DIGITS = DatasetSource("digits", "image", "label", "validation", (0.3053,) * 3, (0.3759,) * 3)
KNOWN_DATASETS["uoft-cs/cifar100"] = KNOWN_DATASETS["cifar100"]
KNOWN_DATASETS["imagenet"] = KNOWN_DATASETS["ILSVRC/imagenet-1k"] = KNOWN_DATASETS["imagenet-1k"]

Split = Dataset | IterableDataset


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), split 80/20 stratified, as PIL images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, eval_idx = train_test_split(np.arange(len(pixels)), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict({"image": [Image.fromarray(pixels[i], mode="L") for i in indices],
                                  "label": digits.target[indices].tolist()}, features=features)

    return DatasetDict(train=split(train_idx), validation=split(eval_idx))


# ---- loading ----

def _is_path_like(name: str) -> bool:
    """A --dataset meant as a local folder: a Hub name is `owner/name`, with one slash and no leading dot."""
    return name.startswith((".", "~", "/", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _holds_data_files(folder: str) -> bool:
    """Whether the folder (or a sub-folder of it) holds table files such as parquet, rather than images."""
    with os.scandir(folder) as entries:
        children = list(entries)
    if any(e.is_file() and e.name.endswith(DATA_FILE_SUFFIXES) for e in children):
        return True
    for child in (e for e in children if e.is_dir()):
        with os.scandir(child.path) as entries:
            if any(e.is_file() and e.name.endswith(DATA_FILE_SUFFIXES) for e in entries):
                return True
    return False


def _empty_split_error(where: str) -> ValueError:
    return ValueError(f"a split of {where} is empty; give every split examples (or remove the empty one)")


def _load_folder(folder: str, streaming: bool) -> DatasetDict | datasets.IterableDatasetDict:
    # One sub-folder per class. A lone class keeps its label (datasets would drop it), so that the check of the
    # classes can say what is wrong.
    options = {} if _holds_data_files(folder) else {"path": "imagefolder", "data_dir": folder, "drop_labels": False}
    try:
        return datasets.load_dataset(**({"path": folder} | options), streaming=streaming)
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError):
        raise FileNotFoundError(f"no images found in {folder}: lay it out as train/CLASS/*.jpg and "
                                f"val/CLASS/*.jpg") from None
    except ValueError as error:
        if "corresponds to no data" in str(error):  # how datasets reports a split without rows
            raise _empty_split_error(folder) from None
        raise


def _load_from_hub(name: str, config_name: str | None = None,
                   streaming: bool = False) -> DatasetDict | datasets.IterableDatasetDict:
    try:
        return datasets.load_dataset(name, config_name, streaming=streaming)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        offline = " (offline mode is on)" if datasets.config.HF_HUB_OFFLINE else ""
        raise ConnectionError(f"cannot load dataset {name!r} from the Hugging Face Hub{offline}, and there is no "
                              f"local folder of that name: go online, or pass a local train/val image folder or a "
                              f"save_to_disk directory as --dataset ({type(error).__name__})") from None


def _load_raw(args: DataArguments) -> tuple[DatasetDict | datasets.IterableDatasetDict, DatasetSource | None]:
    name = args.dataset
    # --data_dir holds a local copy of --dataset: a known dataset keeps its columns, statistics and splits.
    source = KNOWN_DATASETS.get(name)
    if args.data_dir:
        local = args.data_dir
    elif name == "digits":
        return load_digits_dataset(), DIGITS
    elif os.path.isdir(os.path.expanduser(name)) or _is_path_like(name):
        local, source = name, None
    else:
        return _load_from_hub(source.path if source else name, args.dataset_config_name, args.streaming), source
    local = os.path.expanduser(local)
    if not os.path.isdir(local):
        raise FileNotFoundError(f"dataset directory not found: {local}; pass an existing folder, or a Hub "
                                f"dataset name (owner/name)")
    if os.path.isfile(os.path.join(local, "dataset_dict.json")):
        try:
            return datasets.load_from_disk(local), source
        except IndexError:  # how datasets fails to read back a split saved without rows
            raise _empty_split_error(local) from None
    return _load_folder(local, args.streaming), source


def _features_of(split: Split) -> datasets.Features:
    if split.features is None:
        raise ValueError("the streamed dataset does not declare its columns; pass --image-column NAME and "
                         "--label-column NAME")
    return split.features


def _pick_column(features: datasets.Features, requested: str | None, default: str | None, kind: type,
                 what: str) -> str:
    columns = list(features)
    if requested:
        if requested not in columns:
            raise ValueError(f"the dataset has no column {requested!r} (columns: {', '.join(columns)}); "
                             f"pass --{what}-column NAME")
        return requested
    if default and default in columns:
        return default
    typed = [c for c, feature in features.items() if isinstance(feature, kind)]
    if not typed:
        raise ValueError(f"cannot tell which column holds the {what} (columns: {', '.join(columns)}); "
                         f"pass --{what}-column NAME")
    return typed[0]


def _pick_eval_split(splits: dict, requested: str | None, default: str | None) -> str:
    if requested:
        if requested not in splits:
            raise ValueError(f"no split {requested!r} in the dataset (splits: {', '.join(splits)}); "
                             f"pass --val-split NAME")
        return requested
    for candidate in (default, *EVAL_SPLIT_CANDIDATES):
        if candidate in splits:
            return candidate
    raise ValueError(f"no evaluation split among {', '.join(splits)}; pass --val-split NAME")


def random_subset(split: Dataset, size: int, seed: int) -> Dataset:
    """`size` rows drawn at random with `seed`, kept in their on-disk order (reads stay sequential)."""
    if size >= len(split):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(len(split), size=size, replace=False))
    return split.select(rows)


def _as_stream(split: Dataset, name: str) -> IterableDataset:
    """A map-style split streamed (for --streaming with a local copy), knowing its size as a Hub stream does."""
    stream = split.to_iterable_dataset(num_shards=max(1, min(LOCAL_STREAM_SHARDS, len(split))))
    stream.info.splits = datasets.SplitDict({name: datasets.SplitInfo(name=name, num_examples=len(split))})
    return stream


def load_splits(args: DataArguments, seed: int = 0) -> tuple[Split, Split, DatasetSource | None]:
    """(train, eval, source) with columns `image` and `label` only. --max-train-samples / --max-eval-samples
    take a random subset drawn with `seed`. With --streaming both splits are streams, the training one
    shuffled through a buffer; a stream's subsets are taken as it is read (see `StreamedTrainingSet`)."""
    splits, source = _load_raw(args)
    if args.train_split not in splits:
        raise ValueError(f"no split {args.train_split!r} in the dataset (splits: {', '.join(splits)}); "
                         f"pass --train-split NAME")
    features = _features_of(splits[args.train_split])
    image_column = _pick_column(features, args.image_column, source and source.image_column, datasets.Image,
                                "image")
    label_column = _pick_column(features, args.label_column, source and source.label_column, ClassLabel, "label")
    eval_split = _pick_eval_split(splits, args.val_split, source and source.eval_split)
    normalised = []
    for name, limit in ((args.train_split, args.max_train_samples), (eval_split, args.max_eval_samples)):
        split = splits[name].select_columns([image_column, label_column])
        split = split.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
        if isinstance(split, Dataset):
            if not len(split):
                raise ValueError(f"the {name!r} split of {args.dataset} is empty; pass a split with examples")
            split = _as_stream(split, name) if args.streaming else random_subset(split, limit or len(split), seed)
        normalised.append(split)
    train, evaluation = normalised
    if args.streaming:
        train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        if args.max_eval_samples:
            evaluation = evaluation.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
    return train, evaluation, source


# ---- labels, read from the label column alone ----

def label_array(dataset: Dataset) -> np.ndarray:
    """Every label of a map-style split, read without touching its images (one Arrow read: 0.03 s for
    ImageNet's 1.28M labels, where iterating the column takes minutes)."""
    return dataset.select_columns(["label"]).with_format("arrow")[:]["label"].to_numpy()


def num_classes_of(dataset: Split) -> int:
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    if isinstance(dataset, IterableDataset):
        raise ValueError("the streamed label column is not a ClassLabel, so its number of classes is unknown; "
                         "pass --num-classes N")
    return int(label_array(dataset).max()) + 1


def resolve_num_classes(train: Split, requested: int | None) -> int:
    """--num-classes, or the training split's; never fewer than the split declares."""
    if requested and isinstance(train, IterableDataset) and not isinstance(train.features["label"], ClassLabel):
        return requested
    dataset_classes = num_classes_of(train)
    if requested and requested < dataset_classes:
        raise ValueError(f"--num-classes {requested} is fewer than the {dataset_classes} classes of the dataset; "
                         f"drop --num-classes to use the dataset's")
    return requested or dataset_classes


def class_names_of(dataset: Split | torch.utils.data.Dataset) -> list[str] | None:
    feature = dataset.features["label"]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _class_name(features: datasets.Features, label: int) -> str:
    feature = features["label"]
    return repr(feature.int2str(int(label))) if isinstance(feature, ClassLabel) else str(label)


def check_labels(train: Split, evaluation: Split, num_classes: int) -> None:
    """At least two classes in the training split, every label in 0..num_classes-1; streams are checked as
    they are read instead."""
    for name, split in (("training", train), ("evaluation", evaluation)):
        if isinstance(split, IterableDataset):
            continue
        labels = label_array(split)
        outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if outside.size:
            row = int(outside[0])
            raise ValueError(f"the {name} split has {outside.size} label(s) outside 0..{num_classes - 1} "
                             f"(first: {labels[row]} at row {row}; -1 usually marks unlabelled examples): use a "
                             f"labelled split (--train-split / --val-split) or fix the label column")
        if name == "training":
            present = np.unique(labels)
            if present.size < 2:
                raise ValueError(f"distillation needs at least 2 classes, but every training example is of class "
                                 f"{_class_name(split.features, present[0])}: give each class a sub-folder of its "
                                 f"own (train/CLASS/*.jpg) or pass another --label-column")


def train_labels_of(dataset: Dataset) -> torch.Tensor:
    """The class of every training example in dataset order (CRD's negatives), from the label column alone."""
    return torch.from_numpy(label_array(dataset).astype(np.int64))


# ---- decoding: any readable image to 8-bit RGB ----

def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit grey keeps its 8 high bits (PIL's own conversion clips it to white),
    transparency is composited over white, CMYK / palette / grey convert as PIL does."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(levels.astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


_DECODER = datasets.Image()


@dataclass(frozen=True)
class ExampleReader:
    """Turns an encoded image (`{"bytes", "path"}`) and its label into a model input. An unreadable image gives
    `pixel_values` None, which the collator drops and counts, or with `strict_images` an error naming it."""

    transform: Callable[[Image.Image], torch.Tensor]
    num_classes: int | None = None
    strict_images: bool = False
    split: str = "training"

    def read(self, encoded: dict[str, Any], label: int, where: str) -> dict[str, Any]:
        where = encoded.get("path") or where
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} of {where} is outside 0..{self.num_classes - 1}: use a labelled split "
                             f"(--train-split / --val-split) or fix the label column")
        try:
            image = to_rgb(_DECODER.decode_example(encoded))
        except UNREADABLE_IMAGE_ERRORS as error:
            problem = "not an image file" if isinstance(error, UnidentifiedImageError) else str(error)
            if self.strict_images:
                raise ValueError(f"unreadable image {where} ({problem}); fix or remove it, or drop --strict-images "
                                 f"to skip unreadable images") from None
            logger.warning("skipped unreadable image %s (%s); --strict-images stops at such images instead",
                           where, problem)
            return {"pixel_values": None, "labels": label, "error": f"{where}: {problem}"}
        return {"pixel_values": self.transform(image), "labels": label}


class ImageExamples(torch.utils.data.Dataset):
    """A map-style split whose rows become `pixel_values`/`labels` (and `index`, the row's position) as they
    are drawn; the images stay encoded until then."""

    def __init__(self, dataset: Dataset, reader: ExampleReader, with_index: bool = False):
        self.features, self.split = dataset.features, dataset.split
        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.reader = reader
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        rows = self.dataset[indices]
        examples = []
        for index, encoded, label in zip(indices, rows["image"], rows["label"]):
            example = self.reader.read(encoded, label, f"{self.reader.split} row {index}")
            if self.with_index:
                example["index"] = index
            examples.append(example)
        return examples


def attach_transform(dataset: Split, transform: Callable, with_index: bool = False, *,
                     strict_images: bool = False, num_classes: int | None = None,
                     max_samples: int | None = None, split: str = "evaluation") -> torch.utils.data.Dataset:
    """Examples that decode and transform their image when drawn: a map-style split (with `index`, the row's
    position, for distillers that need it) or an evaluation stream (at most `max_samples` examples)."""
    reader = ExampleReader(transform, num_classes, strict_images, split)
    if isinstance(dataset, IterableDataset):
        return StreamedEvaluationSet(dataset, reader, max_samples)
    return ImageExamples(dataset, reader, with_index)


# ---- streams ----

def _worker() -> tuple[int, int]:
    """(this data worker's index, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _share_of(total: int, parts: int, part: int) -> int:
    """Part `part` of `total` split into `parts` near-equal whole parts, the larger ones first."""
    return total // parts + int(part < total % parts)


def stream_share(stream: IterableDataset, consumer: int, consumers: int) -> IterableDataset:
    """One reader's disjoint share of a stream: whole shards when there are at least as many as readers
    (uneven when they do not divide), else every `consumers`-th example."""
    strategy = "shards" if stream.num_shards >= consumers else "examples"
    return split_dataset_by_node(stream, rank=consumer, world_size=consumers, strategy=strategy)


def _rows(share: IterableDataset, epoch: int) -> Iterator[tuple[dict[str, Any], int]]:
    # `iter` reads this share alone: iterating the dataset itself would split it again between data workers.
    share.set_epoch(epoch)
    for batch in share.iter(batch_size=STREAM_READ_BATCH):
        yield from zip(batch["image"], batch["label"])


def default_samples_per_epoch(args: DataArguments, stream: IterableDataset) -> int:
    """--samples-per-epoch, else the split's size from the dataset's info; --max-train-samples caps it."""
    splits = dict(stream.info.splits or {})
    # A local split streamed by `_as_stream` has no split name but one entry.
    info = splits.get(str(stream.split)) or (next(iter(splits.values())) if len(splits) == 1 else None)
    known = info.num_examples if info else None
    samples = args.samples_per_epoch or known
    if args.max_train_samples:
        samples = min(samples or args.max_train_samples, args.max_train_samples)
    if not samples:
        raise ValueError("the streamed training split does not say how many examples it holds; pass "
                         "--samples-per-epoch N (the examples one epoch draws)")
    return samples


class _StreamedExamples(torch.utils.data.IterableDataset):
    """A stream whose rows become `pixel_values`/`labels` as they are read; the images stay encoded until then."""

    def __init__(self, stream: IterableDataset, reader: ExampleReader):
        self.stream = stream.cast_column("image", datasets.Image(decode=False))
        self.reader = reader

    @property
    def features(self) -> datasets.Features:
        return self.stream.features

    @property
    def split(self) -> datasets.NamedSplit | None:
        return self.stream.split


class StreamedTrainingSet(_StreamedExamples):
    """A streamed training split cut into epochs of `samples_per_epoch` examples (all processes together,
    whole batches per process), so that the Trainer sees a length and the per-epoch schedule, evaluation and
    checkpoints work as with a map-style split.

    Every (process, data worker) reads a disjoint share of the stream (`stream_share`), shuffled by `datasets`
    through a buffer in an order fixed by (seed, epoch) and its share. A worker yields exactly its quota of
    batches, starting its share again if the share is shorter, so every process steps alike under DDP; with
    shards of unequal size an epoch thus repeats a few examples and leaves others for later epochs.

    Resuming mid-epoch, the Trainer skips the batches already trained on; `resume_batches` makes their
    examples placeholders that are read but never decoded. `on_pass_start` runs as an epoch's reading starts,
    in the main process with --workers 0 (exact resumes restore the RNG there, as with a sampler)."""

    on_pass_start: Callable[[], None] | None = None

    def __init__(self, stream: IterableDataset, reader: ExampleReader, *, samples_per_epoch: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(stream, reader)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.batches_per_process = samples_per_epoch // (batch_size * world_size)
        if not self.batches_per_process:
            raise ValueError(f"an epoch of {samples_per_epoch} streamed examples is less than one batch per process "
                             f"({batch_size} x {world_size}): raise --samples-per-epoch or lower --batch-size")
        # Shared with persistent data workers, which keep their own copy of this object between epochs.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.resume_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.batches_per_process * self.batch_size

    def _endless_rows(self, worker: int, workers: int) -> Iterator[tuple[dict[str, Any], int]]:
        share = stream_share(self.stream, self.rank * workers + worker, self.world_size * workers)
        epoch = int(self._epoch)
        while True:
            empty = True
            for row in _rows(share, epoch):
                empty = False
                yield row
            if empty:
                raise ValueError(f"data worker {worker} of process {self.rank} got no examples of the stream "
                                 f"({self.stream.num_shards} shards for {self.world_size * workers} readers): "
                                 f"use fewer --workers")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.on_pass_start is not None:
            self.on_pass_start()
        worker, workers = _worker()
        # The loader takes batches from its workers in turn: worker w makes batches w, w + workers, ...
        quota = _share_of(self.batches_per_process, workers, worker) * self.batch_size
        resumed = _share_of(self.resume_batches, workers, worker) * self.batch_size
        rows = self._endless_rows(worker, workers)
        for position, (encoded, label) in enumerate(islice(rows, quota)):
            if position < resumed:
                yield {RESUME_SKIPPED: True}
            else:
                yield self.reader.read(encoded, label, f"example {position} of process {self.rank}'s worker "
                                                       f"{worker} in epoch {int(self._epoch)}")


class StreamedEvaluationSet(_StreamedExamples):
    """A streamed evaluation split, read whole (or its first `max_samples` examples) at each evaluation, its
    data workers reading disjoint shares. accelerate reads it on the main process and hands every process its
    part of each batch, so that every example is evaluated once."""

    def __init__(self, stream: IterableDataset, reader: ExampleReader, max_samples: int | None = None):
        super().__init__(stream, reader)
        self.max_samples = max_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        quota = None if self.max_samples is None else _share_of(self.max_samples, workers, worker)
        rows = _rows(stream_share(self.stream, worker, workers), epoch=0)
        for position, (encoded, label) in enumerate(islice(rows, quota)):
            yield self.reader.read(encoded, label, f"example {position} of evaluation worker {worker}")


def training_set(args: DataArguments, train: Split, transform: Callable, *, num_classes: int, with_index: bool,
                 batch_size: int, rank: int, world_size: int) -> torch.utils.data.Dataset:
    """The training examples: a map-style split, or a stream cut into epochs (`StreamedTrainingSet`)."""
    if isinstance(train, IterableDataset):
        reader = ExampleReader(transform, num_classes, args.strict_images, "training")
        return StreamedTrainingSet(train, reader, samples_per_epoch=default_samples_per_epoch(args, train),
                                   batch_size=batch_size, rank=rank, world_size=world_size)
    return attach_transform(train, transform, with_index, strict_images=args.strict_images, num_classes=num_classes,
                            split="training")


# ---- transforms, batches, mixing ----

def resolve_data_config_for(args: DataArguments, student: torch.nn.Module, img_size: int | None,
                            source: DatasetSource | None) -> dict[str, Any]:
    """timm's data config of the student, with the flags' and the dataset's overrides."""
    overrides = {"img_size": img_size, "crop_pct": args.crop_pct, "interpolation": args.interpolation or None,
                 "mean": tuple(args.mean) or None, "std": tuple(args.std) or None}
    config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=student)
    if source and source.mean and not args.mean:
        config.update(mean=source.mean, std=source.std)
    if source and source.eval_interpolation and not args.interpolation:
        config["interpolation"] = source.eval_interpolation
    return config


def build_transforms(args: DataArguments, data_config: dict[str, Any]) -> tuple[Callable, Callable]:
    common = {"input_size": data_config["input_size"], "mean": data_config["mean"], "std": data_config["std"]}
    train = create_transform(
        **common, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    evaluation = create_transform(**common, is_training=False, interpolation=data_config["interpolation"],
                                  crop_pct=data_config["crop_pct"])
    return train, evaluation


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks the readable examples (evaluation batches; unreadable images were logged as they were met)."""
    readable = [e for e in examples if e["pixel_values"] is not None]
    if not readable:
        raise ValueError(f"none of the {len(examples)} images of a batch could be read (first: "
                         f"{examples[0]['error']}): check the data")
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in readable]),
             "labels": torch.tensor([e["labels"] for e in readable], dtype=torch.long)}
    if "index" in readable[0]:
        batch["index"] = torch.tensor([e["index"] for e in readable], dtype=torch.long)
    return batch


def collate_training(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`collate`, with `skipped_images`: how many unreadable images the batch lost."""
    if RESUME_SKIPPED in examples[0]:
        return {RESUME_SKIPPED: torch.tensor(len(examples))}
    batch = collate(examples)
    batch[SKIPPED_IMAGES] = torch.tensor(len(examples) - len(batch["labels"]))
    return batch


class SharedSwitchMixup(Mixup):
    """timm's Mixup whose on/off switch (`mixup_enabled`, turned off at --mixup-off-epoch by the main process)
    lives in shared memory, so that persistent data workers, which mix in the collator, see it change."""

    def __init__(self, *args, **kwargs):
        self._enabled = torch.ones((), dtype=torch.bool).share_memory_()
        super().__init__(*args, **kwargs)

    @property
    def mixup_enabled(self) -> bool:
        return bool(self._enabled)

    @mixup_enabled.setter
    def mixup_enabled(self, enabled: bool) -> None:
        self._enabled.fill_(bool(enabled))


@dataclass
class MixupCollator:
    """Collates training batches and mixes them with timm's Mixup/CutMix, which also smooths the labels
    (the reference's collate-time mixing). `mixup_enabled` is switched off at --mixup-off-epoch."""

    mixup: Mixup

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_training(examples)
        if RESUME_SKIPPED in batch:
            return batch
        if len(batch["labels"]) % 2:
            # timm mixes the batch with its mirror image and needs pairs: a batch that lost an odd number of
            # unreadable images loses one more example.
            if len(batch["labels"]) == 1:
                raise ValueError("only one image of a mixup batch could be read: check the data")
            batch = {k: v if k == SKIPPED_IMAGES else v[:-1] for k, v in batch.items()}
        batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"])
        return batch


def mixup_active(args: DataArguments) -> bool:
    return args.mixup > 0 or args.cutmix > 0


def build_mixup(args: DataArguments, num_classes: int, batch_size: int) -> Mixup | None:
    if not mixup_active(args):
        return None
    if batch_size % 2:
        raise ValueError(f"mixup/cutmix needs an even batch size, got --batch-size {batch_size}")
    return SharedSwitchMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                             switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                             num_classes=num_classes)


def build_criterion(args: DataArguments, bce_loss: bool = False) -> torch.nn.Module:
    """The training criterion the reference picks (docs/REFERENCE.md, Data); evaluation always uses plain
    cross-entropy."""
    if mixup_active(args):
        return BinaryCrossEntropy() if bce_loss else SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return BinaryCrossEntropy(smoothing=args.smoothing) if bce_loss else LabelSmoothingCrossEntropy(
            args.smoothing)
    return torch.nn.CrossEntropyLoss()
