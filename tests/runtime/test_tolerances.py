"""The shared float32 error bounds (diki_edge_runtime.tolerances) hold against float64 and are not vacuous."""

from __future__ import annotations

import numpy as np

from diki_edge_runtime import tolerances as tol
from diki_edge_runtime.gaussian import GaussianStats, log_density


def _task(dim: int, seed: int, ridge: float = 1e-3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * dim, dim)) * rng.uniform(0.01, 1.0, size=dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scoring = GaussianStats.empty(dim).update(x).finalize(ridge)
    return x, scoring


def _float32_scores(f, mean, whiten, const):
    d = f.astype(np.float32)[:, None, :] - mean.astype(np.float32)[None]
    z = np.einsum("tij,ntj->nti", whiten.astype(np.float32), d)
    return const.astype(np.float32)[None] - np.float32(0.5) * np.sum(z * z, axis=-1)


def test_float32_scores_are_within_the_rounding_bound_of_float64_and_the_bound_is_tight_enough_to_catch_bugs():
    for dim in (16, 64, 256):
        x, s = _task(dim, seed=dim)
        queries = np.concatenate([x[:8], np.random.default_rng(0).normal(size=(8, dim))]).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        mean, whiten, const = (np.asarray(a, np.float32)[None] for a in (s.mean, s.whiten, [s.const]))
        const = const.reshape(1)
        exact = log_density(queries, mean, whiten, const)  # float64 from the same float32 arrays
        bound = tol.score_rounding_bound(queries, mean, whiten, const)
        assert (np.abs(_float32_scores(queries, mean, whiten, const) - exact) <= bound).all(), dim
        # Not vacuous: the bound is gamma(D)-sized against the score's magnitude terms |c| + 0.5 ||z||^2 (~5e-6 of
        # them at D = 256 with the margin), so an error of 1e-4 of those terms, or 0.05 absolute here, is caught.
        magnitude = np.abs(const)[None] + (const[None] - exact)
        assert (bound <= 1e-4 * magnitude).all() and bound.max() < 0.05, dim


def test_score_error_bound_follows_the_embedding_difference():
    x, s = _task(32, seed=1)
    f = x[:6].astype(np.float32)
    mean, whiten, const = np.float32(s.mean)[None], np.float32(s.whiten)[None], np.float32([s.const])
    moved = f + np.float32(1e-5)
    exact = log_density(moved, mean, whiten, const) - log_density(f, mean, whiten, const)
    bound = tol.score_error_bound(f, moved, mean, whiten, const)
    assert (np.abs(exact) <= bound).all()
    assert (bound < tol.score_error_bound(f, f + np.float32(1e-3), mean, whiten, const)).all()
    assert (np.abs(exact) * 10 >= bound - tol.MARGIN * 2 * tol.score_rounding_bound(f, mean, whiten, const)).all()


def test_weight_bound_and_task_ties():
    score = np.array([-10.0, 64.0, 640.0])
    # rounding only: 0.25 * 4 u (|S| / D + 1) + 8 u, i.e. a few ulps of M for scores of order D
    assert (tol.weight_error_bound(np.zeros(3), score, 1 / 64, -1.0) < 4e-6).all()
    assert tol.weight_error_bound(np.array([64.0]), np.array([64.0]), 1 / 64, -1.0)[0] >= 0.25  # |dM| <= |dS| / (4 D)
    scores = np.array([[10.0, 9.9995], [10.0, 9.0]])
    bound = np.full((2, 2), 1e-3)
    assert tol.tasks_agree(np.array([1, 0]), scores, np.array([0, 0]), bound).tolist() == [True, True]
    assert tol.tasks_agree(np.array([0, 1]), scores, np.array([0, 0]), bound).tolist() == [True, False]


def test_embedding_bound_is_the_analysis_value_for_vit_b_rounded_up():
    assert 0.8 * tol.EMBED_MAX_ABS <= tol.embedding_max_abs(768, 12) <= tol.EMBED_MAX_ABS
    assert tol.embedding_max_abs(64, 2) < tol.embedding_max_abs(768, 12)
