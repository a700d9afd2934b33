"""Learning one task: its residual keys/values, its Gaussian, its class text table, appended to a bank.

The backbone stays frozen; only the new task's ``K_r/V_r`` (a :class:`~diki_edge.model.TaskAdapter`) train,
with ``M = 1``, by cross-entropy over the task's class prompts — the reference recipe (SGD, lr 5.0, batch 128,
10 epochs, cosine to lr*1e-3, no weight decay). Earlier tasks are untouched by construction: they are not
even loaded as parameters. The bank file is only replaced, atomically, once the task is complete, so a run
killed mid-way leaves the previous bank as it was.

A task's images stream through :mod:`diki_edge.loader` (never all in memory): first the statistics pass over the
frozen encoder (fp32 embeddings summed in float64; it also finds the unreadable files, so training sees exactly
the readable images, as a task loaded in memory does), then the epochs. The same code runs one process or many
under torchrun (:mod:`diki_edge.distributed`: DDP over the adapter, global batches of ``batch_size`` whatever the
process count, statistics all-reduced), on the CPU or CUDA in fp32/bf16/fp16 (:mod:`diki_edge.device`), and
checkpoints itself for ``--resume`` (:mod:`diki_edge.checkpoint`).

Nothing is lost late: the settings are checked when a :class:`TrainConfig` is made (finite positive ``lr``,
finite non-negative ``ridge``, a template with exactly one ``{}``), the bank path is checked writable with room
for the result before any image is read, a loss that becomes NaN or infinite stops the run at once
(:class:`~diki_edge.errors.TrainError`, the bank untouched), and if the final write still fails the trained task
is saved as a one-task bank beside the bank (or in the temp folder) and the error names that file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diki_edge_runtime.bank import TaskBank, TaskInfo, TaskSlice
from diki_edge_runtime.contract import DEFAULT_TEMPLATE
from diki_edge_runtime.errors import BankError, DikiEdgeError
from diki_edge_runtime.files import check_writable
from diki_edge_runtime.gaussian import DEFAULT_RIDGE, GaussianStats
from torch import nn

from diki_edge.backbone import Backbone, backbone_from_spec, load_backbone, recommended_lr
from diki_edge.calibrated import calibration_levels, class_text_table, tokenize
from diki_edge.checkpoint import (Checkpointer, checkpoint_path, data_fingerprint, optimizer_from_parts,
                                  optimizer_to_parts)
from diki_edge.data import ImageFolder, scan_image_folder
from diki_edge.device import Precision
from diki_edge.distributed import DistContext, process_group
from diki_edge.errors import DataError, TrainError
from diki_edge.layout import layout_for
from diki_edge.loader import (STATS_BATCH, Batch, FolderSource, ShardedSequentialBatches, ShuffledGlobalBatches,
                              TensorSource)
from diki_edge.model import DEFAULT_RESIDUAL_LENGTH, DikiCLIP, TaskAdapter
from diki_edge.progress import make_progress

LOCAL = DistContext(1, 0, 0, torch.device("cpu"), "device cpu")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None  # None: backbone.recommended_lr (the reference's 5.0 unless the backbone says)
    min_lr_ratio: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    levels: int = 9
    ridge: float = DEFAULT_RIDGE

    def __post_init__(self) -> None:
        problem = config_problem(self)
        if problem:
            raise TrainError(problem)


def config_problem(cfg: TrainConfig) -> str | None:
    """What is wrong with a training configuration, or None (see the module docstring)."""
    if cfg.lr is not None and not (_finite(cfg.lr) and cfg.lr > 0):
        return f"the learning rate must be a finite number > 0, got {cfg.lr}"
    if not (_finite(cfg.ridge) and cfg.ridge >= 0):
        return f"the covariance ridge must be a finite number >= 0, got {cfg.ridge}"
    if not (_finite(cfg.min_lr_ratio) and 0 <= cfg.min_lr_ratio <= 1):
        return f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}"
    if not (_finite(cfg.weight_decay) and cfg.weight_decay >= 0):
        return f"weight_decay must be a finite number >= 0, got {cfg.weight_decay}"
    for name in ("epochs", "batch_size", "residual_length"):
        if getattr(cfg, name) < 1:
            return f"{name} must be >= 1, got {getattr(cfg, name)}"
    if cfg.levels < 2:
        return f"levels must be >= 2, got {cfg.levels}"
    return template_problem(cfg.template)


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a prompt template with exactly one ``{}`` for the class name, or None."""
    marker = "\x00class\x00"
    try:
        filled = template.format(marker) if template.count("{}") == 1 else None
    except (IndexError, KeyError, ValueError):
        filled = None
    if filled is None or filled.count(marker) != 1:
        return (f"the template {template!r} must hold exactly one '{{}}' for the class name (and no other "
                "braces; write '{{' and '}}' for literal ones)")
    return None


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class RunOptions:
    """How a run executes (not what it learns): none of these changes the recipe."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (the last two on CUDA only)
    workers: int | None = None  # DataLoader processes; None: 0 on the CPU, up to 8 per GPU
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at the end of every epoch only)
    resume: bool = False
    stats_batch_size: int = STATS_BATCH  # images per step of the statistics pass


@dataclass
class TrainReport:
    task: str
    samples: int
    skipped: int
    seconds: float
    final_loss: float
    train_accuracy: float
    device: str = "cpu"
    processes: int = 1
    rank: int = 0
    resumed_from: str | None = None  # "epoch E, batch B" when --resume continued a checkpoint


def image_transform(backbone: Backbone):
    """The backbone's own test-time transform (used for training too: statistics must see the same input)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**backbone.preprocess_cfg), is_train=False)


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
        self.after_step: Callable[["EpochLoop"], None] | None = None
        self.after_epoch: Callable[["EpochLoop"], None] | None = None
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
                    progress.update(batch_bar, advance=1, info=f"loss {self._pending[-1][0] / max(1, self._pending[-1][1]):.3f}")
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


class AdapterObjective(nn.Module):
    """Logits of one task's adapter on a batch; the module DDP wraps (its only parameters are the adapter's).

    The frozen DikiCLIP is held outside the module tree so that DDP neither registers nor broadcasts it."""

    def __init__(self, adapter: TaskAdapter, diki: DikiCLIP, tokens: torch.Tensor):
        super().__init__()
        self.adapter = adapter
        self._frozen = (diki, tokens, diki.logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        diki, tokens, scale = self._frozen
        text = diki.encode_text(tokens, *self.adapter.text_kv())
        return scale * diki.encode_image(images, *self.adapter.image_kv()) @ text.T


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


class TaskRun:
    """One task learned from a source of images: statistics, adapter epochs, text table — resumable."""

    def __init__(self, diki: DikiCLIP, tokenizer, source, classes: Sequence[str], cfg: TrainConfig,
                 ctx: DistContext = LOCAL, precision: Precision | None = None,
                 checkpointer: Checkpointer | None = None, progress=None, stats_batch_size: int = STATS_BATCH):
        if cfg.lr is None:
            raise ValueError("TrainConfig.lr must be resolved (train_task uses the backbone's recommended lr)")
        self.diki, self.source, self.classes, self.cfg, self.ctx = diki, source, list(classes), cfg, ctx
        self.precision = precision or Precision("fp32", ctx.device)
        self.checkpointer, self.progress, self.stats_batch_size = checkpointer, progress, stats_batch_size
        self.tokens = tokenize(tokenizer, classes, cfg.template).to(ctx.device)
        self.resumed_from: str | None = None

    def learn(self, resume: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None
              ) -> tuple[TaskAdapter, GaussianStats, list[tuple[int, str]], float, float]:
        cfg, ctx, diki = self.cfg, self.ctx, self.diki
        diki.to(ctx.device)
        diki.train(False)  # frozen backbone stays in eval mode (no dropout); only the adapter learns
        if resume is None:
            stats, failures = statistics_pass(diki, self.source, ctx, self.stats_batch_size, self.progress)
        else:
            meta, tensors = resume
            stats = GaussianStats(int(tensors["stats.count"].item()), tensors["stats.sum"].numpy(),
                                  tensors["stats.outer"].numpy())
            failures = [(int(i), str(why)) for i, why in meta["failures"]]
        bad = {i for i, _ in failures}
        readable = [i for i in range(len(self.source)) if i not in bad]
        if len(readable) < 2:
            raise DataError(f"{getattr(self.source, 'root', 'the training data')}: fewer than 2 readable images")

        loop, adapter = self.make_loop(readable)
        if resume is not None:
            self._restore(loop, adapter, *resume)
        if self.checkpointer is not None:
            ckpt = self.checkpointer

            def after_step(lp: EpochLoop) -> None:
                if ckpt.due(lp.state.global_step):
                    lp.settle()
                    ckpt.save(*self._snapshot(lp, adapter, stats, failures, mid_epoch=True))

            def after_epoch(lp: EpochLoop) -> None:
                if lp.state.epoch < cfg.epochs:
                    ckpt.save(*self._snapshot(lp, adapter, stats, failures, mid_epoch=False))

            loop.after_step, loop.after_epoch = after_step, after_epoch
        try:
            loss, acc = loop.run()
        except TrainError:  # a diverged run: resuming its checkpoint could only diverge again
            if self.checkpointer is not None:
                self.checkpointer.remove()
            raise
        failures = sorted(set(failures) | set(f for part in ctx.all_gather(loop.failures) for f in part))
        return adapter, stats, failures, loss, acc

    def make_loop(self, readable: Sequence[int]) -> tuple[EpochLoop, TaskAdapter]:
        """The adapter (initialised from the seed) and the loop that trains it on the samples ``readable``."""
        cfg, ctx = self.cfg, self.ctx
        g = torch.Generator().manual_seed(cfg.seed)
        adapter = TaskAdapter(self.diki.shape, generator=g).to(ctx.device)
        opt = torch.optim.SGD(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sampler = ShuffledGlobalBatches(readable, cfg.batch_size, g, ctx.rank, ctx.world)
        sched = cosine_schedule(opt, cfg.epochs * len(sampler), cfg.min_lr_ratio)
        objective = AdapterObjective(adapter, self.diki, self.tokens)
        model: nn.Module = objective
        if ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(objective, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        return EpochLoop(model, opt, sched, self.source, sampler, cfg.epochs, ctx, self.precision, self.progress), adapter

    def _snapshot(self, loop: EpochLoop, adapter: TaskAdapter, stats: GaussianStats, failures, mid_epoch: bool):
        st = loop.state
        opt_meta, opt_tensors = optimizer_to_parts(loop.opt)
        tensors = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
        tensors.update(opt_tensors)
        # the data order of the epoch in progress is replayed from the generator as it was at its start
        tensors["rng.sampler"] = loop.sampler.epoch_start_state if mid_epoch else loop.sampler.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.ctx.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        tensors["stats.count"] = torch.tensor([stats.count], dtype=torch.int64)
        tensors["stats.sum"] = torch.from_numpy(stats.total)
        tensors["stats.outer"] = torch.from_numpy(stats.outer)
        meta = {"epoch": st.epoch, "batches_done": st.batches_done, "global_step": st.global_step,
                "carry": st.carry, "optimizer": opt_meta, "scheduler": loop.sched.state_dict(),
                "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
                "failures": [list(f) for f in failures]}
        return meta, tensors

    def _restore(self, loop: EpochLoop, adapter: TaskAdapter, meta: dict[str, Any],
                 tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in adapter.state_dict().items():
                v.copy_(tensors[f"adapter.{k}"])
        optimizer_from_parts(loop.opt, meta["optimizer"], tensors)
        loop.sched.load_state_dict(meta["scheduler"])
        if loop.scaler is not None and meta.get("scaler"):
            loop.scaler.load_state_dict(meta["scaler"])
        loop.sampler.resume_at(tensors["rng.sampler"], int(meta["batches_done"]))
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.ctx.device)
        loop.state = LoopState(int(meta["epoch"]), int(meta["batches_done"]), int(meta["global_step"]),
                               list(meta["carry"]))
        self.resumed_from = f"epoch {loop.state.epoch + 1}, batch {loop.state.batches_done + 1}"

    def to_slice(self, name: str, adapter: TaskAdapter, stats: GaussianStats, levels: Sequence[float]) -> TaskSlice:
        """The bank slice; the class text table always in fp32 (outside autocast), whatever the precision."""
        with torch.no_grad(), fp32_math():
            table = class_text_table(self.diki, self.tokens, adapter.text_k, adapter.text_v, levels)
        train = {k: v for k, v in asdict(self.cfg).items() if k not in ("template",)}
        if self.precision.name != "fp32":
            train["precision"] = self.precision.name
        info = TaskInfo(name, self.classes, self.cfg.template, stats.count, extra={"train": train})
        return adapter.to_slice(info, stats, table)


def learn_task(diki: DikiCLIP, tokenizer, images: torch.Tensor, labels: torch.Tensor, name: str,
               classes: Sequence[str], cfg: TrainConfig, levels: Sequence[float], progress=None
               ) -> tuple[TaskSlice, float, float]:
    """Everything one task adds to a bank, from its preprocessed training images in memory (the evaluation
    harness's path): the adapter (trained), the frozen statistics and the class text table. Returns the slice and
    the last epoch's loss and accuracy."""
    run = TaskRun(diki, tokenizer, TensorSource(images, labels), classes, cfg, progress=progress)
    adapter, stats, _, loss, acc = run.learn()
    return run.to_slice(name, adapter, stats, levels), loss, acc


def default_workers(device: torch.device) -> int:
    """0 on the CPU (decoding would compete with the training threads); on CUDA up to 8 per GPU process."""
    if device.type != "cuda":
        return 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // per_node - 1))


def train_task(backbone: Backbone, diki: DikiCLIP, folder: ImageFolder, name: str, cfg: TrainConfig,
               levels: Sequence[float], progress=None, ctx: DistContext = LOCAL, options: RunOptions | None = None,
               checkpointer: Checkpointer | None = None) -> tuple[TaskSlice, TrainReport]:
    """One task learned from an image folder streamed with the backbone's own transform."""
    start = time.perf_counter()
    options = options or RunOptions()
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=recommended_lr(backbone))
    precision = Precision.of(options.precision, ctx.device)
    workers = default_workers(ctx.device) if options.workers is None else options.workers
    source = FolderSource(folder.samples, image_transform(backbone), input_size(backbone), workers,
                          pin_memory=ctx.device.type == "cuda", root=folder.root)
    run = TaskRun(diki, backbone.tokenizer, source, folder.classes, cfg, ctx, precision, checkpointer, progress,
                  options.stats_batch_size)
    resume = _checkpoint_to_resume(ctx, checkpointer) if checkpointer is not None and options.resume else None
    adapter, stats, failures, loss, acc = run.learn(resume)
    folder.skipped.extend((folder.samples[i][0], why) for i, why in failures)
    task = run.to_slice(name, adapter, stats, levels)
    report = TrainReport(name, task.stats.count, len(failures), time.perf_counter() - start, loss, acc,
                         str(ctx.device), ctx.world, ctx.rank, run.resumed_from)
    return task, report


def _checkpoint_to_resume(ctx: DistContext, checkpointer: Checkpointer):
    """Rank 0 reads (and vets) the checkpoint; every rank gets its content, or the same error."""
    found = error = None
    if ctx.is_main and checkpointer.path.exists():
        try:
            found = checkpointer.load()
        except TrainError as exc:
            error = str(exc)
    found, error = ctx.from_main((found, error))
    if error:
        raise TrainError(error)
    return found


def input_size(backbone: Backbone) -> int:
    size = backbone.preprocess_cfg.get("size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def open_or_create_bank(bank_path: Path, model: str | None, pretrained: str | None, cfg: TrainConfig
                        ) -> tuple[TaskBank, Backbone, DikiCLIP]:
    """An existing bank with the backbone it names (or the one given, hash-checked), or a new empty bank."""
    existing = TaskBank.load(bank_path) if bank_path.exists() else None
    if existing is not None:
        spec = existing.layout.backbone
        backbone = load_backbone(model, pretrained) if model else backbone_from_spec(spec)
        if backbone.weights_sha256 != existing.layout.backbone_hash:
            raise BankError(f"{bank_path}: bank was trained on another backbone (hash "
                            f"{existing.layout.backbone_hash[:12]}), the given model has {backbone.weights_sha256[:12]}")
        lay = existing.layout
        diki = DikiCLIP(backbone.model, lay.residual_length, lay.image_layers, lay.text_layers)
        return existing, backbone, diki
    from diki_edge.backbone import DEFAULT_MODEL

    backbone = load_backbone(model or DEFAULT_MODEL, pretrained)
    diki = DikiCLIP(backbone.model, cfg.residual_length)
    layout = layout_for(backbone, diki, calibration_levels(cfg.levels), cfg.ridge)
    return TaskBank.empty(layout), backbone, diki


def run_identity(task: str, backbone: Backbone, folder: ImageFolder, cfg: TrainConfig,
                 precision: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (not the device, process count or workers: they do not change
    the recipe)."""
    return {"task": task, "backbone_sha256": backbone.weights_sha256, "data": str(folder.root.resolve()),
            "data_sha256": data_fingerprint(folder), "config": asdict(cfg), "precision": precision}


def train_into_bank(bank_path: str | Path, data_dir: str | Path, task_name: str, *, model: str | None = None,
                    pretrained: str | None = None, cfg: TrainConfig | None = None, replace: bool = False,
                    quiet: bool = False, options: RunOptions | None = None,
                    on_device: Callable[[str], None] | None = None) -> tuple[TaskBank, TrainReport]:
    """``diki-edge train``: learn ``task_name`` from ``data_dir`` and append it to ``bank_path`` atomically.

    Under torchrun every rank calls this; rank 0 alone writes the checkpoint and the bank, and every rank raises
    if the bank could not be written, so all ranks end with the same status."""
    cfg = cfg or TrainConfig()
    options = options or RunOptions()
    bank_path = Path(bank_path)
    if not isinstance(task_name, str) or not task_name.strip():
        raise TrainError(f"the task name must be a non-empty string, got {task_name!r}")
    with process_group(options.device) as ctx:
        if on_device and ctx.is_main:
            on_device(ctx.device_note + (f", {ctx.world} processes ({ctx.backend})" if ctx.active else ""))
        if ctx.is_main:
            check_writable(bank_path, what="bank")  # before anything slow: folder, permissions
        folder = scan_image_folder(data_dir)
        bank, backbone, diki = open_or_create_bank(bank_path, model, pretrained, cfg)
        if task_name in bank.task_names and not replace:
            raise BankError(f"{bank_path}: a task named {task_name!r} exists already (use --replace to retrain it)")
        if ctx.is_main:  # room for the bank with the new task, before any image is read
            check_writable(bank_path, bank.expected_file_bytes() + bank.layout.task_bytes(len(folder.classes)),
                           what="bank")
        if cfg.lr is None:
            cfg = dataclasses.replace(cfg, lr=recommended_lr(backbone))
        identity = run_identity(task_name, backbone, folder, cfg, options.precision)
        _same_everywhere(ctx, identity)
        checkpointer = Checkpointer(checkpoint_path(bank_path, task_name), identity, options.checkpoint_every,
                                    writer=ctx.is_main)
        exists = ctx.from_main(checkpointer.path.exists())
        if exists and not options.resume:
            raise TrainError(f"{checkpointer.path}: an interrupted run of task {task_name!r} left this checkpoint; "
                                "pass --resume to continue it, or delete it to start again")
        torch.manual_seed(cfg.seed)
        with make_progress(quiet or not ctx.is_main) as progress:
            task, report = train_task(backbone, diki, folder, task_name, cfg, bank.layout.calibration_levels,
                                      progress, ctx, options, checkpointer)
        new_bank = bank.with_task(task)
        problem = None
        if ctx.is_main:
            try:
                save_or_rescue(new_bank, bank_path, task)
                checkpointer.remove()
            except TrainError as exc:
                problem = f"{exc}; the checkpoint {checkpointer.path} is kept"
        problem = ctx.from_main(problem)
        if problem:
            raise TrainError(problem)
    return new_bank, report


def _same_everywhere(ctx: DistContext, identity: dict[str, Any]) -> None:
    """Every rank must see the same backbone, data and recipe (e.g. each node's copy of the data folder)."""
    if not ctx.active:
        return
    mine = {k: v for k, v in identity.items() if k != "data"}
    everyone = ctx.all_gather(mine)
    odd = [r for r, other in enumerate(everyone) if other != everyone[0]]
    if odd:
        from diki_edge.checkpoint import describe_difference

        raise TrainError(f"ranks {odd} see another run than rank 0 (differs in: "
                            f"{'; '.join(describe_difference(everyone[0], everyone[odd[0]]))}); every rank needs "
                            "the same data folder, bank and options")


def save_or_rescue(new_bank: TaskBank, bank_path: Path, task: TaskSlice) -> None:
    """Write ``new_bank`` to ``bank_path``; when that fails, save ``task`` alone as a one-task bank beside it (or in
    the temp folder) and raise a :class:`TrainError` naming that file, so the trained task is never lost."""
    try:
        new_bank.save(bank_path)
        return
    except (DikiEdgeError, OSError) as exc:
        failure = str(exc)
    single = TaskBank.empty(new_bank.layout).with_task(task)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{bank_path.stem}.{re.sub(r'[^A-Za-z0-9_.-]+', '_', task.info.name)}.rescued-{stamp}.safetensors"
    for folder in (bank_path.parent, Path(tempfile.gettempdir())):
        try:
            rescued = single.save(folder / name)
        except (DikiEdgeError, OSError):
            continue
        raise TrainError(f"{failure}; the trained task {task.info.name!r} was saved to {rescued} — add it with "
                         f"`diki-edge bank merge OUT {bank_path} {rescued}` once there is room")
    raise TrainError(f"{failure}; saving the trained task {task.info.name!r} beside the bank and in "
                     f"{tempfile.gettempdir()} failed too")
