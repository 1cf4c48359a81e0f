"""The training loader of a streamed split (`--streaming`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import TrainingArguments
from transformers.trainer_utils import seed_worker

from pat_hf.data.streaming import StreamedTrainingSet


def streamed_training_loader(stream: StreamedTrainingSet, batch_size: int, collate: Callable,
                             args: TrainingArguments) -> DataLoader:
    """The stream already splits itself between processes and workers: accelerate places the batches on the
    device but must not shard the stream again (it would keep a 1/processes of each process's share) nor read
    it on one process and dispatch it."""
    workers = args.dataloader_num_workers
    loader = DataLoader(
        stream, batch_size=batch_size, collate_fn=collate, drop_last=True, num_workers=workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=bool(args.dataloader_persistent_workers and workers > 0),
        prefetch_factor=args.dataloader_prefetch_factor,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index))
    return prepare_data_loader(loader, args.device, num_processes=1, process_index=0, put_on_device=True,
                               dispatch_batches=False, rng_types=None, non_blocking=args.dataloader_pin_memory)
