"""--streaming: epochs of a fixed length, disjoint shares per process and data worker, a shuffle that follows the
epoch, and resumes that continue where the interrupted run was (exactly with --workers 0)."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pat_hf.cli import train as pat_train
from pat_hf.config.arguments import DataArguments
from pat_hf.data.decoding import RESUME_SKIPPED, ExampleReader
from pat_hf.data.examples import attach_transform
from pat_hf.data.sources import load_splits
from pat_hf.data.streaming import StreamedEvaluationSet, StreamedTrainingSet, default_samples_per_epoch
from tests.helpers import STUDENT, run_two_processes, save_teacher, tiny_run

TRAIN_SHARDS, PER_SHARD = 4, 10


def red(image: Image.Image) -> torch.Tensor:
    """An example's identity: its images are uniform, their red value is the example's number."""
    return torch.tensor(image.getpixel((0, 0))[0])


READER = ExampleReader(red, num_classes=3)


@pytest.fixture(autouse=True)
def _no_parquet_shutdown_pause(monkeypatch):
    # datasets pauses 5 s whenever a shuffled parquet stream's reader threads stop (an Arrow shutdown bug,
    # apache/arrow#45214): once per epoch and data worker in a real run, but at every read in these tests.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory) -> Path:
    """40 training examples in 4 parquet shards (numbered 0..39 by their red value) and 10 for evaluation."""
    root = tmp_path_factory.mktemp("parquet")
    (root / "data").mkdir()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    for split, shards, offset in (("train", TRAIN_SHARDS, 0), ("validation", 1, 100)):
        for shard in range(shards):
            numbers = range(offset + shard * PER_SHARD, offset + (shard + 1) * PER_SHARD)
            part = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (n, 0, 0)) for n in numbers],
                                               "label": [n % 3 for n in numbers]}, features=features)
            part.to_parquet(str(root / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"))
    return root


def streams(folder: Path, **options) -> tuple[datasets.IterableDataset, datasets.IterableDataset]:
    train, evaluation, _ = load_splits(DataArguments(dataset=str(folder), streaming=True, shuffle_buffer_size=8,
                                                     **options), seed=0)
    return train, evaluation


def numbers_of(examples) -> list[int]:
    return [int(e["pixel_values"]) for e in examples]


def epoch_numbers(stream: StreamedTrainingSet, epoch: int, workers: int = 0) -> list[int]:
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=numbers_of)
    return [n for batch in loader for n in batch]


def test_local_parquet_streams_and_needs_a_samples_per_epoch(parquet_folder):
    train, evaluation = streams(parquet_folder)
    assert isinstance(train, datasets.IterableDataset) and train.num_shards == TRAIN_SHARDS
    assert list(train.features) == ["image", "label"]
    with pytest.raises(ValueError, match="does not say how many examples.*--samples-per-epoch N"):
        default_samples_per_epoch(DataArguments(streaming=True), train)
    assert default_samples_per_epoch(DataArguments(streaming=True, samples_per_epoch=24), train) == 24
    assert sorted(numbers_of(attach_transform(evaluation, red))) == list(range(100, 110))


def test_a_known_split_size_is_the_default_epoch_and_max_train_samples_caps_it():
    train, _, _ = load_splits(DataArguments(dataset="digits", streaming=True))
    assert default_samples_per_epoch(DataArguments(streaming=True), train) == 1437
    assert default_samples_per_epoch(DataArguments(streaming=True, max_train_samples=64), train) == 64


def test_an_epoch_is_samples_per_epoch_in_whole_batches_per_process(parquet_folder):
    train, _ = streams(parquet_folder)
    stream = StreamedTrainingSet(train, READER, samples_per_epoch=30, batch_size=4, rank=0, world_size=2)
    assert stream.batches_per_process == 3 and len(stream) == 12
    assert len(epoch_numbers(stream, 0)) == 12
    with pytest.raises(ValueError, match="less than one batch per process"):
        StreamedTrainingSet(train, READER, samples_per_epoch=7, batch_size=4, world_size=2)


@pytest.mark.parametrize("world_size, workers", [(2, 0), (2, 2), (3, 0)])
def test_processes_and_workers_read_disjoint_shares(parquet_folder, world_size, workers):
    """4 shards: whole shards per reader for 2 or 4 readers, unequal ones for 3 (one reader starts its single
    shard again rather than fall short of its quota)."""
    train, _ = streams(parquet_folder)
    per_rank = []
    for rank in range(world_size):
        stream = StreamedTrainingSet(train, READER, samples_per_epoch=8 * world_size, batch_size=2, rank=rank,
                                     world_size=world_size)
        per_rank.append(epoch_numbers(stream, 0, workers))
    assert all(len(numbers) == 8 for numbers in per_rank)
    for rank, numbers in enumerate(per_rank):
        others = {n for other, seen in enumerate(per_rank) if other != rank for n in seen}
        assert not set(numbers) & others
    assert {n for numbers in per_rank for n in numbers} <= set(range(40))


def test_fewer_shards_than_readers_split_the_examples(parquet_folder):
    _, evaluation = streams(parquet_folder)  # one shard
    shares = [numbers_of(StreamedTrainingSet(evaluation, READER, samples_per_epoch=10, batch_size=5, rank=r,
                                             world_size=2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(100, 110))


def test_the_shuffle_follows_the_epoch_and_is_repeatable(parquet_folder):
    train, _ = streams(parquet_folder)
    stream = StreamedTrainingSet(train, READER, samples_per_epoch=40, batch_size=4)
    first, again, second = epoch_numbers(stream, 0), epoch_numbers(stream, 0), epoch_numbers(stream, 1)
    assert first == again
    assert first != second and sorted(first) == sorted(second) == list(range(40))


def test_persistent_workers_see_the_new_epoch(parquet_folder):
    train, _ = streams(parquet_folder)
    stream = StreamedTrainingSet(train, READER, samples_per_epoch=40, batch_size=4)
    expected = [epoch_numbers(stream, epoch) for epoch in (0, 1)]
    loader = DataLoader(stream, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=numbers_of)
    seen = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        seen.append([n for batch in loader for n in batch])
    assert seen == expected


def test_a_resumed_epoch_passes_over_its_trained_batches_without_decoding(parquet_folder):
    train, _ = streams(parquet_folder)
    decoded = []

    def counting_red(image):
        decoded.append(1)
        return red(image)

    stream = StreamedTrainingSet(train, ExampleReader(counting_red), samples_per_epoch=40, batch_size=4)
    for workers in (0, 2):
        uninterrupted = epoch_numbers(stream, 1, workers)
        stream.resume_batches = 3
        decoded.clear()
        stream.set_epoch(1)
        loader = DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=lambda batch: batch)
        batches = list(loader)
        stream.resume_batches = 0
        assert all(RESUME_SKIPPED in e for batch in batches[:3] for e in batch)
        assert [int(e["pixel_values"]) for batch in batches[3:] for e in batch] == uninterrupted[12:]
        if workers == 0:
            assert len(decoded) == 40 - 12


def test_evaluation_stream_reads_every_example_once_or_a_subset(parquet_folder):
    _, evaluation = streams(parquet_folder)
    loader = DataLoader(StreamedEvaluationSet(evaluation, READER), batch_size=3, num_workers=2,
                        collate_fn=numbers_of)
    assert sorted(n for batch in loader for n in batch) == list(range(100, 110))
    subset = numbers_of(StreamedEvaluationSet(evaluation, READER, max_samples=4))
    assert len(subset) == 4 and set(subset) <= set(range(100, 110))


def test_streamed_labels_outside_the_classes_stop_the_run(parquet_folder):
    train, _ = streams(parquet_folder)
    stream = StreamedTrainingSet(train, ExampleReader(red, num_classes=2), samples_per_epoch=40, batch_size=4)
    with pytest.raises(ValueError, match="label 2 of .* is outside 0..1"):
        epoch_numbers(stream, 0)


def streaming_run(output_dir: Path, folder: Path, *extra: str) -> list[str]:
    return [*STUDENT, "--teacher", "", "--distiller", "vanilla", "--dataset", str(folder), "--streaming",
            "--samples-per-epoch", "32", "--shuffle-buffer-size", "8", "--batch-size", "8", "--epochs", "2",
            "--warmup-epochs", "1", "--lr", "0.001", "--opt", "adamw", "--smoothing", "0", "--workers", "0",
            "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(output_dir),
            *extra]


def test_streaming_run_steps_by_epoch_and_resumes_mid_epoch_exactly(tmp_path, parquet_folder):
    """32 examples per epoch in batches of 8: 4 steps an epoch, the per-epoch schedule and summary rows of a
    map-style run; resumed from step 6 (mid-epoch 2) it ends with the uninterrupted run's weights."""
    checkpointing = ("--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3")
    pat_train.main(streaming_run(tmp_path / "straight", parquet_folder, *checkpointing))
    state = json.loads((tmp_path / "straight" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["max_steps"] == 8 and state["global_step"] == 8
    rows = (tmp_path / "straight" / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1.0", "2.0"]
    lrs = {log["epoch"]: log["learning_rate"] for log in state["log_history"] if "learning_rate" in log}
    assert len({lr for epoch, lr in lrs.items() if epoch <= 1}) == 1  # stepped per epoch, as timm does

    shutil.copytree(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    pat_train.main([*streaming_run(tmp_path / "resumed", parquet_folder, *checkpointing), "--resume"])
    straight = load_file(str(tmp_path / "straight" / "checkpoint-8" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "checkpoint-8" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_streaming_refuses_distillers_that_index_the_training_set(tmp_path, parquet_folder):
    with pytest.raises(ValueError, match="--distiller crd needs the index and label.*drop --streaming"):
        pat_train.main([*streaming_run(tmp_path, parquet_folder), "--distiller", "crd"])
    assert not tmp_path.joinpath("args.yaml").exists()


def test_streaming_only_options_need_streaming():
    with pytest.raises(ValueError, match="--samples-per-epoch is for --streaming runs"):
        DataArguments(samples_per_epoch=10)
    with pytest.raises(ValueError, match="--aug-repeats repeats indices"):
        DataArguments(streaming=True, aug_repeats=3)


def test_two_processes_stream_disjoint_shares_and_end_alike(tmp_path):
    """Real gloo DDP: each process reads its own share of the digits stream, every process takes the same number
    of steps, the evaluation stream is read once and dispatched, and the students stay identical."""
    teacher = save_teacher(tmp_path)
    output = tmp_path / "run"
    flags = tiny_run(output, teacher, "--distiller", "kd", "--streaming", samples=96)
    result = run_two_processes(flags)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(output / f"student_rank{r}_of_2.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # 96 streamed examples / (2 processes x 16)
    assert np.isfinite(state["log_history"][-1]["train_loss"])


def test_a_hub_stream_offline_fails_in_one_line():
    with pytest.raises(ConnectionError, match="cannot load dataset 'ILSVRC/imagenet-1k'.*go online") as error:
        load_splits(DataArguments(dataset="imagenet-1k", streaming=True))
    assert "\n" not in str(error.value)
