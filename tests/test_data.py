import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pat_hf.config.arguments import DataArguments
from pat_hf.data.examples import attach_transform
from pat_hf.data.labels import num_classes_of
from pat_hf.data.sources import load_digits_dataset, load_splits
from pat_hf.data.transforms import build_criterion, build_mixup, build_transforms, collate

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}


def test_digits_split_is_stratified_and_deterministic():
    splits = load_digits_dataset()
    assert (len(splits["train"]), len(splits["validation"])) == (1437, 360)
    assert splits["train"].features["label"].num_classes == 10
    counts = np.bincount(splits["validation"]["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert splits["train"][0]["image"].size == (8, 8)
    assert load_digits_dataset()["train"]["label"][:20] == splits["train"]["label"][:20]


def test_digits_pipeline_gives_rgb_tensors_and_labels():
    train, _, _ = load_splits(DataArguments(dataset="digits", max_train_samples=6))
    train_tf, _ = build_transforms(DataArguments(), DATA_CONFIG)
    batch = collate([attach_transform(train, train_tf, with_index=True)[i] for i in range(6)])
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert batch["labels"].dtype == torch.long
    assert batch["index"].tolist() == list(range(6))


def _image_folder(root, mode: str):
    colors = {"L": 128, "P": 3, "RGBA": (10, 20, 30, 40), "RGB": (1, 2, 3)}
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new(mode, (12, 10), colors[mode]).save(folder / f"{i}.png")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA"])
def test_gray_palette_and_rgba_images_become_rgb(tmp_path, mode):
    _image_folder(tmp_path, mode)
    train, evaluation, _ = load_splits(DataArguments(dataset=str(tmp_path)))
    assert (len(train), len(evaluation), num_classes_of(train)) == (4, 4, 2)
    _, eval_tf = build_transforms(DataArguments(), DATA_CONFIG)
    item = attach_transform(evaluation, eval_tf)[0]
    assert item["pixel_values"].shape == (3, 32, 32)


def test_save_to_disk_directory_with_named_columns(tmp_path):
    images = [Image.new("RGB", (8, 8), (i, i, i)) for i in range(4)]
    split = datasets.Dataset.from_dict({"picture": images, "target": [0, 1, 2, 1]})
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "saved"))
    args = DataArguments(dataset=str(tmp_path / "saved"), image_column="picture", label_column="target")
    train, evaluation, _ = load_splits(args)
    assert train.column_names == ["image", "label"] and len(evaluation) == 4
    assert num_classes_of(train) == 3


def test_missing_column_is_named(tmp_path):
    split = datasets.Dataset.from_dict({"picture": [Image.new("RGB", (8, 8))], "target": [0]})
    datasets.DatasetDict(train=split, validation=split).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="no column 'img'.*columns: picture, target.*--image-column"):
        load_splits(DataArguments(dataset=str(tmp_path / "saved"), image_column="img"))


def test_hub_dataset_offline_fails_in_one_line():
    with pytest.raises(ConnectionError, match="cannot load dataset 'uoft-cs/cifar100'.*go online") as error:
        load_splits(DataArguments(dataset="cifar100"))
    assert "\n" not in str(error.value)


def test_odd_batch_with_mixup_is_refused():
    with pytest.raises(ValueError, match="even batch size, got --batch-size 7"):
        build_mixup(DataArguments(mixup=0.8), num_classes=10, batch_size=7)


def test_criterion_follows_the_reference_rule():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    assert isinstance(build_criterion(DataArguments(mixup=0.8)), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(DataArguments(smoothing=0.1)), LabelSmoothingCrossEntropy)
    assert isinstance(build_criterion(DataArguments(smoothing=0.0)), torch.nn.CrossEntropyLoss)


def test_mixup_collator_mixes_and_smooths_training_batches():
    from pat_hf.data.transforms import MixupCollator
    from pat_hf.training.callbacks import MixupOffCallback

    mixup = build_mixup(DataArguments(mixup=0.8, cutmix=1.0, smoothing=0.1), num_classes=10, batch_size=4)
    examples = [{"pixel_values": torch.full((3, 8, 8), float(i)), "labels": i} for i in range(4)]
    batch = MixupCollator(mixup)(examples)
    assert batch["labels"].shape == (4, 10)
    assert torch.allclose(batch["labels"].sum(dim=1), torch.ones(4))
    assert batch["labels"].max() < 1.0  # smoothed, and mixed
    callback = MixupOffCallback(mixup, off_epoch=2)
    callback.on_epoch_begin(None, type("State", (), {"epoch": 1.0})(), None)
    assert mixup.mixup_enabled
    callback.on_epoch_begin(None, type("State", (), {"epoch": 2.0})(), None)
    unmixed = MixupCollator(mixup)(examples)
    assert torch.equal(unmixed["pixel_values"], torch.stack([e["pixel_values"] for e in examples]))
    assert torch.allclose(unmixed["labels"].argmax(dim=1), torch.arange(4))


def test_digits_are_normalised_with_their_own_statistics_for_every_model():
    """A teacher and a student with different timm defaults (ImageNet vs 0.5 mean/std) must see the same input."""
    from pat_hf.data.transforms import resolve_data_config_for
    from pat_hf.models.factory import create_model

    _, _, source = load_splits(DataArguments(dataset="digits", max_train_samples=1, max_eval_samples=1))
    configs = [resolve_data_config_for(DataArguments(dataset="digits"), create_model(name, 10, kwargs), 32, source)
               for name, kwargs in (("resnet10t", {}), ("test_vit", {"img_size": 32, "patch_size": 4}))]
    assert configs[0]["mean"] == configs[1]["mean"] == (0.3053,) * 3
    assert configs[0]["std"] == configs[1]["std"] == (0.3759,) * 3


def encoded_images(split: datasets.Dataset) -> list[bytes]:
    return [e["bytes"] for e in split.cast_column("image", datasets.Image(decode=False))["image"]]


def test_max_samples_draw_a_seeded_random_subset_not_the_first_rows():
    args = DataArguments(dataset="digits", max_train_samples=20, max_eval_samples=10)
    full_train, full_eval, _ = load_splits(DataArguments(dataset="digits"))
    train, evaluation, _ = load_splits(args, seed=1)
    assert (len(train), len(evaluation)) == (20, 10)
    assert encoded_images(train) != encoded_images(full_train.select(range(20)))
    assert set(encoded_images(evaluation)) <= set(encoded_images(full_eval))
    assert encoded_images(load_splits(args, seed=1)[0]) == encoded_images(train)
    assert encoded_images(load_splits(args, seed=2)[0]) != encoded_images(train)


def test_class_counts_and_crd_labels_come_from_the_label_column_alone(monkeypatch):
    from pat_hf.data.labels import resolve_num_classes, train_labels_of

    split = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 4, "label": [0, 4, 2, 4]})
    digits, _, _ = load_splits(DataArguments(dataset="digits"))

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(datasets.Image, "decode_example", refuse)
    assert num_classes_of(split) == 5 and num_classes_of(digits) == 10
    assert train_labels_of(split).tolist() == [0, 4, 2, 4]
    assert len(train_labels_of(digits)) == 1437
    labels = digits.select_columns(["label"])
    assert train_labels_of(digits.select([7, 3])).tolist() == [labels[7]["label"], labels[3]["label"]]
    with pytest.raises(ValueError, match="--num-classes 3 is fewer than the 5 classes"):
        resolve_num_classes(split, 3)


def test_a_data_dir_copy_of_a_known_dataset_keeps_its_columns_and_statistics(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "coarse_label": datasets.ClassLabel(names=["x", "y"]),
                                  "fine_label": datasets.ClassLabel(names=["a", "b", "c"])})
    rows = {"img": [Image.new("RGB", (4, 4))] * 3, "coarse_label": [0, 1, 0], "fine_label": [0, 1, 2]}
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    train, evaluation, source = load_splits(DataArguments(dataset="cifar100", data_dir=str(tmp_path)))
    assert source.mean == (0.5071, 0.4865, 0.4409)
    assert num_classes_of(train) == 3 and train.column_names == ["image", "label"] and len(evaluation) == 3


def test_workers_default_to_the_cpu_share_of_each_local_process(monkeypatch):
    from pat_hf.cli.parser import parse_arguments
    from pat_hf.config.arguments import MAX_AUTO_WORKERS, auto_num_workers

    for cores, processes, expected in ((16, 1, MAX_AUTO_WORKERS), (16, 8, 1), (2, 1, 1), (1, 1, 0), (4, 8, 0)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, cores=cores: set(range(cores)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert auto_num_workers() == expected, (cores, processes)
        assert auto_num_workers(on_gpu=False) == 0
    monkeypatch.setattr("pat_hf.config.arguments.auto_num_workers", lambda on_gpu: 3 if on_gpu else 0)
    training = parse_arguments([]).training
    assert training.dataloader_num_workers == (3 if torch.cuda.is_available() else 0)
    assert training.dataloader_persistent_workers == torch.cuda.is_available()
    assert parse_arguments(["--workers", "2"]).training.dataloader_persistent_workers
    assert not parse_arguments(["--workers", "2", "--dataloader_persistent_workers", "false"]
                               ).training.dataloader_persistent_workers


def test_mixup_off_reaches_persistent_workers():
    from torch.utils.data import DataLoader

    from pat_hf.data.transforms import MixupCollator

    mixup = build_mixup(DataArguments(mixup=1.0, smoothing=0.0), num_classes=4, batch_size=4)
    examples = [{"pixel_values": torch.full((3, 2, 2), float(i)), "labels": i} for i in range(4)]
    loader = DataLoader(examples, batch_size=4, num_workers=1, persistent_workers=True,
                        collate_fn=MixupCollator(mixup))
    assert next(iter(loader))["labels"].max() < 1.0
    mixup.mixup_enabled = False
    batch = next(iter(loader))
    assert torch.equal(batch["labels"], torch.eye(4)) and batch["pixel_values"][:, 0, 0, 0].tolist() == [0, 1, 2, 3]
