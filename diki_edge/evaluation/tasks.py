"""The evaluation's view of a task: preprocessed tensors plus the PIL test images (for the ONNX runtime path).

:func:`dcil_sequence` adapts :mod:`diki_edge.datasets` (the DCIL benchmark and the held-out sets of the bundled
backbone's pretraining domains) to :class:`EvalTask`; tests build :class:`EvalTask` directly from synthetic
images with :func:`synthetic_tasks`. This is the only module of the evaluation that knows the dataset API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diki_edge_runtime.contract import DEFAULT_TEMPLATE
from diki_edge_runtime.preprocess import CLIP_MEAN, CLIP_STD


@dataclass
class EvalTask:
    """One task (or one held-out set, which has no training images)."""

    name: str
    class_names: list[str]
    train_x: torch.Tensor  # [N, 3, H, W] preprocessed with the backbone's test transform
    train_y: torch.Tensor  # [N] int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    template: str = DEFAULT_TEMPLATE
    test_images: list | None = None  # PIL RGB images of the test split (the runtime preprocesses them itself)
    info: dict[str, Any] = field(default_factory=dict)  # domain, license, relation to pretraining

    @property
    def prompts(self) -> list[str]:
        return [self.template.format(c) for c in self.class_names]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "classes": len(self.class_names), "train": int(len(self.train_y)),
                "test": int(len(self.test_y)), "template": self.template, **self.info}


def _subsample(pairs: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` pairs, stratified round-robin over labels (deterministic)."""
    if limit is None or len(pairs) <= limit:
        return pairs
    rng = np.random.RandomState(seed)
    by_label: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(pairs):
        by_label.setdefault(int(y), []).append(i)
    queues = [list(rng.permutation(v)) for _, v in sorted(by_label.items())]
    chosen: list[int] = []
    while len(chosen) < limit:
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(int(q.pop(0)))
    return [pairs[i] for i in sorted(chosen)]


def _tensors(pairs: list, transform: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    if not pairs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    x = torch.stack([transform(im) for im, _ in pairs])
    y = torch.tensor([int(lbl) for _, lbl in pairs], dtype=torch.int64)
    return x, y


def from_dataset_task(task: Any, transform: Callable, *, max_train: int | None = None,
                      max_test: int | None = None, seed: int = 0) -> EvalTask:
    """An :class:`EvalTask` from a :class:`diki_edge.datasets.Task` (``train``/``test`` lists of (PIL, label))."""
    train = _subsample(list(task.train), max_train, seed)
    test = _subsample(list(task.test), max_test, seed + 1)
    tx, ty = _tensors(train, transform)
    vx, vy = _tensors(test, transform)
    info = {"domain": getattr(task, "domain", ""), "license": getattr(task, "license", ""),
            "seen_in_pretraining": getattr(task, "seen_in_pretraining", "")}
    return EvalTask(task.name, list(task.class_names), tx, ty, vx, vy,
                    template=getattr(task, "template", DEFAULT_TEMPLATE),
                    test_images=[im for im, _ in test], info=info)


def dcil_sequence(order: str, transform: Callable, *, max_train: int | None = None, max_test: int | None = None,
                  seed: int = 0, tasks: dict | None = None) -> list[EvalTask]:
    """The DCIL benchmark's tasks in training ``order`` ("A" or "B"). ``tasks`` (``dcil_tasks()``) avoids
    rebuilding the images for a second order."""
    from diki_edge.datasets import dcil

    if order not in dcil.TASK_ORDERS:
        raise KeyError(f"unknown task order {order!r}; choose from {sorted(dcil.TASK_ORDERS)}")
    tasks = tasks if tasks is not None else dcil.dcil_tasks(seed)
    return [from_dataset_task(tasks[n], transform, max_train=max_train, max_test=max_test, seed=seed)
            for n in dcil.TASK_ORDERS[order]]


def task_orders() -> dict[str, list[str]]:
    from diki_edge.datasets import dcil

    return {k: list(v) for k, v in dcil.TASK_ORDERS.items()}


def holdout_sets(transform: Callable, *, max_test: int | None = None, include_debian: bool = False,
                 seed: int = 0) -> list[EvalTask]:
    """Held-out images of the bundled backbone's pretraining domains (never used to pretrain it)."""
    from diki_edge.datasets import dcil

    out = []
    for task in dcil.zero_shot_holdouts(include_debian=include_debian).values():
        out.append(from_dataset_task(task, transform, max_test=max_test, seed=seed))
    return out


def synthetic_tasks(names: Sequence[str], *, classes: int = 3, train: int = 12, test: int = 9, size: int = 32,
                    seed: int = 0) -> list[EvalTask]:
    """Tiny tasks of coloured noise (each task a colour domain, each class a brightness pattern), for tests."""
    from PIL import Image

    template = DEFAULT_TEMPLATE

    g = np.random.RandomState(seed)
    mean = np.array(CLIP_MEAN)[:, None, None]
    std = np.array(CLIP_STD)[:, None, None]
    out = []
    for ti, name in enumerate(names):
        colour = g.uniform(0.1, 0.9, size=3)

        def make(n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
            labels = np.arange(n) % classes
            imgs = []
            for y in labels:
                base = np.ones((size, size, 3)) * colour
                base[: size * (y + 1) // (classes + 1)] *= 0.3
                imgs.append(np.clip(base + g.normal(0, 0.05, base.shape), 0, 1))
            arr = np.stack(imgs).astype(np.float32)
            x = torch.from_numpy(((arr.transpose(0, 3, 1, 2) - mean) / std).astype(np.float32))
            pil = [Image.fromarray((a * 255).astype(np.uint8), "RGB") for a in arr]
            return x, torch.from_numpy(labels.astype(np.int64)), pil

        tx, ty, _ = make(train)
        vx, vy, pil = make(test)
        out.append(EvalTask(name, [f"{name} class {c}" for c in range(classes)], tx, ty, vx, vy,
                            template=template, test_images=pil, info={"domain": "synthetic"}))
    return out
