"""MTIL metrics against hand-computed matrices (diki_edge.evaluation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diki_edge.evaluation.metrics import average, last, mtil_metrics, transfer, transfer_per_task


def test_hand_computed_3x3():
    a = [[80.0, 30.0, 10.0],
         [70.0, 90.0, 40.0],
         [60.0, 85.0, 95.0]]
    # Transfer: column 1 -> mean(A[0,1]) = 30; column 2 -> mean(A[0,2], A[1,2]) = (10 + 40) / 2 = 25;
    # mean of the column means = (30 + 25) / 2 = 27.5 (the flat upper-triangle mean would be 26.67).
    assert transfer_per_task(a).tolist() == [30.0, 25.0]
    assert transfer(a) == pytest.approx(27.5)
    # Avg: (80+30+10+70+90+40+60+85+95) / 9 = 560 / 9
    assert average(a) == pytest.approx(560.0 / 9.0)
    # Last: (60 + 85 + 95) / 3 = 80
    assert last(a) == pytest.approx(80.0)
    assert mtil_metrics(a) == pytest.approx({"transfer": 27.5, "avg": 560.0 / 9.0, "last": 80.0})


def test_hand_computed_4x4_fractions():
    a = np.array([[0.5, 0.2, 0.1, 0.4],
                  [0.4, 0.9, 0.3, 0.2],
                  [0.4, 0.8, 0.7, 0.6],
                  [0.3, 0.7, 0.6, 0.8]])
    # columns: j=1 -> 0.2; j=2 -> (0.1+0.3)/2 = 0.2; j=3 -> (0.4+0.2+0.6)/3 = 0.4; Transfer = 0.8/3
    assert transfer(a) == pytest.approx(0.8 / 3)
    assert average(a) == pytest.approx(a.sum() / 16)
    assert last(a) == pytest.approx((0.3 + 0.7 + 0.6 + 0.8) / 4)


def test_zero_shot_clip_on_mtil_reproduces_published_metrics():
    """A model that never changes has constant columns; zero-shot CLIP ViT-B/16 on MTIL (DIKI / ZSCL papers):
    per-task accuracies in MTIL order give Transfer 69.4, Avg 65.3, Last 65.3 (diki_edge/evaluation/metrics.py)."""
    zs = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]
    a = np.tile(zs, (len(zs), 1))
    m = mtil_metrics(a)
    assert m["transfer"] == pytest.approx(69.4, abs=0.05)
    assert m["avg"] == pytest.approx(65.3, abs=0.05)
    assert m["last"] == pytest.approx(65.3, abs=0.05)


def test_single_task_has_no_transfer():
    assert math.isnan(transfer([[50.0]]))
    assert average([[50.0]]) == 50.0 and last([[50.0]]) == 50.0


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [[1.0, float("nan")], [1.0, 1.0]], [], [1.0, 2.0]])
def test_rejects_non_square_or_missing(bad):
    with pytest.raises(ValueError):
        mtil_metrics(bad)
