"""Where the data comes from: the known datasets (digits shipped offline, CIFAR-100, ImageNet), local
folders, `save_to_disk` directories and Hub datasets, loaded through `datasets` as a train and an evaluation
split with two columns, `image` and `label`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset
from PIL import Image

from pat_hf.config.arguments import DataArguments

logger = logging.getLogger("pat_hf")

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
EVAL_SPLIT_CANDIDATES = ("validation", "val", "valid", "test")
# Shards a map-style split is cut into when it is streamed (--streaming with digits or a save_to_disk folder).
LOCAL_STREAM_SHARDS = 64
# Files that `datasets` reads as tables (a folder holding any is loaded by format, not as an image tree).
DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tar")
# The folder names `datasets` reads as the splits of an image folder, by split.
TRAIN_FOLDERS = ("train", "training")
EVAL_FOLDERS = ("validation", "valid", "dev", "val", "test", "testing", "eval", "evaluation")
# A string label column of a map-style split is mapped to class indices through a ClassLabel of its sorted names.
STRING_DTYPES = ("string", "large_string")


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


def _visible_folders(folder: str) -> list[os.DirEntry]:
    # `datasets` skips hidden files and folders (.ipynb_checkpoints, ...).
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if e.is_dir() and not e.name.startswith((".", "__"))), key=lambda e: e.name)


def _classes_of(split_folder: str) -> set[str]:
    """The class folders of one split that hold images. `datasets` labels an image by the folder it lies in, so an
    image in a sub-folder of a class would be given the sub-folder's name: refused, naming it."""
    classes = set()
    for class_folder in _visible_folders(split_folder):
        with os.scandir(class_folder.path) as entries:
            children = list(entries)
        nested = [e for e in children if e.is_dir() and not e.name.startswith((".", "__"))]
        if nested:
            raise ValueError(f"{nested[0].path} is a folder inside the class folder {class_folder.path}: its images "
                             f"would be labelled {nested[0].name!r}, not {class_folder.name!r}; keep one level of "
                             f"class folders (SPLIT/CLASS/*.jpg): move its images up or make it a class of its own")
        if any(e.is_file() and not e.name.startswith(".") for e in children):
            classes.add(class_folder.name)
    return classes


def check_class_folders(folder: str) -> None:
    """The classes of an image folder are the names of its class folders, in every split alike: an evaluation
    split with a class the training split lacks (or spells otherwise: names are case-sensitive) would score the
    student on classes it never saw, and is refused; one that lacks some classes is scored on the others, as
    the log says."""
    splits = _visible_folders(folder)
    train = next((e for e in splits if e.name.lower() in TRAIN_FOLDERS), None)
    if train is None:  # no split folders: the folder is the training split, its sub-folders the classes
        _classes_of(folder)
        return
    train_classes = _classes_of(train.path)
    for split in (e for e in splits if e.name.lower() in EVAL_FOLDERS):
        classes = _classes_of(split.path)
        unknown = sorted(classes - train_classes)
        if unknown:
            by_case = {name.lower(): name for name in train_classes}
            cased = [f"{name!r} (train has {by_case[name.lower()]!r})" for name in unknown if name.lower() in by_case]
            hint = f"; class names are case-sensitive: {', '.join(cased[:3])}" if cased else ""
            raise ValueError(f"{split.path} has class folder(s) {', '.join(map(repr, unknown[:5]))} that {train.path} "
                             f"has not{hint}: give every class the same folder name in both splits (or remove the "
                             f"classes the student cannot learn)")
        absent = sorted(train_classes - classes)
        if absent:
            logger.warning("%s has no images of %d of the %d classes (%s): it scores the student on the others",
                        split.path, len(absent), len(train_classes), ", ".join(absent[:10]))


def _load_folder(folder: str, streaming: bool) -> DatasetDict | datasets.IterableDatasetDict:
    # One sub-folder per class. A lone class keeps its label (datasets would drop it), so that the check of the
    # classes can say what is wrong.
    images = not _holds_data_files(folder)
    if images:
        check_class_folders(folder)
    options = {"path": "imagefolder", "data_dir": folder, "drop_labels": False} if images else {}
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
    if what == "label":  # a plain column of that name: integers, or class names mapped by `_encode_string_labels`
        typed = typed or [c for c in ("label", "labels") if c in columns]
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


def _encode_string_labels(train: Split, evaluation: Split, column: str) -> tuple[Split, Split]:
    """A label column of class names (strings) mapped to indices through a ClassLabel of the training split's
    sorted names, which the exported student then carries as its label_names."""
    feature = train.features["label"]
    if not (isinstance(feature, datasets.Value) and feature.dtype in STRING_DTYPES):
        return train, evaluation
    if isinstance(train, IterableDataset) or isinstance(evaluation, IterableDataset):
        raise ValueError(f"the label column {column!r} holds class names (strings), which a stream cannot map to "
                         f"class indices before reading it all: drop --streaming, or save the dataset with "
                         f"dataset.class_encode_column({column!r})")
    names = sorted(train.unique("label"))
    unknown = sorted(set(evaluation.unique("label")) - set(names))
    if unknown:
        shown = ", ".join(map(repr, unknown[:5]))
        raise ValueError(f"the evaluation split has labels the training split has not ({shown} in column "
                         f"{column!r}): the student cannot learn them; fix the labels or the splits")
    labels = ClassLabel(names=names)
    logger.info("label column %r holds class names: mapped to %d classes in sorted order (%s)", column, len(names),
                ", ".join(names[:10]))
    return train.cast_column("label", labels), evaluation.cast_column("label", labels)


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
    selected = []
    for name in (args.train_split, eval_split):
        split = splits[name].select_columns([image_column, label_column])
        split = split.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
        if isinstance(split, Dataset) and not len(split):
            raise ValueError(f"the {name!r} split of {args.dataset} is empty; pass a split with examples")
        selected.append(split)
    # Class names are mapped on the whole splits, so that a subset (or another run's) gets the same indices.
    train, evaluation = _encode_string_labels(*selected, label_column)
    normalised = []
    for name, split, limit in ((args.train_split, train, args.max_train_samples),
                               (eval_split, evaluation, args.max_eval_samples)):
        if isinstance(split, Dataset):
            split = _as_stream(split, name) if args.streaming else random_subset(split, limit or len(split), seed)
        normalised.append(split)
    train, evaluation = normalised
    if args.streaming:
        train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        if args.max_eval_samples:
            evaluation = evaluation.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
    return train, evaluation, source
