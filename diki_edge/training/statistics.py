"""The statistics pass: the task's Gaussian sufficient statistics over the frozen encoder's fp32 embeddings,
summed in float64 (all-reduced over ranks), and the images found unreadable on the way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from diki_edge.distributed import DistContext
from diki_edge.loader import STATS_BATCH, ShardedSequentialBatches, TensorSource
from diki_edge.model import DikiCLIP
from diki_edge.training.loop import LOCAL
from diki_edge_runtime.gaussian import GaussianStats


@contextmanager
def fp32_math():
    """True fp32 on CUDA: cuDNN convolutions (the patch embedding) may otherwise run in TF32 (10-bit mantissa)."""
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul


class _FixedChunks:
    """Decoded images regrouped into chunks of exactly ``size`` (the last one shorter).

    The float64 sums depend on where the chunks start and end (and the encoder's output may depend on the batch
    it ran in), so the chunks follow the sequence of readable images, not the files read: an undecodable image
    must not shift the boundaries, or a folder and the same images in memory would sum differently."""

    def __init__(self, size: int):
        self.size = size
        self.pending: list[torch.Tensor] = []
        self.held = 0

    def add(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        if not self.pending and len(images) == self.size:  # the usual case: no copy
            yield images
            return
        self.pending.append(images)
        self.held += len(images)
        while self.held >= self.size:
            joined = self._joined()
            rest = joined[self.size:]
            self.pending, self.held = ([rest] if len(rest) else []), len(rest)
            yield joined[:self.size]

    def rest(self) -> Iterator[torch.Tensor]:
        if self.held:
            yield self._joined()
        self.pending, self.held = [], 0

    def _joined(self) -> torch.Tensor:
        return torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]


@torch.no_grad()
def statistics_pass(diki: DikiCLIP, source, ctx: DistContext = LOCAL, batch_size: int = STATS_BATCH,
                    progress=None) -> tuple[GaussianStats, list[tuple[int, str]]]:
    """Sufficient statistics of the frozen, L2-normalised fp32 image embeddings (float64 sums, all-reduced over
    ranks), and the samples that could not be decoded (gathered from every rank).

    Images are encoded ``batch_size`` readable ones at a time, so memory is bounded by that and the sums of a
    folder with bad images equal those of its readable images in memory, bit for bit."""
    stats = GaussianStats.empty(diki.shape.embed_dim)
    failures: list[tuple[int, str]] = []
    sampler = ShardedSequentialBatches(len(source), batch_size, ctx.rank, ctx.world)
    chunks = _FixedChunks(batch_size)
    bar = progress.add_task("statistics", total=len(source), info="") if progress else None

    def encode(ready: Iterator[torch.Tensor]) -> None:
        # a function, so no chunk outlives its encoding: a loop variable would hold it while the next is decoded
        for images in ready:
            emb = diki.encode_image(images.to(ctx.device, non_blocking=True).float())
            stats.update(emb.double().cpu().numpy())

    with fp32_math():
        for batch in source.batches(sampler):
            failures += batch.failures
            if batch.images is not None and len(batch):
                encode(chunks.add(batch.images))
            if progress:
                progress.update(bar, advance=len(batch) + len(batch.failures))
            del batch
        encode(chunks.rest())
    if ctx.active:
        count = ctx.all_reduce_sum(torch.tensor([stats.count], dtype=torch.float64))
        stats = GaussianStats(int(count.item()), ctx.all_reduce_sum(torch.from_numpy(stats.total)).numpy(),
                              ctx.all_reduce_sum(torch.from_numpy(stats.outer)).numpy())
        failures = sorted(f for part in ctx.all_gather(failures) for f in part)
    if progress and ctx.active:
        progress.update(bar, completed=len(source))
    return stats, failures


def frozen_statistics(diki: DikiCLIP, images: torch.Tensor, batch_size: int = STATS_BATCH,
                      progress=None) -> GaussianStats:
    """:func:`statistics_pass` over images in memory."""
    return statistics_pass(diki, TensorSource(images, torch.zeros(len(images), dtype=torch.int64)), LOCAL,
                           batch_size, progress)[0]
