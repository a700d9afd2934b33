"""Synthetic tasks for tests and speed benchmarks: random adapters, real statistics and text tables.

A synthetic task's keys/values are random (``V_r`` non-zero so the branch matters) and its Gaussian is fitted
to the frozen embeddings of images it is given, so task selection and calibration behave as for a trained task.
Speed does not depend on the values, and parity tests need a branch that changes the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diki_edge.calibrated import class_text_table, tokenize
from diki_edge.model import DikiCLIP, TaskAdapter
from diki_edge.train import frozen_statistics
from diki_edge_runtime import calibration as calib
from diki_edge_runtime.bank import TaskInfo, TaskSlice
from diki_edge_runtime.contract import DEFAULT_TEMPLATE


@torch.no_grad()
def synthetic_task(diki: DikiCLIP, tokenizer, name: str, classes: Sequence[str], images: torch.Tensor,
                   levels: Sequence[float], seed: int = 0, value_scale: float = 0.5,
                   template: str = DEFAULT_TEMPLATE, calibration: str = calib.PAPER) -> TaskSlice:
    """A task whose Gaussian is fitted to ``images`` ([N, 3, H, W], N >= 2) and whose adapter is random;
    ``calibration``: the method of :func:`diki_edge_runtime.calibration.fit`."""
    g = torch.Generator().manual_seed(seed)
    adapter = TaskAdapter(diki.shape, generator=g)
    adapter.image_v.copy_(torch.randn(adapter.image_v.shape, generator=g) * value_scale)
    adapter.text_v.copy_(torch.randn(adapter.text_v.shape, generator=g) * value_scale)
    stats = frozen_statistics(diki, images, batch_size=64)
    table = class_text_table(diki, tokenize(tokenizer, classes, template), adapter.text_k, adapter.text_v, levels)
    info = TaskInfo(name, list(classes), template, stats.count,
                    calibration=calib.fit(calibration, stats.count, stats.dim))
    return adapter.to_slice(info, stats, table)
