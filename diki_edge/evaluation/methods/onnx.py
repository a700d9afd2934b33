"""DIKI exported: the bank of each row exported once and run through the torch-free runtime's
:meth:`~diki_edge_runtime.predictor.Predictor.run_arrays`."""

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
    _own_or_selected,
    set_key,
)
from diki_edge.evaluation.methods.diki import DikiEngine
from diki_edge.evaluation.tasks import EvalTask


class OnnxDiki(Method):
    """The exported graph run by ONNX Runtime, fed per row the bank of the tasks learned so far."""

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
        self.protocol = ("as DIKI (per-sample): diki_edge_export.export_model graph run by diki_edge_runtime "
                         "(onnxruntime, CPU)" + ("; pixels from the runtime's own numpy/Pillow preprocessing"
                                                  if pixels_from == "runtime" else "; PyTorch-preprocessed pixels"))

    def _ensure_export(self) -> None:
        if self.predictor is not None:
            return
        from diki_edge_export import export_model
        from diki_edge_runtime import Predictor

        self.work_dir.mkdir(parents=True, exist_ok=True)
        bank_path = self.engine.bank(self.learned).save(self.work_dir / "bank.safetensors")
        start = time.perf_counter()
        result = export_model(bank_path, self.work_dir / "model", backbone=self.engine.backbone, force=True,
                              quiet=True)
        self.export_seconds = time.perf_counter() - start
        self.model_bytes = int(getattr(result, "model_bytes", 0) or 0)
        self.predictor = Predictor(self.work_dir / "model", threads=self.threads)

    def learn(self, task: EvalTask) -> LearnReport:
        rep = self.engine.train(task)
        self.learned.append(task.name)
        return rep

    def _pixel_values(self, task: EvalTask, holdout: bool) -> np.ndarray:
        key = set_key(task, holdout)
        if key not in self._pixels:
            if self.pixels_from == "runtime" and task.test_images is not None:
                self._pixels[key] = self.predictor.pixel_values(list(task.test_images))
            else:
                self._pixels[key] = task.test_x.numpy().astype(np.float32)
        return self._pixels[key]

    def _arrays(self, task: EvalTask, own: bool) -> dict[str, np.ndarray]:
        arrays = dict(self.engine.bank(self.learned).graph_inputs())
        if not own:  # the image's own classes, under every learned task's text adapter
            tables = [self.engine.table(n, task).numpy() for n in self.learned]
            arrays["class_embeds"] = np.concatenate(tables, axis=1).astype(np.float32)
            arrays["class_task"] = np.repeat(np.arange(len(self.learned), dtype=np.int64), len(task.class_names))
        return arrays

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        self._ensure_export()
        own = _own_or_selected(task, holdout, self.learned)
        arrays = self._arrays(task, own)
        out = self.predictor.run_arrays(self._pixel_values(task, holdout), arrays, batch_size=CHUNK)
        logits, sel, weight = out["logits"], out["task"].astype(np.int64), out["weight"]
        col = logits.argmax(1)
        class_task = arrays["class_task"]
        offsets = {t: int(np.nonzero(class_task == t)[0][0]) for t in np.unique(class_task)}
        pred = np.array([c - offsets[class_task[c]] for c in col], dtype=np.int64)
        names = np.array([self.learned[s] for s in sel], dtype=object)
        chosen_ok = np.array([class_task[c] == s for c, s in zip(col, sel)])
        y = task.test_y.numpy()
        correct = (names == task.name) & (pred == y) & chosen_ok if own else (pred == y) & chosen_ok
        return Outcome(correct, pred, names, weight)

    def trainable_parameters(self) -> dict[str, int]:
        per = self.engine.diki.shape.parameters_per_task
        return {"per_task": per, "total": per * len(self.learned)}

    def inference_seconds(self, pixels: torch.Tensor, batch_size: int) -> float:
        self._ensure_export()
        self.predictor.load_bank(self.engine.bank(self.learned))
        px = pixels.numpy().astype(np.float32)
        self.predictor.run_arrays(px[:batch_size])
        start = time.perf_counter()
        self.predictor.run_arrays(px, batch_size=batch_size)
        return (time.perf_counter() - start) / max(1, len(px))
