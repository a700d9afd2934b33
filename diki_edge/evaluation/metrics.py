"""MTIL metrics of an accuracy matrix, numpy only.

``A[t, j]`` is the accuracy on task ``j`` after training task ``t`` (tasks in training order, ``T x T``):

* **Transfer** — zero-shot ability on tasks not learned yet: for every task ``j >= 1`` the mean of the column
  above the diagonal, ``mean_{t < j} A[t, j]``, then the mean of those ``T - 1`` column means (the MTIL / ZSCL
  definition: on MTIL it reproduces zero-shot CLIP's Transfer 69.4 from its per-task accuracies, whereas the flat
  mean over all upper-triangle cells would weight later tasks more). Undefined (``nan``) for ``T = 1``.
* **Avg** — the mean of all ``T x T`` cells.
* **Last** — the mean of the final row (every task after the whole sequence).

Accuracies may be fractions or percentages; the metrics come out in the same unit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_matrix", "transfer", "average", "last", "mtil_metrics", "transfer_per_task"]


def check_matrix(acc: Any) -> np.ndarray:
    """``acc`` as a float64 ``[T, T]`` array; raises ``ValueError`` for another shape or a missing (nan) cell."""
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"an accuracy matrix must be square [T, T] with T >= 1, got shape {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise ValueError("the accuracy matrix has missing (non-finite) cells")
    return a


def transfer_per_task(acc: Any) -> np.ndarray:
    """``[T - 1]``: for each task ``j = 1 .. T-1`` the mean accuracy on it before it was learned."""
    a = check_matrix(acc)
    return np.array([a[:j, j].mean() for j in range(1, a.shape[0])], dtype=np.float64)


def transfer(acc: Any) -> float:
    cols = transfer_per_task(acc)
    return float(cols.mean()) if cols.size else math.nan


def average(acc: Any) -> float:
    return float(check_matrix(acc).mean())


def last(acc: Any) -> float:
    return float(check_matrix(acc)[-1].mean())


def mtil_metrics(acc: Any) -> dict[str, float]:
    """``{"transfer", "avg", "last"}`` of one accuracy matrix."""
    return {"transfer": transfer(acc), "avg": average(acc), "last": last(acc)}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a positive's value exceeds a negative's, ties counting half (the Mann-Whitney form of the
    area under the ROC curve), e.g. of ``M`` on familiar vs unfamiliar images. ``nan`` when a side is empty."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(pos) or not len(neg):
        return math.nan
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # midranks: the rank of a value shared by k entries is the mean of the k ranks they occupy
    midrank = np.cumsum(counts) - (counts - 1) / 2
    ranks = midrank[inverse]
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
