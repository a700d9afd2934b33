"""What every compared method shares: the protocol (:class:`Method`), outcomes, schedules, frozen features.

The evaluation protocol of each method is stated in its :attr:`Method.protocol`. Methods that select the task
themselves (DIKI and its variants, the ONNX export, the prompt baseline) classify a learned task's image among the
classes of the task they select (a wrong task is a wrong answer, as deployed); for a task not learned yet and for
held-out sets, among the image's own task's classes through whatever they selected (MTIL's zero-shot transfer
protocol). Methods without task selection (zero-shot backbone, sequential fine-tuning) always classify among the
image's own task's classes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diki_edge.calibrated import tokenize
from diki_edge.evaluation.tasks import EvalTask
from diki_edge.train import cross_entropy_loop

CHUNK = 128  # images per encoder call in evaluation


# --------------------------------------------------------------------------------------------------- common


@dataclass
class Schedule:
    """The training budget every method gets for every task."""

    epochs: int = 10
    batch_size: int = 32
    seed: int = 0


@dataclass
class Outcome:
    """Predictions of one method on one test set."""

    correct: np.ndarray  # [N] bool
    pred_class: np.ndarray  # [N] int, index into the class list used (see Method.protocol)
    selected: np.ndarray | None = None  # [N] object (task names) for methods that select a task
    weight: np.ndarray | None = None  # [N] calibrated M where the method has one

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.correct.size else math.nan


@dataclass
class LearnReport:
    task: str
    seconds: float
    train_accuracy: float
    final_loss: float
    trainable_parameters: int
    shared: bool = False  # trained once, reused (another variant or another task order)


def set_key(task: EvalTask, holdout: bool) -> str:
    return f"{'holdout' if holdout else 'task'}:{task.name}"


def encode_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else torch.zeros(0)


def fit_baseline(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                 logits_fn: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                 schedule: Schedule) -> tuple[float, float]:
    """The baselines train with DIKI's own loop (same batching and cosine schedule)."""
    g = torch.Generator().manual_seed(schedule.seed)
    return cross_entropy_loop(opt, logits_fn, labels, schedule.epochs, schedule.batch_size, g)


def time_per_image(run_batch: Callable[[torch.Tensor], Any], pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds per image of ``run_batch`` over ``pixels`` in batches (after one warm-up batch)."""
    with torch.no_grad():
        run_batch(pixels[:batch_size])
        start = time.perf_counter()
        for i in range(0, len(pixels), batch_size):
            run_batch(pixels[i:i + batch_size])
    return (time.perf_counter() - start) / max(1, len(pixels))


class FrozenFeatures:
    """The frozen backbone's normalised image embeddings of every evaluated set, computed once."""

    def __init__(self, clip: torch.nn.Module, tokenizer):
        self.clip = clip
        self.tokenizer = tokenizer
        self._cache: dict[str, torch.Tensor] = {}
        self._text: dict[tuple, torch.Tensor] = {}

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_chunks(lambda x: F.normalize(self.clip.encode_image(x), dim=-1), pixels)

    def test(self, task: EvalTask, holdout: bool) -> torch.Tensor:
        key = set_key(task, holdout)
        if key not in self._cache:
            self._cache[key] = self.image(task.test_x)
        return self._cache[key]

    def text(self, task: EvalTask) -> torch.Tensor:
        key = (tuple(task.class_names), task.template)
        if key not in self._text:
            with torch.no_grad():
                tokens = tokenize(self.tokenizer, task.class_names, task.template)
                self._text[key] = F.normalize(self.clip.encode_text(tokens), dim=-1)
        return self._text[key]


class Method:
    """One side-by-side method. Subclasses set the class attributes and implement the hooks."""

    key = ""
    title = ""
    protocol = ""
    selects_task = False

    def __init__(self) -> None:
        self.learned: list[str] = []

    def start(self, order: str) -> None:
        """Begin a new task sequence (from the pretrained backbone)."""
        self.learned = []

    def learn(self, task: EvalTask) -> LearnReport:
        raise NotImplementedError

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, int]:
        """``{"per_task", "total"}`` after the tasks learned so far."""
        raise NotImplementedError

    def inference_seconds(self, pixels: torch.Tensor, batch_size: int) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "protocol": self.protocol, "selects_task": self.selects_task}

    def close(self) -> None:
        pass


def own_or_selected(task: EvalTask, holdout: bool, learned: Sequence[str]) -> bool:
    """True when the image's task is learned: the method's own selection then decides the classes."""
    return (not holdout) and task.name in learned
