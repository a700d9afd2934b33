"""Streaming a task's images into training: batch samplers and the two sources a task's images come from.

* :class:`FolderSource` decodes and transforms an image folder lazily in a ``torch.utils.data.DataLoader``
  (``workers`` processes; pinned memory on CUDA), so memory is bounded by a few batches whatever the number of
  images. A file that cannot be decoded is dropped from its batch and reported with the batch (also from inside a
  worker process); it never stops the others.
* :class:`TensorSource` serves images already in memory (the evaluation harness's preprocessed tasks).

Both are driven by the same batch samplers, so a folder and the same images in memory train identically:

* :class:`ShuffledGlobalBatches`: every epoch one permutation of the readable samples drawn from the run's seeded
  generator (the reference order: ``randperm`` per epoch), cut into *global* batches of ``batch_size``; each rank
  of a distributed run takes its contiguous share of every global batch. Every image is seen once per epoch and
  the recipe (batch composition, number of steps) is the same on 1 or N processes. Resumable mid-epoch from the
  generator state at the epoch's start plus the number of batches done.
* :class:`ShardedSequentialBatches`: the statistics pass, in file order, chunks dealt round-robin to the ranks.

torch's ``DistributedSampler`` is not used: it pads the data set to a multiple of the world size (repeating
images, which would bias the Gaussian) and shuffles per rank, so batches would change with the process count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diki_edge.data import open_rgb

STATS_BATCH = 256  # most images per statistics step (TaskRun caps it at the training batch)


@dataclass
class Batch:
    images: torch.Tensor | None  # [b, 3, H, W]; None when every image of this share failed to decode
    labels: torch.Tensor  # [b] int64
    failures: list[tuple[int, str]] = field(default_factory=list)  # (sample index, why) dropped from this batch

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) in its pinning thread
        return Batch(None if self.images is None else self.images.pin_memory(), self.labels.pin_memory(),
                     self.failures)


class FolderImages(Dataset):
    """``(index, image tensor or None, label, failure reason or None)`` per sample of an image folder."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return index, self.transform(open_rgb(path)), label, None
        except Exception as exc:  # one bad image never stops the others; the batch reports it
            return index, None, label, f"{type(exc).__name__}: {exc}"


def collate_readable(items) -> Batch:
    """Stack the decoded images of a batch; undecodable ones leave the batch and are listed in ``failures``."""
    good = [(x, y) for _, x, y, why in items if why is None]
    failures = [(i, why) for i, _, _, why in items if why is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return Batch(images, torch.tensor([y for _, y in good], dtype=torch.int64), failures)


class ShuffledGlobalBatches(Sampler[list[int]]):
    """This rank's share of every global training batch (see the module docstring)."""

    def __init__(self, readable: Sequence[int], batch_size: int, generator: torch.Generator, rank: int = 0,
                 world: int = 1):
        self.readable = torch.as_tensor(list(readable), dtype=torch.int64)
        self.batch_size = batch_size
        self.generator = generator
        self.rank, self.world = rank, world
        self.start_batch = 0  # batches of the next epoch already done (set when resuming mid-epoch)
        self.epoch_start_state: torch.Tensor | None = None  # the generator before this epoch's permutation

    def __len__(self) -> int:
        """Global batches per epoch (every rank takes part in each, possibly with an empty share)."""
        return -(-len(self.readable) // self.batch_size)

    def resume_at(self, epoch_start_state: torch.Tensor, batches_done: int) -> None:
        self.generator.set_state(epoch_start_state)
        self.start_batch = batches_done

    def __iter__(self) -> Iterator[list[int]]:
        self.epoch_start_state = self.generator.get_state()
        order = torch.randperm(len(self.readable), generator=self.generator)
        start, self.start_batch = self.start_batch, 0
        for b in range(start, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            share = torch.tensor_split(batch, self.world)[self.rank]
            yield self.readable[share].tolist()


class ShardedSequentialBatches(Sampler[list[int]]):
    """Chunks of ``batch_size`` samples in file order, chunk ``i`` to rank ``i % world`` (the statistics pass)."""

    def __init__(self, count: int, batch_size: int = STATS_BATCH, rank: int = 0, world: int = 1):
        self.count, self.batch_size, self.rank, self.world = count, batch_size, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, -(-self.count // self.batch_size), self.world))

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in range(self.rank, -(-self.count // self.batch_size), self.world):
            yield list(range(chunk * self.batch_size, min(self.count, (chunk + 1) * self.batch_size)))


class TensorSource:
    """Images already decoded and transformed, in memory (``[N, 3, H, W]`` and ``[N]`` labels)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batches(self, sampler: Sampler[list[int]]) -> Iterable[Batch]:
        return _TensorBatches(self, sampler)


class _TensorBatches:
    def __init__(self, source: TensorSource, sampler: Sampler[list[int]]):
        self.source, self.sampler = source, sampler

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.sampler:
            index = torch.as_tensor(idx, dtype=torch.int64)
            yield Batch(self.source.images[index], self.source.labels[index])


class FolderSource:
    """An image folder decoded on the fly by a DataLoader with ``workers`` processes (0: in this process)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable, image_size: int, workers: int = 0,
                 pin_memory: bool = False, root: Path | None = None):
        self.root = root
        self.dataset = FolderImages(samples, transform)
        self.image_size = image_size
        self.workers = workers
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def batches(self, sampler: Sampler[list[int]]) -> Iterable[Batch]:
        """A DataLoader over ``sampler``'s batches; iterate it once per epoch (its workers persist across epochs)."""
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                          collate_fn=collate_readable, pin_memory=self.pin_memory,
                          persistent_workers=self.workers > 0, prefetch_factor=2 if self.workers else None)
