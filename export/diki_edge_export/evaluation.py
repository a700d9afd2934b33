"""The DCIL benchmark's ``diki-onnx`` method (registered in the ``diki_edge.eval_methods`` entry-point group, so
the training core's evaluator never imports the exporter): DIKI exported, the bank of each row exported once and
run through the torch-free runtime's :meth:`~diki_edge_runtime.predictor.Predictor.predict`, every accuracy-matrix
entry included: a learned task's images among the selected task's classes (the bank's own), a task not learned yet
and the held-out sets among their own class names given as ``labels=`` (the runtime's text graph encodes them
under the selected task's adapter at each image's ``M``, exactly as DIKI does)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from diki_edge.evaluation.methods.common import (
    CHUNK,
    LearnReport,
    Method,
    Outcome,
    own_or_selected,
    set_key,
)
from diki_edge.evaluation.methods.diki import DikiEngine
from diki_edge.evaluation.tasks import EvalTask
from diki_edge_export.exporter import export_model


class OnnxDiki(Method):
    """The exported graphs run by the runtime's Predictor, holding per row the bank of the tasks learned so far."""

    key = "diki-onnx"
    title = "DIKI exported to ONNX (runtime)"
    selects_task = True

    def __init__(self, engine: DikiEngine, work_dir: Path, pixels_from: str = "runtime", threads: int | None = None):
        super().__init__()
        self.engine = engine
        self.work_dir = Path(work_dir)
        self.pixels_from = pixels_from
        self.threads = threads
        self.predictor = None
        self.export_seconds = math.nan
        self.model_bytes = 0
        self._pixels: dict[str, np.ndarray] = {}
        self._bank_of: tuple[str, ...] = ()  # the tasks of the bank the predictor holds
        self.protocol = ("as DIKI (per-sample): diki_edge_export.export_model graphs run by diki_edge_runtime's "
                         "Predictor.predict (onnxruntime, CPU; labels= for tasks not learned yet and held-out sets)"
                         + ("; pixels from the runtime's own numpy/Pillow preprocessing" if pixels_from == "runtime"
                            else "; PyTorch-preprocessed pixels"))

    def _ensure_export(self) -> None:
        """Export once (the first row's bank); later rows swap their bank in with ``load_bank``."""
        if self.predictor is None:
            from diki_edge_runtime import Predictor

            self.work_dir.mkdir(parents=True, exist_ok=True)
            bank_path = self.engine.bank(self.learned).save(self.work_dir / "bank.safetensors")
            start = time.perf_counter()
            result = export_model(bank_path, self.work_dir / "model", backbone=self.engine.backbone, force=True,
                                  quiet=True)
            self.export_seconds = time.perf_counter() - start
            self.model_bytes = int(getattr(result, "model_bytes", 0) or 0)
            self.predictor = Predictor(self.work_dir / "model", threads=self.threads)
            self._bank_of = tuple(self.learned)
        if self._bank_of != tuple(self.learned):
            self.predictor.load_bank(self.engine.bank(self.learned))
            self._bank_of = tuple(self.learned)

    def learn(self, task: EvalTask) -> LearnReport:
        rep = self.engine.train(task)
        self.learned.append(task.name)
        return rep

    def _predict(self, task: EvalTask, holdout: bool, labels: list[str] | None):
        kwargs = dict(top_k=1, batch_size=CHUNK, labels=labels, template=task.template if labels else None)
        if self.pixels_from == "runtime" and task.test_images is not None:
            return self.predictor.predict(list(task.test_images), **kwargs)
        key = set_key(task, holdout)
        if key not in self._pixels:
            self._pixels[key] = task.test_x.numpy().astype(np.float32)
        return self.predictor.predict_pixels(self._pixels[key], **kwargs)

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        self._ensure_export()
        own = own_or_selected(task, holdout, self.learned)
        results = self._predict(task, holdout, None if own else list(task.class_names))
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"the runtime failed on {len(bad)} images of {task.name}: {bad[0]}")
        names = np.array([r.task for r in results], dtype=object)
        if own:  # the selected task's own classes, as the bank holds them
            classes = {n: self.engine.slices[n].info.classes for n in set(names)}
            pred = np.array([classes[r.task].index(r.label) for r in results], dtype=np.int64)
        else:
            pred = np.array([task.class_names.index(r.label) for r in results], dtype=np.int64)
        weight = np.array([r.weight for r in results], dtype=np.float32)
        y = task.test_y.numpy()
        correct = (names == task.name) & (pred == y) if own else pred == y
        return Outcome(correct, pred, names, weight)

    def trainable_parameters(self) -> dict[str, int]:
        per = self.engine.diki.shape.parameters_per_task
        return {"per_task": per, "total": per * len(self.learned)}

    def inference_seconds(self, pixels: torch.Tensor, batch_size: int) -> float:
        self._ensure_export()
        px = pixels.numpy().astype(np.float32)
        self.predictor.run_arrays(px[:batch_size])
        start = time.perf_counter()
        self.predictor.run_arrays(px, batch_size=batch_size)
        return (time.perf_counter() - start) / max(1, len(px))
