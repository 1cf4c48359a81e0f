"""Bad data (issue 9's DATA rows): each case continues correctly or stops with one line naming the problem
and what to do, before anything is written; images of every mode become the right RGB pixels."""

import csv
import io
import json
import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pat_hf.cli import train as pat_train
from pat_hf.config.arguments import DataArguments
from pat_hf.data.decoding import SKIPPED_IMAGES, ExampleReader
from pat_hf.data.examples import attach_transform
from pat_hf.data.labels import check_labels, resolve_num_classes
from pat_hf.data.sources import load_splits
from pat_hf.data.transforms import MixupCollator, build_mixup, collate, collate_training
from tests.helpers import STUDENT, save_teacher

BAD_IMAGES = ("broken.png", "notes.png")  # a truncated PNG, and text named like an image


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, bad_in: str | None = None) -> Path:
    for split in ("train", "val"):
        for number, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 10), (40 * number, 10 * i, 100)).save(folder / f"{i}.png")
    if bad_in:
        encoded = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(encoded, "PNG")
        (root / "train" / bad_in / BAD_IMAGES[0]).write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
        (root / "train" / bad_in / BAD_IMAGES[1]).write_text("not an image")
    return root


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(datasets.Image, "decode_example", refuse)


# ---- missing folders and splits, empty splits, classes and labels ----

@pytest.mark.parametrize("name", ["./nowhere", "~/pat-hf-no-such-folder", "/no/such/folder", "data/imagenet/train"])
def test_a_path_that_does_not_exist_is_a_missing_folder_not_a_hub_name(name):
    with pytest.raises(FileNotFoundError, match="dataset directory not found: .*pass an existing folder") as error:
        load_splits(DataArguments(dataset=name))
    assert "\n" not in str(error.value) and "~" not in str(error.value)


def test_a_missing_data_dir_and_an_unknown_hub_name_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        load_splits(DataArguments(data_dir=str(tmp_path / "absent")))
    with pytest.raises(ConnectionError, match="'someone/images' from the Hugging Face Hub.*no local folder"):
        load_splits(DataArguments(dataset="someone/images"))


def test_missing_splits_are_named(tmp_path):
    write_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(ValueError, match="no evaluation split among train; pass --val-split NAME"):
        load_splits(DataArguments(dataset=str(tmp_path)))
    with pytest.raises(ValueError, match="no split 'training' in the dataset .*pass --train-split NAME"):
        load_splits(DataArguments(dataset=str(tmp_path), train_split="training"))
    with pytest.raises(ValueError, match="no split 'test' .*pass --val-split NAME"):
        load_splits(DataArguments(dataset=str(tmp_path), val_split="test"))


def test_a_folder_without_images_and_an_empty_split_are_named(tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found in .*empty: lay it out as train/CLASS"):
        load_splits(DataArguments(dataset=str(tmp_path / "empty")))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    some = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "label": [1]}, features=features)
    none = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    datasets.DatasetDict(train=none, validation=some).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="a split of .*saved is empty; give every split examples"):
        load_splits(DataArguments(dataset=str(tmp_path / "saved")))
    (tmp_path / "parquet").mkdir()
    none.to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    some.to_parquet(str(tmp_path / "parquet" / "validation.parquet"))
    with pytest.raises(ValueError, match="a split of .*parquet is empty; give every split examples"):
        load_splits(DataArguments(dataset=str(tmp_path / "parquet")))


def tiny_flags(dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*STUDENT, "--teacher", "", "--distiller", "vanilla", "--dataset", str(dataset), "--batch-size", "4",
            "--epochs", "1", "--opt", "adamw", "--lr", "1e-3", "--workers", "0", "--report_to", "none",
            "--disable_tqdm", "true", "--output_dir", str(output_dir), *extra]


@pytest.mark.parametrize("layout", ["one class folder", "no class folders"])
def test_one_class_stops_the_run_before_anything_is_written(tmp_path, layout):
    if layout == "one class folder":
        data, only = write_image_folder(tmp_path / "data", classes=("cat",)), "'cat'"
    else:
        data, only = tmp_path / "data", "'train'"
        for split in ("train", "val"):
            (data / split).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8)).save(data / split / f"{i}.png")
    with pytest.raises(ValueError, match=f"needs at least 2 classes, but every training example is of class {only}"
                                         f": give each class a sub-folder"):
        pat_train.main(tiny_flags(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def labelled(labels: list[int], names=("a", "b")) -> datasets.Dataset:
    split = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * len(labels), "label": labels})
    return split.cast_column("label", datasets.ClassLabel(names=list(names)))


def test_labels_outside_the_classes_are_found_from_the_label_column_alone(tmp_path, monkeypatch):
    datasets.DatasetDict(train=labelled([0, 1, 0, 1]), test=labelled([-1, -1, -1])).save_to_disk(str(tmp_path / "a"))
    datasets.DatasetDict(train=labelled([0, 1, 3, 1]), test=labelled([0, 1])).save_to_disk(str(tmp_path / "b"))
    no_decoding(monkeypatch)
    train, evaluation, _ = load_splits(DataArguments(dataset=str(tmp_path / "a")))
    num_classes = resolve_num_classes(train, None)
    with pytest.raises(ValueError, match=r"the evaluation split has 3 label\(s\) outside 0..1 \(first: -1 at row 0; "
                                         r"-1 usually marks unlabelled examples\): use a labelled split"):
        check_labels(train, evaluation, num_classes)
    train, evaluation, _ = load_splits(DataArguments(dataset=str(tmp_path / "b")))
    with pytest.raises(ValueError, match=r"the training split has 1 label\(s\) outside 0..1 .first: 3 at row 2"):
        check_labels(train, evaluation, resolve_num_classes(train, None))
    check_labels(train, evaluation, 4)  # --num-classes 4 covers label 3


def test_unlabelled_evaluation_split_stops_the_run_before_anything_is_written(tmp_path):
    datasets.DatasetDict(train=labelled([0, 1, 0, 1]), test=labelled([-1, -1])).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError, match="outside 0..1"):
        pat_train.main(tiny_flags(tmp_path / "data", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---- unreadable images ----

def test_unreadable_images_are_skipped_counted_and_logged(tmp_path, caplog):
    data = write_image_folder(tmp_path, bad_in="dog")
    train, _, _ = load_splits(DataArguments(dataset=str(data)))
    examples = attach_transform(train, pixels, split="training")
    with caplog.at_level(logging.WARNING, logger="pat_hf.data"):
        batch = collate_training(examples.__getitems__(list(range(len(examples)))))
    assert batch[SKIPPED_IMAGES].item() == 2 and batch["labels"].tolist() == [0] * 4 + [1] * 4
    assert batch["pixel_values"].shape == (8, 10, 12, 3)
    warnings = [r.getMessage() for r in caplog.records]
    assert any(BAD_IMAGES[0] in w and "image file is truncated" in w for w in warnings)
    assert any(BAD_IMAGES[1] in w and "not an image file" in w for w in warnings)
    assert SKIPPED_IMAGES not in collate(examples.__getitems__([0, 1]))  # evaluation batches carry no count


@pytest.mark.parametrize("bad, problem", [(BAD_IMAGES[0], "image file is truncated"),
                                          (BAD_IMAGES[1], "not an image file")])
def test_strict_images_stop_at_the_unreadable_file_naming_it(tmp_path, bad, problem):
    data = write_image_folder(tmp_path, bad_in="cat")
    train, _, _ = load_splits(DataArguments(dataset=str(data)))
    examples = attach_transform(train, pixels, strict_images=True, split="training")
    row = next(i for i, e in enumerate(train.cast_column("image", datasets.Image(decode=False))["image"])
               if e["path"].endswith(bad))
    with pytest.raises(ValueError, match=f"unreadable image .*{bad} .{problem}.*drop --strict-images") as error:
        examples[row]
    assert "\n" not in str(error.value)


def test_a_mixup_batch_that_lost_an_odd_number_of_images_stays_even():
    mixup = build_mixup(DataArguments(mixup=0.8, smoothing=0.1), num_classes=10, batch_size=4)
    examples = [{"pixel_values": torch.full((3, 4, 4), float(i)), "labels": i} for i in range(3)]
    examples.append({"pixel_values": None, "labels": 3, "error": "row 3: not an image file"})
    batch = MixupCollator(mixup)(examples)
    assert batch["pixel_values"].shape[0] == batch["labels"].shape[0] == 2
    assert batch[SKIPPED_IMAGES].item() == 1


def test_a_batch_with_no_readable_image_is_an_error():
    examples = [{"pixel_values": None, "labels": 0, "error": "a.png: not an image file"}] * 2
    with pytest.raises(ValueError, match=r"none of the 2 images of a batch could be read \(first: a.png: not an "
                                         r"image file\): check the data"):
        collate(examples)


def test_a_run_with_bad_images_trains_counts_them_and_resumes(tmp_path):
    """PAT with mixup on 16 training images of which 2 are unreadable: batches of 8 lose one or two (and mixup's
    pairing one more), PAT's feedback meets the smaller batches, each epoch counts 2 skipped images in the logs
    and summary.csv, and --resume of that run goes through the bad images again. --strict-images stops the
    resumed run at the first one, naming it, and leaves the checkpoint as it was."""
    data = write_image_folder(tmp_path / "data", per_class=7, bad_in="dog")
    teacher = save_teacher(tmp_path, num_classes=2)
    flags = [*STUDENT, "--teacher", "test_resnet", "--teacher-pretrained", teacher, "--distiller", "pat",
             "--pat-raa-dim", "32", "--pat-raa-num-queries", "16", "--dataset", str(data), "--batch-size", "8",
             "--epochs", "2", "--warmup-epochs", "1", "--opt", "adamw", "--lr", "1e-3", "--mixup", "0.8",
             "--logging_steps", "1", "--workers", "0", "--report_to", "none", "--disable_tqdm", "true"]
    pat_train.main([*flags, "--output_dir", str(tmp_path / "run")])
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        assert [int(row["skipped_images"]) for row in csv.DictReader(f)] == [2, 2]
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    logged = {log["step"]: log["skipped_images"] for log in state["log_history"] if "skipped_images" in log}
    assert sorted(logged) == [1, 2, 3, 4] and logged[1] + logged[2] == logged[3] + logged[4] == 2

    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "resumed" / "checkpoint-2").iterdir())
    with pytest.raises(ValueError, match=r"unreadable image .*dog/(broken|notes)\.png"):
        pat_train.main([*flags, "--output_dir", str(tmp_path / "resumed"), "--resume", "--strict-images"])
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "resumed" / "checkpoint-2").iterdir()) == before

    pat_train.main([*flags, "--output_dir", str(tmp_path / "resumed"), "--resume"])
    with open(tmp_path / "resumed" / "summary.csv", newline="") as f:
        assert [(row["epoch"], int(row["skipped_images"])) for row in csv.DictReader(f)] == [("2.0", 2)]


# ---- every image mode to the right RGB pixels ----

def mode_images() -> dict[str, tuple[Image.Image, list[tuple[int, int, int]]]]:
    """Images of one row and the RGB pixels they must become."""
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # red is see-through
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 255), (10, 20, 30, 0), (200, 100, 50, 128)])
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)])
    grey_alpha = Image.new("LA", (2, 1))
    grey_alpha.putdata([(100, 255), (100, 0)])
    sixteen = Image.fromarray(np.array([[0, 300, 40000, 65535]], dtype=np.uint16))
    return {
        "grey.png": (Image.new("L", (2, 1), 128), [(128, 128, 128)] * 2),
        "palette.png": (palette, [(255, 255, 255), (0, 255, 0)]),
        "rgba.png": (rgba, [(10, 20, 30), (255, 255, 255), (227, 177, 152)]),
        "cmyk.tiff": (cmyk, [(0, 255, 255), (0, 0, 0), (255, 255, 255)]),
        "grey_alpha.png": (grey_alpha, [(100, 100, 100), (255, 255, 255)]),
        # PIL's own conversion clips 16-bit values to 255: 300 and 40000 would both be white.
        "sixteen_bit.png": (sixteen, [(0, 0, 0), (1, 1, 1), (156, 156, 156), (255, 255, 255)]),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_every_image_mode_becomes_the_right_rgb_pixels(tmp_path, name):
    image, expected = mode_images()[name]
    image.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == image.mode or name == "sixteen_bit.png"
    example = ExampleReader(pixels).read({"path": str(tmp_path / name), "bytes": None}, 0, "row 0")
    rgb = example["pixel_values"]
    assert rgb.shape == (1, len(expected), 3)
    assert (rgb[0].int() - torch.tensor(expected)).abs().max() <= 1, rgb[0].tolist()
