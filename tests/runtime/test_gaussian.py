"""Gaussian statistics: streamed, mergeable, and the stored arrays reproduce the exact log-density."""

from __future__ import annotations

import math

import numpy as np

from diki_edge_runtime import calibration as calib
from diki_edge_runtime.gaussian import GaussianStats, log_density


def _embeddings(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + rng.normal(size=d) * 2
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # L2-normalised like CLIP embeddings


def test_moments_match_numpy_and_ridge_is_added():
    x = _embeddings(200, 16, 0)
    stats = GaussianStats.empty(16).update(x[:70]).update(x[70:])
    assert stats.count == 200
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=0, atol=1e-14)
    cov = stats.covariance(ridge=1e-7)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False) + 1e-7 * np.eye(16), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(stats.covariance(ridge=0.5) - stats.covariance(ridge=0.0), 0.5 * np.eye(16), atol=1e-12)


def test_shards_merge_exactly():
    x = _embeddings(300, 8, 1)
    whole = GaussianStats.empty(8).update(x)
    merged = GaussianStats.empty(8).update(x[:100]).merge(GaussianStats.empty(8).update(x[100:]))
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.total, whole.total, rtol=1e-13)
    np.testing.assert_allclose(merged.outer, whole.outer, rtol=1e-13)


def _reference_log_density(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """The textbook multivariate normal log-density, in float64, independent of the whitening the bank stores:
    ``-0.5 (D log 2pi + log|Sigma| + (x - mu)^T Sigma^-1 (x - mu))`` with a solve, not a Cholesky inverse."""
    sign, log_det = np.linalg.slogdet(cov)
    assert sign > 0
    delta = x - mean
    mahalanobis = np.einsum("nd,nd->n", delta, np.linalg.solve(cov, delta.T).T)
    return -0.5 * (x.shape[1] * math.log(2 * math.pi) + log_det + mahalanobis)


def test_stored_arrays_give_the_multivariate_normal_log_density():
    d = 24
    tasks = [GaussianStats.empty(d).update(_embeddings(150, d, s)) for s in range(3)]
    scorings = [t.finalize(ridge=1e-7) for t in tasks]
    mean = np.stack([s.mean for s in scorings])
    whiten = np.stack([s.whiten for s in scorings])
    const = np.array([s.const for s in scorings])
    for s, t in zip(scorings, tasks):  # W Sigma W^T = I
        np.testing.assert_allclose(s.whiten @ t.covariance(1e-7) @ s.whiten.T, np.eye(d), atol=1e-6)
    queries = np.concatenate([_embeddings(5, d, 0), _embeddings(5, d, 7)])
    got = log_density(queries, mean, whiten, const)
    for i, t in enumerate(tasks):
        np.testing.assert_allclose(got[:, i], _reference_log_density(queries, t.mean(), t.covariance(1e-7)),
                                   rtol=1e-6)
    # samples of task 0 score highest under task 0
    assert (got[:5].argmax(1) == 0).all()


def test_calibration_weight_is_sigmoid_of_score_over_dim_minus_one():
    s = np.array([-1e9, 0.0, 512.0, 1024.0, 1e9])
    np.testing.assert_allclose(calib.weight(s, 1 / 512, -1.0), 1 / (1 + np.exp(-(np.clip(s / 512, -700, 700) - 1))),
                               rtol=1e-7, atol=1e-300)
    assert calib.weight(np.array([512.0]), 1 / 512, -1.0)[0] == 0.5
