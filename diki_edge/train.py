"""Learning one task: its residual keys/values, its Gaussian, its class text table, appended to a bank.

The backbone stays frozen; only the new task's ``K_r/V_r`` (a :class:`~diki_edge.model.TaskAdapter`) train,
with ``M = 1``, by cross-entropy over the task's class prompts — the reference recipe (SGD, lr 5.0, batch 128,
10 epochs, cosine to lr*1e-3, no weight decay). Earlier tasks are untouched by construction: they are not
even loaded as parameters. The bank file is only replaced, atomically, once the task is complete, so a run
killed mid-way leaves the previous bank as it was.

Nothing is lost late: the settings are checked when a :class:`TrainConfig` is made (finite positive ``lr``,
finite non-negative ``ridge``, a template with exactly one ``{}``), the bank path is checked writable with room
for the result before any image is read, a loss that becomes NaN or infinite stops the run at once
(:class:`~diki_edge.errors.TrainError`, the bank untouched), and if the final write still fails the trained task
is saved as a one-task bank beside the bank (or in the temp folder) and the error names that file.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diki_edge_runtime.bank import TaskBank, TaskInfo, TaskSlice
from diki_edge_runtime.contract import DEFAULT_TEMPLATE
from diki_edge_runtime.errors import BankError, DikiEdgeError
from diki_edge_runtime.files import check_writable
from diki_edge_runtime.gaussian import DEFAULT_RIDGE, GaussianStats

from diki_edge.backbone import (
    Backbone,
    backbone_from_spec,
    load_backbone,
    recommended_lr,
)
from diki_edge.calibrated import calibration_levels, class_text_table, tokenize
from diki_edge.data import ImageFolder, batches, load_tensors, scan_image_folder
from diki_edge.errors import TrainError
from diki_edge.layout import layout_for
from diki_edge.model import DEFAULT_RESIDUAL_LENGTH, DikiCLIP, TaskAdapter
from diki_edge.progress import make_progress


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
class TrainReport:
    task: str
    samples: int
    skipped: int
    seconds: float
    final_loss: float
    train_accuracy: float


def image_transform(backbone: Backbone):
    """The backbone's own test-time transform (used for training too: statistics must see the same input)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**backbone.preprocess_cfg), is_train=False)


def cross_entropy_loop(opt: torch.optim.Optimizer, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                       labels: torch.Tensor, epochs: int, batch_size: int, generator: torch.Generator,
                       min_lr_ratio: float = 1e-3, progress=None) -> tuple[float, float]:
    """Cross-entropy over shuffled mini-batches with a cosine schedule to ``lr * min_lr_ratio``.

    ``logits_fn(idx)`` returns the logits of the samples ``idx``. Shared by DIKI's adapters and the evaluation
    baselines so that every method trains with the same batching and schedule. Returns the last epoch's mean
    loss and accuracy.
    """
    n = len(labels)
    total = max(1, epochs * math.ceil(n / batch_size))
    lr = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=lr * min_lr_ratio)
    epoch_bar = progress.add_task("epochs", total=epochs, info="") if progress else None
    batch_bar = progress.add_task("batches", total=total, info="") if progress else None
    loss_mean = acc = float("nan")
    for epoch in range(epochs):
        losses, correct = [], 0
        for idx in batches(n, batch_size, generator):
            logits = logits_fn(idx)
            loss = F.cross_entropy(logits, labels[idx])
            if not torch.isfinite(loss):  # stop now: every later step would only spread NaN
                raise TrainError(f"the training loss became {float(loss.detach())} at epoch {epoch + 1}, step "
                                 f"{len(losses) + 1} (learning rate {opt.param_groups[0]['lr']:.3g}; try a lower "
                                 "--lr); nothing was written")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == labels[idx]).sum())
            if progress:
                progress.update(batch_bar, advance=1, info=f"loss {losses[-1]:.3f}")
        loss_mean, acc = sum(losses) / len(losses), correct / n
        if progress:
            progress.update(epoch_bar, advance=1, info=f"epoch {epoch + 1}: loss {loss_mean:.3f} acc {acc:.1%}")
    return loss_mean, acc


def fit_adapter(diki: DikiCLIP, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor,
                cfg: TrainConfig, progress=None) -> tuple[TaskAdapter, float, float]:
    """Train one task's adapter with M = 1; returns it with the last epoch's mean loss and accuracy."""
    if cfg.lr is None:
        raise ValueError("TrainConfig.lr must be resolved (train_task uses the backbone's recommended lr)")
    g = torch.Generator().manual_seed(cfg.seed)
    adapter = TaskAdapter(diki.shape, generator=g)
    opt = torch.optim.SGD(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scale = diki.logit_scale
    diki.train(False)  # frozen backbone stays in eval mode (no dropout); only the adapter learns

    def logits(idx: torch.Tensor) -> torch.Tensor:
        text = diki.encode_text(tokens, *adapter.text_kv())
        return scale * diki.encode_image(images[idx], *adapter.image_kv()) @ text.T

    loss, acc = cross_entropy_loop(opt, logits, labels, cfg.epochs, cfg.batch_size, g, cfg.min_lr_ratio, progress)
    return adapter, loss, acc


@torch.no_grad()
def frozen_statistics(diki: DikiCLIP, images: torch.Tensor, batch_size: int = 256, progress=None) -> GaussianStats:
    """Sufficient statistics of the frozen, L2-normalised image embeddings."""
    stats = GaussianStats.empty(diki.shape.embed_dim)
    bar = progress.add_task("statistics", total=len(images), info="") if progress else None
    for chunk in images.split(batch_size):
        stats.update(diki.encode_image(chunk).double().numpy())
        if progress:
            progress.update(bar, advance=len(chunk))
    return stats


def learn_task(diki: DikiCLIP, tokenizer, images: torch.Tensor, labels: torch.Tensor, name: str,
               classes: Sequence[str], cfg: TrainConfig, levels: Sequence[float], progress=None
               ) -> tuple[TaskSlice, float, float]:
    """Everything one task adds to a bank, from its preprocessed training images: the adapter (trained), the
    frozen statistics and the class text table. Returns the slice and the last epoch's loss and accuracy."""
    tokens = tokenize(tokenizer, classes, cfg.template)
    adapter, loss, acc = fit_adapter(diki, images, labels, tokens, cfg, progress)
    stats = frozen_statistics(diki, images, progress=progress)
    with torch.no_grad():
        table = class_text_table(diki, tokens, adapter.text_k, adapter.text_v, levels)
    info = TaskInfo(name, list(classes), cfg.template, stats.count,
                    extra={"train": {k: v for k, v in asdict(cfg).items() if k not in ("template",)}})
    return adapter.to_slice(info, stats, table), loss, acc


def train_task(backbone: Backbone, diki: DikiCLIP, folder: ImageFolder, name: str, cfg: TrainConfig,
               levels: Sequence[float], progress=None) -> tuple[TaskSlice, TrainReport]:
    """:func:`learn_task` on an image folder read with the backbone's own transform."""
    start = time.perf_counter()
    if cfg.lr is None:
        cfg = replace(cfg, lr=recommended_lr(backbone))
    transform = image_transform(backbone)
    bar = progress.add_task("loading images", total=len(folder), info=str(folder.root)) if progress else None
    images, labels = load_tensors(folder, transform, (lambda: progress.update(bar, advance=1)) if progress else None)
    task, loss, acc = learn_task(diki, backbone.tokenizer, images, labels, name, folder.classes, cfg, levels,
                                 progress)
    report = TrainReport(name, task.stats.count, len(folder.skipped), time.perf_counter() - start, loss, acc)
    return task, report


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


def train_into_bank(bank_path: str | Path, data_dir: str | Path, task_name: str, *, model: str | None = None,
                    pretrained: str | None = None, cfg: TrainConfig | None = None, replace: bool = False,
                    quiet: bool = False) -> tuple[TaskBank, TrainReport]:
    """``diki-edge train``: learn ``task_name`` from ``data_dir`` and append it to ``bank_path`` atomically."""
    cfg = cfg or TrainConfig()
    bank_path = Path(bank_path)
    if not isinstance(task_name, str) or not task_name.strip():
        raise TrainError(f"the task name must be a non-empty string, got {task_name!r}")
    check_writable(bank_path, what="bank")  # before anything slow: folder, permissions
    folder = scan_image_folder(data_dir)
    bank, backbone, diki = open_or_create_bank(bank_path, model, pretrained, cfg)
    if task_name in bank.task_names and not replace:
        raise BankError(f"{bank_path}: a task named {task_name!r} exists already (use --replace to retrain it)")
    # room for the bank with the new task, before any image is read
    check_writable(bank_path, bank.expected_file_bytes() + bank.layout.task_bytes(len(folder.classes)), what="bank")
    torch.manual_seed(cfg.seed)
    with make_progress(quiet) as progress:
        task, report = train_task(backbone, diki, folder, task_name, cfg, bank.layout.calibration_levels, progress)
    new_bank = bank.with_task(task)
    save_or_rescue(new_bank, bank_path, task)
    return new_bank, report


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
