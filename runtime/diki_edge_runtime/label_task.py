"""Label-only tasks added on the device, torch-free (``diki-edge bank add-task``).

A label-only task is a DIKI task that was never trained: its residual values are zero (``V_r = 0``, and
``K_r = 0``), so its branch adds exactly nothing and pass 2 equals pass 1; its class table is the frozen text
embedding of each label prompt at every calibration level; its Gaussian is fitted (float64 sufficient statistics,
the bank's own ridge) to the frozen (pass-1) embeddings of example images, computed by the model folder's image
graph. Images like the examples then select the new task and are classified among its labels with CLIP's
zero-shot knowledge; the other tasks' slices are untouched. ``diki-edge train --task NAME --replace`` on a training
machine later swaps it for a trained task of the same name (same slot).

Every check (name, labels, images, model folder) runs before the bank is written; the bank is replaced atomically
(``TaskBank.save``), so a failure leaves it as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diki_edge_runtime import calibration as calib
from diki_edge_runtime import files
from diki_edge_runtime.bank import TaskBank, TaskInfo, TaskSlice
from diki_edge_runtime.contract import DEFAULT_TEMPLATE, MANIFEST_FILE
from diki_edge_runtime.errors import BankError, RuntimeSetupError
from diki_edge_runtime.gaussian import GaussianStats
from diki_edge_runtime.labels import label_prompts

MIN_EXAMPLES = 2  # a covariance needs at least two embeddings


@dataclass
class AddTaskReport:
    task: str
    labels: int
    examples: int  # images whose frozen embeddings the Gaussian was fitted to
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images that could not be read
    bank: str = ""
    calibration: calib.Calibration = field(default_factory=calib.paper)  # what the task's M mapping was fitted to
    warning: str | None = None  # calibration.few_images_warning: too few examples for the task's Gaussian


def default_model_dir(bank_path: str | os.PathLike) -> Path | None:
    """The model folder a bank lives in (``model/bank.safetensors``), if it is one."""
    parent = Path(bank_path).resolve().parent
    return parent if (parent / MANIFEST_FILE).is_file() else None


def label_only_slice(predictor, name: str, labels: Sequence[str], images: Sequence, template: str | None = None,
                     calibration: str = calib.DEFAULT_METHOD) -> tuple[TaskSlice, list[str]]:
    """The bank slice of a label-only task (see the module docstring) and the images that were skipped.

    ``predictor``: a :class:`~diki_edge_runtime.predictor.Predictor` of a model folder with the text graph and the
    ``frozen_embeds`` output, using the bank the task is for. Raises ``ValueError`` / ``RuntimeSetupError``.
    """
    template = DEFAULT_TEMPLATE if template is None else template
    prompts = label_prompts(labels, template)
    if not name or not name.strip():
        raise ValueError("the task name is empty")
    if name in predictor.tasks:
        raise ValueError(f"a task named {name!r} is already in the bank (tasks: {predictor.tasks}); choose another "
                         "name, or remove it first with `diki-edge bank remove`")
    if not predictor.has_text or not predictor.has_frozen_embeds:
        raise RuntimeSetupError(f"{predictor.model_dir}: this model folder was exported before label-only tasks "
                                "were possible (no text graph or no frozen_embeds output); re-export it with "
                                "`diki-edge export`")
    images = list(images)
    if not images:
        raise ValueError("no example images given (--images): the task's Gaussian is fitted to them")
    embeds, skipped = [], []
    for res in predictor.iter_predict(images, top_k=1):
        if res.ok:
            embeds.append(res.frozen_embeds)
        else:
            skipped.append(res.error)
    if len(embeds) < MIN_EXAMPLES:
        raise ValueError(f"{len(embeds)} of {len(images)} example images could be read; at least {MIN_EXAMPLES} "
                         "are needed to fit the task's Gaussian"
                         + (f" (first problem: {skipped[0]})" if skipped else ""))
    f = np.stack(embeds).astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise ValueError("the image graph returned non-finite embeddings for the example images")
    stats = GaussianStats.empty(f.shape[1]).update(f)
    text = predictor.encode_text(list(prompts))  # frozen: M = 0 under any task
    levels = len(predictor.layout.calibration_levels)
    lay = predictor.layout
    zeros_image = np.zeros((lay.image_layers, lay.residual_length, lay.image_width), np.float32)
    zeros_text = np.zeros((lay.text_layers, lay.residual_length, lay.text_width), np.float32)
    info = TaskInfo(name, list(labels), template, stats.count, extra={"label_only": True},
                    calibration=calib.fit(calibration, stats.count, stats.dim))
    return TaskSlice(info, zeros_image, zeros_image.copy(), zeros_text, zeros_text.copy(), stats,
                     np.repeat(text[None], levels, axis=0)), skipped


def add_label_task(bank_path: str | os.PathLike, name: str, labels: Sequence[str], images: Sequence,
                   model_dir: str | os.PathLike | None = None, template: str | None = None,
                   out: str | os.PathLike | None = None, threads: int | None = None,
                   calibration: str = calib.DEFAULT_METHOD) -> AddTaskReport:
    """Append a label-only task to the bank file (or write the result to ``out``); see the module docstring."""
    from diki_edge_runtime.predictor import Predictor

    bank_path = Path(bank_path)
    target = Path(out) if out is not None else bank_path
    with files.locked(target):  # the bank is read, extended and written under its lock: no writer is lost
        bank = TaskBank.load(bank_path)  # in full: it is saved again
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir(bank_path)
        if model_dir is None:
            raise RuntimeSetupError(f"{bank_path}: pass --model, the exported model folder of this bank's backbone "
                                    "(the bank is not inside one)")
        predictor = Predictor(model_dir, threads=threads, bank=bank)
        task, skipped = label_only_slice(predictor, name, labels, images, template, calibration)
        try:
            new_bank = bank.with_task(task)
        except ValueError as exc:  # the covariance could not be factorised
            raise BankError(f"{bank_path}: cannot fit the task's Gaussian: {exc}") from None
        new_bank.save(target)
    return AddTaskReport(name, len(labels), task.stats.count, skipped, str(target), task.info.calibration,
                         calib.few_images_warning(name, task.stats.count, task.stats.dim))
