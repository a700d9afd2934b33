"""One task's run: the statistics pass, the adapter's epochs (resumable from a checkpoint's :class:`RunState`)
and the class text table, giving a bank slice. :class:`TaskRun` is the engine, :func:`train_task` its streamed
form (an image folder), :func:`learn_task` its in-memory form (the evaluation harness)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from diki_edge.backbone import Backbone, recommended_lr
from diki_edge.calibrated import class_text_table, tokenize
from diki_edge.checkpoint import Checkpointer, RunState, load_into, optimizer_from_parts, optimizer_to_parts
from diki_edge.data import ImageFolder
from diki_edge.device import Precision
from diki_edge.distributed import DistContext
from diki_edge.errors import DataError, TrainError
from diki_edge.loader import STATS_BATCH, FolderSource, ShuffledGlobalBatches, TensorSource
from diki_edge.model import DikiCLIP, TaskAdapter
from diki_edge.training.config import RunOptions, TrainConfig, TrainReport
from diki_edge.training.loop import LOCAL, EpochLoop, LoopState, cosine_schedule
from diki_edge.training.statistics import fp32_math, statistics_pass
from diki_edge_runtime import calibration as calib
from diki_edge_runtime.bank import TaskInfo, TaskSlice
from diki_edge_runtime.gaussian import GaussianStats


@dataclass
class TaskResult:
    """What :meth:`TaskRun.learn` gives: the trained adapter, the frozen statistics, the samples found unreadable
    (index, reason), and the last epoch's mean batch loss and accuracy."""

    adapter: TaskAdapter
    stats: GaussianStats
    failures: list[tuple[int, str]]
    loss: float
    accuracy: float


def image_transform(backbone: Backbone):
    """The backbone's own test-time transform (used for training too: statistics must see the same input)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**backbone.preprocess_cfg), is_train=False)


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


class TaskRun:
    """One task learned from a source of images: statistics, adapter epochs, text table — resumable."""

    def __init__(self, diki: DikiCLIP, tokenizer, source, classes: Sequence[str], cfg: TrainConfig,
                 ctx: DistContext = LOCAL, precision: Precision | None = None,
                 checkpointer: Checkpointer | None = None, progress=None, stats_batch_size: int = STATS_BATCH):
        if cfg.lr is None:
            raise ValueError("TrainConfig.lr must be resolved (train_task uses the backbone's recommended lr)")
        self.diki, self.source, self.classes, self.cfg, self.ctx = diki, source, list(classes), cfg, ctx
        self.precision = precision or Precision("fp32", ctx.device)
        # a statistics chunk larger than the training batch would be the run's peak memory, growing with the
        # number of images up to the chunk; both paths (folder, in memory) chunk alike, see statistics_pass
        self.checkpointer, self.progress = checkpointer, progress
        self.stats_batch_size = max(1, min(stats_batch_size, cfg.batch_size))
        self.tokens = tokenize(tokenizer, classes, cfg.template).to(ctx.device)
        self.resumed_from: str | None = None

    def learn(self, resume: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None) -> TaskResult:
        cfg, ctx, diki = self.cfg, self.ctx, self.diki
        diki.to(ctx.device)
        diki.train(False)  # frozen backbone stays in eval mode (no dropout); only the adapter learns
        state = None
        if resume is None:
            stats, failures = statistics_pass(diki, self.source, ctx, self.stats_batch_size, self.progress)
        else:
            fresh = TaskAdapter(diki.shape, generator=torch.Generator()).state_dict()
            state = RunState.from_parts(*resume, adapter=fresh, embed_dim=diki.shape.embed_dim,
                                        samples=len(self.source), epochs=cfg.epochs)
            stats = GaussianStats(state.stats_count, state.stats_sum.numpy(), state.stats_outer.numpy())
            failures = state.failures
        bad = {i for i, _ in failures}
        readable = [i for i in range(len(self.source)) if i not in bad]
        if len(readable) < 2:
            raise DataError(f"{getattr(self.source, 'root', 'the training data')}: fewer than 2 readable images")

        loop, adapter = self.make_loop(readable)
        if state is not None:
            self._restore(loop, adapter, state)
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
        return TaskResult(adapter, stats, failures, loss, acc)

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
        loop = EpochLoop(model, opt, sched, self.source, sampler, cfg.epochs, ctx, self.precision, self.progress)
        return loop, adapter

    def _snapshot(self, loop: EpochLoop, adapter: TaskAdapter, stats: GaussianStats, failures, mid_epoch: bool):
        st = loop.state
        opt_meta, opt_tensors = optimizer_to_parts(loop.opt)
        return RunState(
            adapter=dict(adapter.state_dict()), optimizer=opt_meta, optimizer_tensors=opt_tensors,
            scheduler=loop.sched.state_dict(), scaler=loop.scaler.state_dict() if loop.scaler is not None else None,
            # the data order of the epoch in progress is replayed from the generator as it was at its start
            rng_sampler=loop.sampler.epoch_start_state if mid_epoch else loop.sampler.generator.get_state(),
            rng_torch=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None,
            stats_count=stats.count, stats_sum=torch.from_numpy(stats.total), stats_outer=torch.from_numpy(stats.outer),
            epoch=st.epoch, batches_done=st.batches_done, global_step=st.global_step, carry=st.carry,
            failures=list(failures)).to_parts()

    def _restore(self, loop: EpochLoop, adapter: TaskAdapter, state: RunState) -> None:
        per_epoch = len(loop.sampler)
        if state.batches_done >= per_epoch or state.global_step != state.epoch * per_epoch + state.batches_done:
            raise TrainError(f"checkpoint fields 'batches_done'/'global_step' ({state.batches_done}, "
                             f"{state.global_step}) do not fit epoch {state.epoch} of {per_epoch} batches; delete "
                             "the checkpoint to start the task again")
        with torch.no_grad():
            for k, v in adapter.state_dict().items():
                v.copy_(state.adapter[k])
        load_into("optimizer", lambda: optimizer_from_parts(loop.opt, state.optimizer, state.optimizer_tensors))
        load_into("scheduler", lambda: loop.sched.load_state_dict(state.scheduler))
        if loop.scaler is not None and state.scaler:
            load_into("scaler", lambda: loop.scaler.load_state_dict(state.scaler))
        load_into("rng.sampler", lambda: loop.sampler.resume_at(state.rng_sampler, state.batches_done))
        load_into("rng.torch", lambda: torch.set_rng_state(state.rng_torch))
        if state.rng_cuda is not None and self.ctx.device.type == "cuda":
            load_into("rng.cuda", lambda: torch.cuda.set_rng_state(state.rng_cuda, self.ctx.device))
        for group in loop.opt.param_groups:  # a tampered learning rate would train a NaN run
            if not (isinstance(group.get("lr"), (int, float)) and math.isfinite(group["lr"]) and group["lr"] >= 0):
                raise TrainError(f"checkpoint field 'optimizer' holds the learning rate {group.get('lr')!r}; delete "
                                 "the checkpoint to start the task again")
        loop.state = LoopState(state.epoch, state.batches_done, state.global_step, list(state.carry))
        self.resumed_from = f"epoch {loop.state.epoch + 1}, batch {loop.state.batches_done + 1}"

    def to_slice(self, name: str, adapter: TaskAdapter, stats: GaussianStats, levels: Sequence[float]) -> TaskSlice:
        """The bank slice; the class text table always in fp32 (outside autocast), whatever the precision."""
        with torch.no_grad(), fp32_math():
            table = class_text_table(self.diki, self.tokens, adapter.text_k, adapter.text_v, levels)
        train = {k: v for k, v in asdict(self.cfg).items() if k not in ("template",)}
        if self.precision.name != "fp32":
            train["precision"] = self.precision.name
        info = TaskInfo(name, self.classes, self.cfg.template, stats.count, extra={"train": train},
                        calibration=calib.fit(self.cfg.calibration, stats.count, stats.dim))
        return adapter.to_slice(info, stats, table)


def learn_task(diki: DikiCLIP, tokenizer, images: torch.Tensor, labels: torch.Tensor, name: str,
               classes: Sequence[str], cfg: TrainConfig, levels: Sequence[float], progress=None
               ) -> tuple[TaskSlice, float, float]:
    """Everything one task adds to a bank, from its preprocessed training images in memory (the evaluation
    harness's path): the adapter (trained), the frozen statistics and the class text table. Returns the slice and
    the last epoch's loss and accuracy."""
    run = TaskRun(diki, tokenizer, TensorSource(images, labels), classes, cfg, progress=progress)
    result = run.learn()
    return run.to_slice(name, result.adapter, result.stats, levels), result.loss, result.accuracy


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
    resume = checkpoint_to_resume(ctx, checkpointer) if checkpointer is not None and options.resume else None
    result = run.learn(resume)
    folder.skipped.extend((folder.samples[i][0], why) for i, why in result.failures)
    task = run.to_slice(name, result.adapter, result.stats, levels)
    report = TrainReport(name, task.stats.count, len(result.failures), time.perf_counter() - start, result.loss,
                         result.accuracy,
                         str(ctx.device), ctx.world, ctx.rank, run.resumed_from,
                         calib.few_images_warning(name, task.stats.count, task.stats.dim))
    return task, report


def checkpoint_to_resume(ctx: DistContext, checkpointer: Checkpointer):
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
