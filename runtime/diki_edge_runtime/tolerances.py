"""Float32 error bounds for comparing two implementations of the graph (ONNX Runtime vs PyTorch, one CPU's GEMM
kernels vs another's). Owned here, torch-free, so that the export validation and the test suite (including the
runtime-only tests) share one derivation instead of constants tuned on one machine.

Notation: ``u = 2**-24`` (float32 unit roundoff), ``gamma(n) = n u / (1 - n u)`` (Higham, *Accuracy and Stability
of Numerical Algorithms*, Thm 3.1: a length-``n`` dot product computed in any summation order has an absolute
error of at most ``gamma(n) * sum |a_i b_i|``). Every bound below is the analysis' value times a stated margin.

* Embeddings (:data:`EMBED_MAX_ABS`): unit vectors out of a pre-LN transformer; see :func:`embedding_max_abs`.
* Gaussian scores ``S = c - 0.5 ||W (f - mu)||^2`` (:func:`score_error_bound`): the exact change caused by the
  observed pass-1 embedding difference plus the worst-case rounding of each side. The rounding grows with
  ``||z||^2`` and ``|z|^T |W| |f - mu|`` times ``gamma(D)``, i.e. with the whitening's norm and the dimension, so a
  fixed relative bound (which held on one CPU and failed on another) is replaced by this per-score one.
* The weight ``M = sigmoid(slope S + bias)`` (:func:`weight_error_bound`): ``|dM/dS| <= slope / 4`` (``1 / (4 D)``
  for the paper's mapping).
"""

from __future__ import annotations

import math

import numpy as np

UNIT_ROUNDOFF = 2.0**-24  # float32
# Applied on top of every worst-case figure below: covers the second-order terms the first-order analysis drops and
# evaluating a side's rounding at the reference's intermediate values instead of its own.
MARGIN = 2.0


def gamma(n: int, u: float = UNIT_ROUNDOFF) -> float:
    """Higham's ``gamma_n``: worst-case relative error of an ``n``-term float32 sum of products, any order."""
    return n * u / (1.0 - n * u)


def embedding_max_abs(width: int = 768, layers: int = 12, margin: float = 4.0) -> float:
    """Bound on ``max |f_a - f_b|`` of two float32 implementations' L2-normalised embeddings.

    Each block has 4 GEMM stages (qkv, attention out, MLP up, MLP down; inner dimension at most ``4 width``). Two
    kernels' summation orders give independent rounding, so per stage the relative error of the residual stream is
    about ``sqrt(4 width) u`` (the probabilistic ``sqrt(n) u`` of Higham & Mary 2019, not the worst case ``n u``,
    which no two real kernels approach over thousands of sums); pre-LN residual blocks add those errors without
    amplifying them, so after ``4 layers`` stages the relative error is ``sqrt(4 layers) sqrt(4 width) u``, and on a
    unit vector that is the absolute error per component at most. ``margin`` 4 covers LayerNorm's
    ``1/std`` amplification on low-variance tokens and the projection. ViT-B/16 (768, 12): 9.2e-5 -> 1e-4;
    any smaller backbone (``diki-tiny``, the tests' configs) has a smaller analysis value, so 1e-4 holds for all.
    """
    return margin * math.sqrt(4 * layers) * math.sqrt(4 * width) * UNIT_ROUNDOFF


# Rounded up from embedding_max_abs() for the largest supported backbone (ViT-B/16): 9.2e-5.
EMBED_MAX_ABS = 1e-4


def _as64(*arrays) -> list[np.ndarray]:
    return [np.asarray(a, np.float64) for a in arrays]


def score_rounding_bound(embeds: np.ndarray, mean: np.ndarray, whiten: np.ndarray, const: np.ndarray) -> np.ndarray:
    """``[N, T]`` worst-case float32 rounding error of one implementation's ``S = c - 0.5 ||W (f - mu)||^2``.

    ``d = fl(f - mu)`` (error ``u |d|``) then ``z_i = sum_j W_ij d_j`` (``D`` terms): ``|dz_i| <= gamma(D+1)
    (|W| |d|)_i``; ``q = sum z_i^2``: ``|dq| <= gamma(D) ||z||^2 + 2 |z|^T |dz|``; ``S = c - 0.5 q``: one more
    rounding of ``|c| + 0.5 q``.
    """
    f, mu, w, c = _as64(embeds, mean, whiten, const)
    dim = f.shape[1]
    d = f[:, None, :] - mu[None]  # [N, T, D]
    z = np.einsum("tij,ntj->nti", w, d)
    abs_wd = np.einsum("tij,ntj->nti", np.abs(w), np.abs(d))
    q = np.sum(z * z, axis=-1)
    dq = gamma(dim) * q + 2.0 * gamma(dim + 1) * np.sum(np.abs(z) * abs_wd, axis=-1)
    return UNIT_ROUNDOFF * (np.abs(c)[None] + 0.5 * q) + 0.5 * dq


def score_error_bound(ref_embeds: np.ndarray, got_embeds: np.ndarray, mean: np.ndarray, whiten: np.ndarray,
                      const: np.ndarray, margin: float = MARGIN) -> np.ndarray:
    """``[N, T]`` bound on ``|S_got - S_ref|`` when two implementations score their own pass-1 embeddings.

    With ``z = W (f_ref - mu)`` and ``e = f_got - f_ref`` (the observed embedding difference), exactly
    ``S(f_got) - S(f_ref) = -z^T W e - 0.5 ||W e||^2``; each side then adds at most
    :func:`score_rounding_bound`. The sum times ``margin``.
    """
    f, g, mu, w = _as64(ref_embeds, got_embeds, mean, whiten)
    z = np.einsum("tij,ntj->nti", w, f[:, None, :] - mu[None])
    we = np.einsum("tij,nj->nti", w, g - f)
    propagated = np.abs(np.sum(z * we, axis=-1)) + 0.5 * np.sum(we * we, axis=-1)
    rounding = score_rounding_bound(ref_embeds, mean, whiten, const)
    return margin * (propagated + 2.0 * rounding)


def weight_error_bound(score_bound: np.ndarray, ref_score: np.ndarray, slope: np.ndarray | float,
                       bias: np.ndarray | float) -> np.ndarray:
    """Bound on ``|M_got - M_ref|`` for ``M = sigmoid(slope * S + bias)`` (the chosen task's calibration; the
    paper's mapping is ``slope = 1/D, bias = -1``) given a bound on the chosen score's error.

    ``|dM/dS| = slope M (1 - M) <= slope / 4``; float32 forms ``x = slope * S + bias`` with error
    ``2 u (|slope S| + |bias|)`` (a product and a sum; both implementations take the same float32 slope and bias),
    and the sigmoid itself (exp, add, divide) adds ``4 u`` to a value in [0, 1]. Both implementations round: doubled.
    """
    s, e, a, b = _as64(ref_score, score_bound, slope, bias)
    x_rounding = 2.0 * UNIT_ROUNDOFF * (np.abs(a * s) + np.abs(b))
    return 0.25 * (a * e + 2.0 * x_rounding) + 2.0 * 4.0 * UNIT_ROUNDOFF


def tasks_agree(got_task: np.ndarray, ref_scores: np.ndarray, ref_task: np.ndarray,
                score_bound: np.ndarray) -> np.ndarray:
    """Per image: the selected task is the reference's, or the two are tied within the scores' error bound (then
    either choice is a correct float32 result)."""
    rows = np.arange(len(got_task))
    gap = ref_scores[rows, ref_task] - ref_scores[rows, got_task]
    return (got_task == ref_task) | (gap <= score_bound[rows, ref_task] + score_bound[rows, got_task])


# ---------------------------------------------------------------------------------------------- bf16 (OpenVINO)
BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16: 8 significand bits


def bf16_embedding_rel_error(width: int = 768, layers: int = 12, margin: float = 4.0) -> float:
    """Bound on ``||f_bf16 - f_fp32|| / ||f_fp32||`` of the image embedding when the matrix products round their
    inputs to bf16 and accumulate in fp32 (OpenVINO's CPU plugin on AMX / AVX512-BF16).

    Rounding both operands of a product to bf16 perturbs each term of a dot product by at most ``2 u`` relatively
    (``u = 2**-8``); with independent signs the sum's relative error is about ``sqrt(2) u`` (the fp32 accumulation,
    ``sqrt(n) 2**-24``, is negligible beside it), independent of the inner dimension. Pre-LN residual blocks add the
    errors of their ``4 layers`` GEMM stages without amplifying them: ``sqrt(4 layers) sqrt(2) u``. ``margin`` 4
    covers LayerNorm's ``1/std`` amplification, softmax and the projection. ``width`` does not enter (kept for the
    signature of :func:`embedding_max_abs`). ViT-B/16: 0.153; a shallower backbone has a smaller one.
    """
    del width
    return margin * math.sqrt(4 * layers) * math.sqrt(2.0) * BF16_UNIT_ROUNDOFF


def bf16_min_cosine(width: int = 768, layers: int = 12, margin: float = 4.0) -> float:
    """The smallest embedding cosine with fp32 allowed at bf16: ``cos >= 1 - r^2 / 2`` for a relative error ``r``
    (:func:`bf16_embedding_rel_error`) of a unit vector. ViT-B/16: 0.988, which holds for any shallower backbone."""
    r = bf16_embedding_rel_error(width, layers, margin)
    return 1.0 - 0.5 * r * r


# Rounded down from bf16_min_cosine() for the largest supported backbone (ViT-B/16): 0.98830.
BF16_MIN_COSINE = 0.988
