"""The frozen backbone, zero-shot: the reference every other method's transfer is measured against."""

from __future__ import annotations

import math

import torch

from diki_edge.evaluation.methods.common import (
    FrozenFeatures,
    LearnReport,
    Method,
    Outcome,
    time_per_image,
)
from diki_edge.evaluation.tasks import EvalTask


class ZeroShot(Method):
    key = "zero-shot"
    title = "Zero-shot backbone"
    protocol = "frozen backbone, no training; each image classified among the classes of its own task / set"

    def __init__(self, frozen: FrozenFeatures):
        super().__init__()
        self.frozen = frozen

    def learn(self, task: EvalTask) -> LearnReport:
        self.learned.append(task.name)
        return LearnReport(task.name, 0.0, math.nan, math.nan, 0)

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        f = self.frozen.test(task, holdout)
        pred = (f @ self.frozen.text(task).T).argmax(1).numpy()
        return Outcome(pred == task.test_y.numpy(), pred)

    def trainable_parameters(self) -> dict[str, int]:
        return {"per_task": 0, "total": 0}

    def inference_seconds(self, pixels: torch.Tensor, batch_size: int) -> float:
        table = torch.randn(64, self.frozen.clip.visual.output_dim)
        return time_per_image(lambda x: (self.frozen.image(x) @ table.T).argmax(1), pixels, batch_size)
