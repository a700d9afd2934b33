"""The statistics pass: the task's Gaussian sufficient statistics over the frozen encoder's fp32 embeddings,
summed in float64 (all-reduced over ranks), and the images found unreadable on the way."""

from __future__ import annotations

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


@torch.no_grad()
def statistics_pass(diki: DikiCLIP, source, ctx: DistContext = LOCAL, batch_size: int = STATS_BATCH,
                    progress=None) -> tuple[GaussianStats, list[tuple[int, str]]]:
    """Sufficient statistics of the frozen, L2-normalised fp32 image embeddings (float64 sums, all-reduced over
    ranks), and the samples that could not be decoded (gathered from every rank)."""
    stats = GaussianStats.empty(diki.shape.embed_dim)
    failures: list[tuple[int, str]] = []
    sampler = ShardedSequentialBatches(len(source), batch_size, ctx.rank, ctx.world)
    bar = progress.add_task("statistics", total=len(source), info="") if progress else None
    with fp32_math():
        for batch in source.batches(sampler):
            failures += batch.failures
            if batch.images is not None and len(batch):
                emb = diki.encode_image(batch.images.to(ctx.device, non_blocking=True).float())
                stats.update(emb.double().cpu().numpy())
            if progress:
                progress.update(bar, advance=len(batch) + len(batch.failures))
            del batch
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
