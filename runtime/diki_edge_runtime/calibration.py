"""Per-task calibration of the familiarity weight ``M``: how a task's Gaussian score becomes the residual's weight.

The graph computes, for the selected task ``t`` of an image, ``M = sigmoid(slope_t * S_t + bias_t)`` where ``S_t``
is the task's Gaussian log-density (``task_scores``, unchanged). ``slope_t > 0`` and ``bias_t`` are the bank's
``calib_slope`` / ``calib_bias`` arrays, one value per task, fitted by one of two methods:

``paper``
    DIKI's fixed mapping ``M = sigmoid(S / D - 1)``: ``slope = 1/D``, ``bias = -1`` exactly, whatever the task.
    Banks written before per-task calibration existed load as this mapping.

``heldout``
    Fitted to the task's own distribution of scores *as images the Gaussian was not fitted on score*. The score
    is ``S = c - d2 / 2`` with ``d2`` the squared Mahalanobis distance to the task mean; the fit puts ``M`` at
    :data:`TYPICAL_WEIGHT` for the median held-out ``d2`` and at :data:`EDGE_WEIGHT` for its
    :data:`EDGE_QUANTILE` quantile, so ``M`` stays near 1 across the task's own images and falls to 0 beyond them
    at a rate set by the task's own spread (backbone- and task-independent, unlike ``S / D``). The held-out law is
    Hotelling's: a new Gaussian point against a sample of ``N`` has ``N/(N+1) d2 ~ (N-1) D/(N-D) F(D, N-D)``
    (:func:`hotelling_d2_quantile`; the chi-square law with ``D`` degrees of freedom once ``N >> D``). It needs only
    the image count and ``D``, so ``bank recalibrate`` refits any bank from what it stores, and training, label-only
    tasks and recalibration give the same values.

    The training images themselves score too high to fit on (their ``d2`` averages ``D (N-1)/N`` against the
    held-out ``D (N+1)/(N-D-2)``, a factor of 2 at N = 2D). Leave-one-out distances of the training images (exact
    from the sufficient statistics by Sherman-Morrison) were measured as the alternative source: real embeddings
    have heavier tails than the Gaussian law, so their 99th percentile lies 2-3x further out, the fitted slope is
    2-3x shallower and unfamiliar images keep a higher ``M`` (on the bundled backbone's six benchmark tasks mean
    ``M`` on Fashion-MNIST 0.74 against 0.26 with the law, with no better AUROC); the law was kept.

    A task with fewer than ``D +`` :data:`MIN_EXTRA_IMAGES` images has no usable held-out law (its covariance is
    singular or nearly so); it gets the paper mapping and the fit says why (:attr:`Calibration.note`).

Bank files record each task's calibration in its metadata (:meth:`Calibration.to_json`) besides the two arrays;
the arrays are what the graph reads. numpy and the standard library only (the runtime fits label-only tasks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PAPER = "paper"
HELDOUT = "heldout"
METHODS = (PAPER, HELDOUT)
DEFAULT_METHOD = PAPER  # measured: docs/calibration.md, "Choosing the default"
METHOD_HELP = ("How a task's familiarity score maps to M: paper (sigmoid(S/D - 1), DIKI's fixed mapping; the "
               "default) or heldout (fitted to how new images of the task score: less of the residual on unfamiliar "
               "images, some learned accuracy lost).")

HOTELLING = "hotelling"
SOURCES = (HOTELLING,)  # where a heldout fit's distances come from (recorded, so another source can be added)

TYPICAL_WEIGHT = 0.95  # M at the median held-out distance: the task's own images get nearly the whole residual
EDGE_WEIGHT = 0.5  # M at the EDGE_QUANTILE held-out distance: where the task's own distribution ends
EDGE_QUANTILE = 0.99
MIN_EXTRA_IMAGES = 5  # N >= D + 5: the held-out law has a finite variance (F's second degree of freedom > 4)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class Calibration:
    """How one task's score maps to ``M``: the method and, for ``heldout``, the held-out distances fitted to."""

    method: str = PAPER
    source: str | None = None  # heldout: one of SOURCES
    images: int = 0  # heldout: the images the held-out distribution was taken from
    typical_d2: float = 0.0  # heldout: median held-out squared Mahalanobis distance
    edge_d2: float = 0.0  # heldout: its EDGE_QUANTILE quantile
    note: str | None = None  # why a requested heldout fit fell back to the paper mapping

    def affine(self, const: float, dim: int) -> tuple[float, float]:
        """``(slope, bias)`` of ``M = sigmoid(slope * S + bias)`` for a task with Gaussian constant ``const``."""
        if self.method == PAPER:
            return 1.0 / dim, -1.0
        # sigmoid(slope (c - d2/2) + bias): EDGE_WEIGHT at edge_d2, TYPICAL_WEIGHT at typical_d2.
        slope = (_logit(TYPICAL_WEIGHT) - _logit(EDGE_WEIGHT)) / (0.5 * (self.edge_d2 - self.typical_d2))
        bias = _logit(EDGE_WEIGHT) - slope * (const - 0.5 * self.edge_d2)
        return slope, bias

    def describe(self) -> str:
        """One line for ``bank show``."""
        if self.method == PAPER:
            return PAPER + (f" ({self.note})" if self.note else "")
        return f"{HELDOUT} ({self.source}, {self.images} images)"

    def to_json(self) -> dict[str, Any]:
        if self.method == PAPER:
            return {"method": PAPER, **({"note": self.note} if self.note else {})}
        return {"method": HELDOUT, "source": self.source, "images": self.images, "typical_d2": self.typical_d2,
                "edge_d2": self.edge_d2}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Calibration:
        """From bank metadata; every problem is a ``ValueError`` naming ``where`` (the bank turns it into a
        BankError naming the file and task)."""
        if not isinstance(data, dict) or data.get("method") not in METHODS:
            raise ValueError(f"{where}: calibration must be an object with method one of {', '.join(METHODS)}, "
                             f"not {data!r}"[:300])
        if data["method"] == PAPER:
            note = data.get("note")
            if note is not None and not isinstance(note, str):
                raise ValueError(f"{where}: calibration.note must be a string")
            return cls(PAPER, note=note)
        source, images = data.get("source"), data.get("images")
        if source not in SOURCES:
            raise ValueError(f"{where}: calibration.source must be one of {', '.join(SOURCES)}, not {source!r}")
        if not isinstance(images, int) or isinstance(images, bool) or images < 1:
            raise ValueError(f"{where}: calibration.images must be a positive integer, not {images!r}")
        typical, edge = data.get("typical_d2"), data.get("edge_d2")
        for name, value in (("typical_d2", typical), ("edge_d2", edge)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{where}: calibration.{name} must be a finite number >= 0, not {value!r}")
        if not edge > typical:
            raise ValueError(f"{where}: calibration.edge_d2 ({edge}) must exceed typical_d2 ({typical}): the "
                             "slope would not be positive")
        return cls(HELDOUT, source, images, float(typical), float(edge))


def paper() -> Calibration:
    return Calibration(PAPER)


def check_affine(slope: float, bias: float, where: str) -> str | None:
    """Why ``(slope, bias)`` cannot be a calibration (non-finite, slope <= 0), or None."""
    if not (math.isfinite(slope) and math.isfinite(bias)):
        return f"{where}: calibration slope {slope} / bias {bias} is not finite"
    if slope <= 0:
        return f"{where}: calibration slope {slope} must be > 0 (M must grow with the score)"
    return None


def weight(score: np.ndarray, slope: np.ndarray | float, bias: np.ndarray | float) -> np.ndarray:
    """``M = sigmoid(slope * S + bias)`` in float64, overflow-free (the graph's formula)."""
    x = np.asarray(slope, np.float64) * np.asarray(score, np.float64) + np.asarray(bias, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ----------------------------------------------------------------------------------------------- fitting
def images_needed(dim: int) -> int:
    """The fewest images that give a task a usable held-out law (and a well-conditioned Gaussian) in ``dim``."""
    return dim + MIN_EXTRA_IMAGES


def too_few_images(count: int, dim: int) -> str | None:
    """Why ``count`` images cannot give a task a usable held-out law in ``dim`` dimensions, or None.

    The one threshold behind :func:`fit`'s fallback and :func:`few_images_warning`."""
    need = images_needed(dim)
    if count >= need:
        return None
    return f"{count} images are too few for a held-out fit in {dim} dimensions (needs {need})"


def few_images_warning(task: str, count: int, dim: int) -> str | None:
    """What the commands that add a task print when it has too few images for its Gaussian, or None."""
    if too_few_images(count, dim) is None:
        return None
    need = images_needed(dim)
    return (f"task {task!r} has {count} images, fewer than D + {MIN_EXTRA_IMAGES} = {need} (D = {dim}, the "
            "backbone's embedding dimension): its Gaussian is poorly conditioned, so images may not be routed to "
            "it, and a held-out calibration cannot be fitted (the paper mapping is used); give the task at least "
            f"{need} images")


def fit(method: str, count: int, dim: int) -> Calibration:
    """The calibration ``method`` gives a task whose Gaussian was fitted on ``count`` images in dimension ``dim``."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if method == PAPER:
        return paper()
    problem = too_few_images(count, dim)
    if problem is not None:
        return Calibration(PAPER, note=f"{problem}; the paper mapping is used")
    typical, edge = (hotelling_d2_quantile(q, count, dim) for q in (0.5, EDGE_QUANTILE))
    return Calibration(HELDOUT, HOTELLING, int(count), typical, edge)


def hotelling_d2_quantile(q: float, count: int, dim: int) -> float:
    """The ``q`` quantile of a new Gaussian point's squared Mahalanobis distance to a sample of ``count``
    (unbiased covariance): ``d2 = (N+1)/N (N-1) D/(N-D) F`` with ``F ~ F(D, N-D)``."""
    n, d = int(count), int(dim)
    f = f_quantile(q, d, n - d)
    return (n + 1) / n * (n - 1) * d / (n - d) * f


def f_quantile(q: float, d1: float, d2: float) -> float:
    """Quantile of Fisher's F(d1, d2): ``d1 X / (d1 X + d2) ~ Beta(d1/2, d2/2)``, inverted by bisection."""
    b = beta_quantile(q, 0.5 * d1, 0.5 * d2)
    return d2 * b / (d1 * (1.0 - b))


def beta_quantile(q: float, a: float, b: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(200):  # bisection to the float64 resolution of [0, 1]
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if regularized_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the Beta(a, b) distribution function (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        even = m * (b - m) * x / ((a + m2 - 1) * (a + m2))
        odd = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h
