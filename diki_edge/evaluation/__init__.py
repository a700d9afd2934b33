"""Evaluation of continual learning on a task sequence: MTIL metrics, side-by-side methods, reports.

* :mod:`.metrics` — accuracy matrix -> Transfer / Avg / Last (numpy only);
* :mod:`.methods` / :mod:`.baselines` — zero-shot, DIKI (per-sample, batch vote, no calibration, ONNX),
  L2P-style prompt prepending, sequential fine-tuning;
* :mod:`.runner` — fills ``A[t, j]`` for every method and task order, with cost and retention measurements;
* :mod:`.report` — markdown, JSON, PNG heatmap; :mod:`.command` — ``diki-edge eval``.

Importing this package does not import torch.
"""

from diki_edge.evaluation.metrics import (
    average,
    last,
    mtil_metrics,
    transfer,
    transfer_per_task,
)

__all__ = ["mtil_metrics", "transfer", "average", "last", "transfer_per_task"]
