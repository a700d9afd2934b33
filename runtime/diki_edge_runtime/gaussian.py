"""Per-task Gaussian of image embeddings: streaming sufficient statistics and the arrays the graph scores with.

DIKI scores an image against task i by the full log-density ``S_i = log N(f; mu_i, Sigma_i)``. Here the
statistics are accumulated as (count, sum, sum of outer products) in float64 so they stream over data sets
larger than memory and merge exactly across shards or processes; ``finalize`` turns them into the three arrays
the ONNX graph consumes (:mod:`diki_edge_runtime.contract`): ``gauss_mean``, ``gauss_whiten`` (``W Sigma W^T = I``) and
``gauss_const`` (``-0.5 (D log 2pi + log|Sigma|)``). All linear algebra happens here, offline, in float64.

Nothing non-finite gets through: ``update`` refuses embeddings with NaN or infinities, ``covariance`` a ridge that
is not a finite number >= 0, and ``from_moments`` moments or results that are not finite (``ValueError`` naming
which); ``TaskBank.with_task`` turns that into a ``BankError`` for the task.

numpy only: the runtime and the bank tools use it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_RIDGE = 1e-7


@dataclass
class GaussianStats:
    """Sufficient statistics of a set of D-dimensional embeddings (float64)."""

    count: int
    total: np.ndarray  # [D] sum of embeddings
    outer: np.ndarray  # [D, D] sum of outer products

    @classmethod
    def empty(cls, dim: int) -> GaussianStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @property
    def dim(self) -> int:
        return int(self.total.shape[0])

    def update(self, embeddings: np.ndarray) -> GaussianStats:
        """Add a batch ``[N, D]`` of embeddings (any float dtype; accumulated in float64)."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape [N, {self.dim}], got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("embeddings hold NaN or infinite values")
        self.count += int(x.shape[0])
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Exact merge of two shards' statistics (what an all-reduce of the three quantities computes)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        return GaussianStats(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no samples accumulated")
        return self.total / self.count

    def covariance(self, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
        """``delta^T delta / (N - 1) + ridge * I`` — the reference's unbiased covariance plus a ridge."""
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"the ridge must be a finite number >= 0, got {ridge}")
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        mu = self.mean()
        scatter = self.outer - self.count * np.outer(mu, mu)
        cov = scatter / (self.count - 1)
        cov = 0.5 * (cov + cov.T)  # exact symmetry despite rounding in the streamed sums
        return cov + ridge * np.eye(self.dim)

    def finalize(self, ridge: float = DEFAULT_RIDGE) -> GaussianScoring:
        return GaussianScoring.from_moments(self.mean(), self.covariance(ridge))


@dataclass
class GaussianScoring:
    """The float64 arrays that score embeddings against one task: ``S = const - 0.5 ||W (f - mean)||^2``."""

    mean: np.ndarray  # [D]
    whiten: np.ndarray  # [D, D], lower triangular, W Sigma W^T = I
    const: float  # -0.5 (D log 2pi + log|Sigma|)

    @classmethod
    def from_moments(cls, mean: np.ndarray, cov: np.ndarray) -> GaussianScoring:
        cov = np.asarray(cov, np.float64)
        if not (np.isfinite(cov).all() and np.isfinite(mean).all()):
            raise ValueError("the statistics hold NaN or infinite values")
        try:
            chol = np.linalg.cholesky(cov)  # Sigma = L L^T
        except np.linalg.LinAlgError as exc:
            raise ValueError("covariance is not positive definite; increase the ridge") from exc
        dim = cov.shape[0]
        # W = L^{-1} gives W Sigma W^T = I; solve against I rather than invert for accuracy.
        whiten = np.linalg.solve(chol, np.eye(dim))
        whiten = np.tril(whiten)
        log_det = 2.0 * float(np.sum(np.log(np.diag(chol))))
        const = -0.5 * (dim * math.log(2.0 * math.pi) + log_det)
        if not (np.isfinite(whiten).all() and math.isfinite(const)):
            raise ValueError("the covariance is too close to singular for finite whitening; increase the ridge")
        return cls(np.asarray(mean, np.float64), whiten, const)


def log_density(embeddings: np.ndarray, mean: np.ndarray, whiten: np.ndarray, const: np.ndarray) -> np.ndarray:
    """Scores ``[N, T]`` of embeddings ``[N, D]`` against T stacked tasks (mean [T, D], whiten [T, D, D], const [T]).

    The same batched formula the exported graph evaluates; used by the bank tools and in tests.
    """
    f = np.asarray(embeddings, np.float64)
    delta = f[:, None, :] - np.asarray(mean, np.float64)[None]  # [N, T, D]
    z = np.einsum("tij,ntj->nti", np.asarray(whiten, np.float64), delta)
    return np.asarray(const, np.float64)[None] - 0.5 * np.sum(z * z, axis=-1)
