"""A task into a bank: open (or create) the bank with its backbone, train the task, write the bank atomically —
or, when the write fails, rescue the trained task as a one-task bank beside it."""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from diki_edge.backbone import Backbone, backbone_from_spec, load_backbone, recommended_lr
from diki_edge.calibrated import calibration_levels
from diki_edge.checkpoint import Checkpointer, checkpoint_path, data_fingerprint
from diki_edge.data import ImageFolder, scan_image_folder
from diki_edge.distributed import DistContext, process_group
from diki_edge.errors import TrainError, TrainUsageError
from diki_edge.layout import layout_for
from diki_edge.model import DikiCLIP
from diki_edge.progress import make_progress
from diki_edge.training.config import RunOptions, TrainConfig, TrainReport
from diki_edge.training.task import train_task
from diki_edge_runtime import files
from diki_edge_runtime.bank import TaskBank, TaskSlice
from diki_edge_runtime.errors import BankError, DikiEdgeError
from diki_edge_runtime.files import check_writable


def open_or_create_bank(bank_path: Path, model: str | None, pretrained: str | None, cfg: TrainConfig
                        ) -> tuple[TaskBank, Backbone, DikiCLIP]:
    """An existing bank with the backbone it names (or the one given, hash-checked), or a new empty bank."""
    existing = TaskBank.load(bank_path) if bank_path.exists() else None
    if existing is not None:
        spec = existing.layout.backbone
        backbone = load_backbone(model, pretrained) if model else backbone_from_spec(spec)
        if backbone.weights_sha256 != existing.layout.backbone_hash:
            raise BankError(f"{bank_path}: bank was trained on another backbone (hash "
                            f"{existing.layout.backbone_hash[:12]}), the given model has "
                            f"{backbone.weights_sha256[:12]}")
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
        raise TrainUsageError(f"the task name must be a non-empty string, got {task_name!r}")
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
        same_everywhere(ctx, identity)
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
                new_bank = save_or_rescue(new_bank, bank_path, task, replace)
                checkpointer.remove()
            except TrainError as exc:
                problem = f"{exc}; the checkpoint {checkpointer.path} is kept"
        problem = ctx.from_main(problem)
        if problem:
            raise TrainError(problem)
    return new_bank, report


def same_everywhere(ctx: DistContext, identity: dict[str, Any]) -> None:
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


def save_or_rescue(new_bank: TaskBank, bank_path: Path, task: TaskSlice, replace: bool = False) -> TaskBank:
    """Append ``task`` to the bank file as it is NOW (re-read under the bank's lock: another writer may have added a
    task since this run started) and return the bank written; ``new_bank`` is that bank when nothing changed. When
    that fails, save ``task`` alone as a one-task bank beside it (or in the temp folder) and raise a
    :class:`TrainError` naming that file, so the trained task is never lost."""
    try:
        with files.locked(bank_path):
            latest = TaskBank.load(bank_path) if bank_path.exists() else None
            if latest is not None:
                if latest.layout != new_bank.layout:
                    raise BankError(f"{bank_path}: the bank was replaced by one of another backbone or layout "
                                    "while this task trained")
                if task.info.name in latest.task_names and not replace:
                    raise BankError(f"{bank_path}: another run added a task named {task.info.name!r} while this "
                                    "one trained")
                new_bank = latest.with_task(task)
            new_bank.save(bank_path)
        return new_bank
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
