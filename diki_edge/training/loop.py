"""The one training loop of diki-edge: cross-entropy over global batches with a cosine schedule
(:class:`EpochLoop`), where it stands (:class:`LoopState`, what a checkpoint records) and its in-memory form for
the evaluation baselines (:func:`cross_entropy_loop`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diki_edge.device import Precision
from diki_edge.distributed import DistContext
from diki_edge.errors import TrainError
from diki_edge.loader import Batch, ShuffledGlobalBatches, TensorSource

LOCAL = DistContext(1, 0, 0, torch.device("cpu"), "device cpu")


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, min_lr_ratio: float):
    lr = opt.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr * min_lr_ratio)


@dataclass
class LoopState:
    """Where the epochs stand: what a checkpoint records and a resumed run starts from."""

    epoch: int = 0  # epochs complete
    batches_done: int = 0  # batches of epoch ``epoch`` done
    global_step: int = 0
    # the current epoch's finished part, summed over ranks: sum of batch mean losses, batches, correct, seen
    carry: list[float] = field(default_factory=lambda: [0.0, 0, 0, 0])


class EpochLoop:
    """Cross-entropy over global batches with a cosine schedule: the one training loop of diki-edge.

    ``forward(inputs)`` returns logits. DIKI's adapters (streamed or in memory, one process or DDP) and the
    evaluation baselines (:func:`cross_entropy_loop`) all train here, so every method has the same batching and
    schedule. With N processes each rank's loss is its share's summed loss scaled by ``N / global batch``, so
    DDP's gradient average is exactly the global batch's mean gradient.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, sched,
                 source, sampler: ShuffledGlobalBatches, epochs: int, ctx: DistContext = LOCAL,
                 precision: Precision | None = None, progress=None):
        self.forward, self.opt, self.sched = forward, opt, sched
        self.source, self.sampler, self.epochs, self.ctx = source, sampler, epochs, ctx
        self.precision = precision or Precision("fp32", ctx.device)
        self.scaler = self.precision.grad_scaler()
        self.progress = progress
        self.state = LoopState()
        self.failures: list[tuple[int, str]] = []  # unreadable images met while training (files changed since)
        self.after_step: Callable[[EpochLoop], None] | None = None
        self.after_epoch: Callable[[EpochLoop], None] | None = None
        self._pending: list[tuple[float, int, int]] = []  # this session's batches of the epoch: loss sum, n, correct

    def _step(self, batch: Batch) -> None:
        device = self.ctx.device
        images, labels = batch.images, batch.labels
        # An empty share (a last global batch smaller than the world, or only unreadable files) still takes
        # part in DDP's gradient all-reduce: one blank image with weight 0 gives every parameter a zero gradient.
        empty = len(labels) == 0
        if empty:
            images = torch.zeros((1, *self.source.image_shape))
            labels = torch.zeros(1, dtype=torch.int64)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with self.precision.autocast():
            logits = self.forward(images)
            if self.ctx.active:
                count = self.ctx.all_reduce_sum(torch.tensor([0 if empty else len(labels)], dtype=torch.float64))
                total = F.cross_entropy(logits, labels, reduction="sum") * (0.0 if empty else 1.0)
                loss = total * (self.ctx.world / max(1.0, float(count)))
            else:
                loss = F.cross_entropy(logits, labels)
                if empty:
                    loss = loss * 0.0
                elif not torch.isfinite(loss):  # stop now: every later step would only spread NaN
                    raise TrainError(f"the training loss became {float(loss.detach())} at epoch "
                                     f"{self.state.epoch + 1}, step {self.state.batches_done + 1} (learning rate "
                                     f"{self.opt.param_groups[0]['lr']:.3g}; try a lower --lr); nothing was written")
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()
        if empty:
            self._pending.append((0.0, 0, 0))
            return
        loss_sum = float(total.detach()) if self.ctx.active else float(loss.detach()) * len(labels)
        correct = int((logits.detach().argmax(1) == labels).sum())
        self._pending.append((loss_sum, len(labels), correct))

    def settle(self) -> None:
        """Fold this session's batches of the epoch into ``state.carry``, summed over ranks (a collective)."""
        if not self._pending and not self.ctx.active:
            return
        pending = torch.tensor(self._pending or [(0.0, 0, 0)], dtype=torch.float64).reshape(-1, 3)
        pending = self.ctx.all_reduce_sum(pending)
        sums, counts, correct = pending[:, 0], pending[:, 1], pending[:, 2]
        real = counts > 0
        carry = self.state.carry
        carry[0] += float(sum((s / c).item() for s, c in zip(sums[real], counts[real])))
        carry[1] += int(real.sum())
        carry[2] += int(correct.sum())
        carry[3] += int(counts.sum())
        self._pending = []

    def run(self) -> tuple[float, float]:
        """Train from ``state`` to the last epoch; returns the last epoch's mean batch loss and accuracy."""
        progress, st = self.progress, self.state
        epoch_bar = progress.add_task("epochs", total=self.epochs, completed=st.epoch, info="") if progress else None
        batch_bar = (progress.add_task("batches", total=self.epochs * len(self.sampler), info="",
                                       completed=st.epoch * len(self.sampler) + st.batches_done)
                     if progress else None)
        batches = self.source.batches(self.sampler)
        loss_mean = acc = float("nan")
        while st.epoch < self.epochs:
            for batch in batches:
                self.failures += batch.failures
                self._step(batch)
                st.batches_done += 1
                st.global_step += 1
                if progress:
                    loss_sum, seen, _ = self._pending[-1]
                    progress.update(batch_bar, advance=1, info=f"loss {loss_sum / max(1, seen):.3f}")
                if self.after_step and st.batches_done < len(self.sampler):
                    self.after_step(self)
                del batch  # the next batch is being loaded: hold one batch at a time, not two
            self.settle()
            loss_sum, n_batches, correct, seen = st.carry
            loss_mean, acc = loss_sum / max(1, n_batches), correct / max(1, seen)
            if not math.isfinite(loss_mean):
                raise TrainError(f"the training loss became non-finite in epoch {st.epoch + 1} "
                                    "(lower --lr, or use --precision fp32)")
            st.epoch, st.batches_done, st.carry = st.epoch + 1, 0, [0.0, 0, 0, 0]
            if progress:
                progress.update(epoch_bar, advance=1, info=f"epoch {st.epoch}: loss {loss_mean:.3f} acc {acc:.1%}")
            if self.after_epoch:
                self.after_epoch(self)
        return loss_mean, acc


def cross_entropy_loop(opt: torch.optim.Optimizer, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                       labels: torch.Tensor, epochs: int, batch_size: int, generator: torch.Generator,
                       min_lr_ratio: float = 1e-3, progress=None) -> tuple[float, float]:
    """:class:`EpochLoop` for in-memory ``logits_fn(idx)`` (the evaluation baselines): returns the last epoch's
    mean loss and accuracy."""
    n = len(labels)
    sampler = ShuffledGlobalBatches(range(n), batch_size, generator)
    sched = cosine_schedule(opt, epochs * len(sampler), min_lr_ratio)
    return EpochLoop(logits_fn, opt, sched, TensorSource(torch.arange(n), labels), sampler, epochs,
                     progress=progress).run()
