"""The methods compared side by side on one task sequence (issue 5, deliverable 4).

Every method sees the same backbone, the same tasks in the same order and the same training budget (epochs,
batch size, seed). Each one learns the tasks one at a time (:meth:`Method.learn`) and is evaluated on every task
after each of them (:meth:`Method.evaluate`), and on held-out images of the backbone's pretraining domains
(``holdout=True``). The evaluation protocol of each method is stated in :attr:`Method.protocol`:

* methods that **select the task themselves** (DIKI and its variants, the ONNX export, the prompt baseline): for a
  task already learned, the image is classified among the classes of *the task the method selects*; a wrongly
  selected task is a wrong answer (the deployed behaviour: the graph masks the other tasks' classes). For a task
  not learned yet and for held-out sets, the image is classified among the classes of its own task / set (the
  MTIL protocol for zero-shot transfer), through whatever the method selected (adapter / prompts and ``M``);
* methods without task selection (zero-shot backbone, sequential fine-tuning): always among the classes of the
  image's own task (MTIL's protocol for such models).

Tasks are independent in DIKI and in the prompt baseline (a task's parameters depend only on its own data), so
:class:`DikiEngine` and :class:`PromptEngine` train each task once and share it between the variants and between
task orders; the second encoder pass of an image depends only on (image, selected task) and is memoised, which
gives exactly the numbers a fresh run over each row's bank would give (tested against
:class:`~diki_edge.calibrated.CalibratedDiki`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diki_edge_runtime.bank import TaskBank, TaskSlice
from diki_edge.calibrated import (DEFAULT_SKIP_BELOW, CalibratedDiki, calibration_levels, class_text_table,
                                  familiarity, gaussian_scores, interpolate_class_table, tokenize)
from diki_edge.evaluation.baselines import PromptedCLIP, TaskPrompts
from diki_edge.evaluation.tasks import EvalTask
from diki_edge.layout import layout_for
from diki_edge.model import DikiCLIP
from diki_edge.train import TrainConfig, cross_entropy_loop, learn_task

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


def _encode_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else torch.zeros(0)


def _fit(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
         logits_fn: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, schedule: Schedule) -> tuple[float, float]:
    """The baselines train with DIKI's own loop (same batching and cosine schedule)."""
    g = torch.Generator().manual_seed(schedule.seed)
    return cross_entropy_loop(opt, logits_fn, labels, schedule.epochs, schedule.batch_size, g)


def _time_per_image(run_batch: Callable[[torch.Tensor], Any], pixels: torch.Tensor, batch_size: int) -> float:
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
        return _encode_chunks(lambda x: F.normalize(self.clip.encode_image(x), dim=-1), pixels)

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


def _own_or_selected(task: EvalTask, holdout: bool, learned: Sequence[str]) -> bool:
    """True when the image's task is learned: the method's own selection then decides the classes."""
    return (not holdout) and task.name in learned


# --------------------------------------------------------------------------------------------------- zero-shot


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
        return _time_per_image(lambda x: (self.frozen.image(x) @ table.T).argmax(1), pixels, batch_size)


# --------------------------------------------------------------------------------------------------- DIKI


class UncalibratedDiki(CalibratedDiki):
    """DIKI without the calibration (ablation): per-sample task selection by the Gaussians, but ``M = 1``."""

    def select(self, f0, gauss_mean, gauss_whiten, gauss_const):
        scores, task, _ = super().select(f0, gauss_mean, gauss_whiten, gauss_const)
        return scores, task, torch.ones(f0.shape[0], dtype=f0.dtype)


class DikiEngine:
    """Trains DIKI tasks (once each) and evaluates the variants with memoised encoder passes."""

    def __init__(self, backbone, cfg: TrainConfig, skip_below: float = DEFAULT_SKIP_BELOW):
        self.backbone = backbone
        self.cfg = cfg
        self.skip_below = skip_below
        self.diki = DikiCLIP(copy.deepcopy(backbone.model), cfg.residual_length).eval()
        self.levels = calibration_levels(cfg.levels)
        self.layout = layout_for(backbone, self.diki, self.levels, cfg.ridge)
        self.dim = self.diki.shape.embed_dim
        self.slices: dict[str, TaskSlice] = {}
        self.reports: dict[str, LearnReport] = {}
        self._gauss: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._f0: dict[str, torch.Tensor] = {}
        self._scores: dict[tuple[str, str], torch.Tensor] = {}
        self._pass2: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[tuple, torch.Tensor] = {}

    # ---- training
    def train(self, task: EvalTask) -> LearnReport:
        if task.name in self.reports:
            rep = copy.copy(self.reports[task.name])
            rep.shared = True
            return rep
        start = time.perf_counter()
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        sl, loss, acc = learn_task(self.diki, self.backbone.tokenizer, task.train_x, task.train_y, task.name,
                                   task.class_names, replace(cfg, template=task.template), self.levels)
        rep = LearnReport(task.name, time.perf_counter() - start, acc, loss, self.diki.shape.parameters_per_task)
        self.add_task(sl, rep)
        return rep

    def add_task(self, sl: TaskSlice, report: LearnReport | None = None) -> None:
        """Register a task's bank slice (trained here, or made elsewhere, e.g. :mod:`diki_edge.synthetic`)."""
        name = sl.info.name
        self.slices[name] = sl
        arrays = TaskBank.empty(self.layout).with_task(sl).graph_inputs()  # float32, exactly as a bank stores them
        self._gauss[name] = tuple(torch.from_numpy(np.array(arrays[k][0]))
                                  for k in ("gauss_mean", "gauss_whiten", "gauss_const"))
        self._kv[name] = (torch.from_numpy(arrays["bank_k"][0].copy()), torch.from_numpy(arrays["bank_v"][0].copy()))
        self._tables[(name, tuple(sl.info.classes), sl.info.template)] = torch.from_numpy(
            arrays["class_embeds"].copy())
        self.reports[name] = report or LearnReport(name, 0.0, math.nan, math.nan, self.diki.shape.parameters_per_task)

    def bank(self, names: Sequence[str]) -> TaskBank:
        bank = TaskBank.empty(self.layout)
        for n in names:
            bank = bank.with_task(self.slices[n])
        return bank

    # ---- memoised pieces
    def f0(self, task: EvalTask, holdout: bool) -> torch.Tensor:
        key = set_key(task, holdout)
        if key not in self._f0:
            self._f0[key] = _encode_chunks(self.diki.encode_image, task.test_x)
        return self._f0[key]

    def scores(self, task: EvalTask, holdout: bool, names: Sequence[str]) -> torch.Tensor:
        key = set_key(task, holdout)
        cols = []
        for n in names:
            if (key, n) not in self._scores:
                mean, whiten, const = self._gauss[n]
                with torch.no_grad():
                    self._scores[(key, n)] = gaussian_scores(self.f0(task, holdout), mean[None], whiten[None],
                                                             const[None])[:, 0]
            cols.append(self._scores[(key, n)])
        return torch.stack(cols, 1)

    def weight(self, score: torch.Tensor) -> torch.Tensor:
        """DIKI's calibration ``M`` (the same float32 expression as CalibratedDiki)."""
        return familiarity(score, self.dim)

    def second_pass(self, task: EvalTask, holdout: bool, name: str, calibrated: bool,
                    idx: torch.Tensor) -> torch.Tensor:
        """Embeddings of images ``idx`` with task ``name``'s adapter at their own ``M`` (or at 1)."""
        key = (set_key(task, holdout), name, "cal" if calibrated else "one")
        n = len(task.test_y)
        if key not in self._pass2:
            self._pass2[key] = (torch.zeros(n, self.dim), torch.zeros(n, dtype=torch.bool))
        emb, done = self._pass2[key]
        todo = idx[~done[idx]]
        if len(todo):
            f0 = self.f0(task, holdout)
            if calibrated:
                w = self.weight(self.scores(task, holdout, [name])[todo, 0])
            else:
                w = torch.ones(len(todo))
            run = w >= self.skip_below if calibrated else torch.ones(len(todo), dtype=torch.bool)
            emb[todo] = f0[todo]
            sel = todo[run]
            k, v = self._kv[name]
            wsel = w[run]
            with torch.no_grad():
                for i in range(0, len(sel), CHUNK):
                    part = sel[i:i + CHUNK]
                    emb[part] = self.diki.encode_image(task.test_x[part], k[None], v[None], wsel[i:i + CHUNK])
            done[todo] = True
        return emb[idx]

    def table(self, name: str, classes_of: EvalTask) -> torch.Tensor:
        """``[G, C, D]``: the classes of ``classes_of`` under task ``name``'s text adapter at every level."""
        key = (name, tuple(classes_of.class_names), classes_of.template)
        if key not in self._tables:
            sl = self.slices[name]
            tokens = tokenize(self.backbone.tokenizer, classes_of.class_names, classes_of.template)
            self._tables[key] = class_text_table(self.diki, tokens, torch.from_numpy(sl.text_k),
                                                 torch.from_numpy(sl.text_v), self.levels)
        return self._tables[key]

    # ---- prediction
    def predict(self, task: EvalTask, holdout: bool, learned: Sequence[str], mode: str,
                vote_batch: int = 32) -> Outcome:
        """``mode``: "sample" (per-sample selection), "vote" (reference batch voting over consecutive batches
        of ``vote_batch`` test images of this set) or "uncalibrated" (per-sample selection, M = 1)."""
        scores = self.scores(task, holdout, learned)  # [N, t]
        sel = scores.argmax(dim=1)
        if mode == "vote":
            for i in range(0, len(sel), vote_batch):
                votes = torch.bincount(sel[i:i + vote_batch], minlength=len(learned))
                sel[i:i + vote_batch] = int(votes.argmax())
        chosen = scores.gather(1, sel.unsqueeze(1)).squeeze(1)
        calibrated = mode != "uncalibrated"
        weight = self.weight(chosen) if calibrated else torch.ones(len(sel))
        text_weight = weight.clone()
        if mode == "vote":
            for i in range(0, len(sel), vote_batch):
                text_weight[i:i + vote_batch] = weight[i:i + vote_batch].mean()
        own = _own_or_selected(task, holdout, learned)
        pred = torch.zeros(len(sel), dtype=torch.int64)
        for s in sel.unique().tolist():
            idx = torch.nonzero(sel == s).squeeze(1)
            name = learned[s]
            f = self.second_pass(task, holdout, name, calibrated, idx)
            classes_of = _slice_task(self.slices[name]) if own else task
            table = interpolate_class_table(self.table(name, classes_of), text_weight[idx])
            pred[idx] = torch.einsum("bd,bcd->bc", f, table).argmax(1)
        names = np.array([learned[s] for s in sel.tolist()], dtype=object)
        y = task.test_y.numpy()
        pred_np = pred.numpy()
        correct = (names == task.name) & (pred_np == y) if own else pred_np == y
        return Outcome(correct, pred_np, names, weight.numpy())


def _slice_task(sl: TaskSlice) -> EvalTask:
    """A class-list-only EvalTask for a task's own classes (the table key)."""
    empty = torch.zeros(0)
    return EvalTask(sl.info.name, list(sl.info.classes), empty, empty, empty, empty, template=sl.info.template)


class DikiMethod(Method):
    selects_task = True

    VARIANTS = {
        "sample": ("diki", "DIKI (per-sample selection)",
                   "per-sample task selection by Gaussian log-density, calibrated M per sample"),
        "vote": ("diki-vote", "DIKI (batch voting)",
                 "one task per test batch by majority vote, batch-mean M on the text side (reference behaviour)"),
        "uncalibrated": ("diki-no-calib", "DIKI without calibration (M = 1)",
                         "per-sample task selection by Gaussian log-density, M = 1 always"),
    }

    def __init__(self, engine: DikiEngine, mode: str = "sample", vote_batch: int = 32):
        super().__init__()
        if mode not in self.VARIANTS:
            raise ValueError(f"unknown DIKI variant {mode!r}")
        self.engine, self.mode, self.vote_batch = engine, mode, vote_batch
        self.key, self.title, how = self.VARIANTS[mode]
        if mode == "vote":
            how += f"; test batch size {vote_batch}, each batch from one task's test set (as in MTIL)"
        self.protocol = (how + "; a learned task's image is classified among the classes of the selected task "
                         "(wrong task = wrong answer); unlearned tasks / held-out sets among their own classes "
                         "through the selected adapter")

    def learn(self, task: EvalTask) -> LearnReport:
        rep = self.engine.train(task)  # shared: the variants differ in inference only, and tasks are independent
        self.learned.append(task.name)
        return rep

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        return self.engine.predict(task, holdout, self.learned, self.mode, self.vote_batch)

    def trainable_parameters(self) -> dict[str, int]:
        per = self.engine.diki.shape.parameters_per_task
        return {"per_task": per, "total": per * len(self.learned)}

    def calibrated_module(self) -> CalibratedDiki:
        if self.mode == "uncalibrated":
            return UncalibratedDiki(self.engine.diki).eval()
        return CalibratedDiki(self.engine.diki, batch_vote=self.mode == "vote",
                              skip_below=self.engine.skip_below).eval()

    def inference_seconds(self, pixels: torch.Tensor, batch_size: int) -> float:
        from diki_edge.calibrated import bank_tensors

        inputs = bank_tensors(self.engine.bank(self.learned))
        module = self.calibrated_module()
        return _time_per_image(lambda x: module(x, **inputs), pixels, batch_size)


# --------------------------------------------------------------------------------------------------- ONNX


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
                from diki_edge_runtime import load_rgb

                pre = self.predictor.preprocess
                self._pixels[key] = np.stack([pre(load_rgb(im)) for im in task.test_images]).astype(np.float32)
            else:
                self._pixels[key] = task.test_x.numpy().astype(np.float32)
        return self._pixels[key]

    def _arrays(self, task: EvalTask, own: bool) -> dict[str, np.ndarray]:
        arrays = dict(self.engine.bank(self.learned).graph_inputs())
        if not own:  # the image's own classes, under every learned task's text adapter
            tables = [self.engine.table(n, task).numpy() for n in self.learned]
            arrays["class_embeds"] = np.concatenate(tables, axis=1).astype(np.float32)
            arrays["class_task"] = np.repeat(np.arange(len(self.learned), dtype=np.int64), len(task.class_names))
        dtypes = self.predictor._dtypes
        return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in arrays.items()}

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        self._ensure_export()
        own = _own_or_selected(task, holdout, self.learned)
        arrays = self._arrays(task, own)
        session = self.predictor.session
        handle = session.prepare_bank(arrays)
        pixels = self._pixel_values(task, holdout)
        outs = [session.run(pixels[i:i + CHUNK], handle) for i in range(0, len(pixels), CHUNK)]
        logits = np.concatenate([o["logits"] for o in outs])
        sel = np.concatenate([o["task"] for o in outs]).astype(np.int64)
        weight = np.concatenate([o["weight"] for o in outs])
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
        session = self.predictor.session
        handle = session.prepare_bank(self._arrays_for_bank())
        px = pixels.numpy().astype(np.float32)
        session.run(px[:batch_size], handle)
        start = time.perf_counter()
        for i in range(0, len(px), batch_size):
            session.run(px[i:i + batch_size], handle)
        return (time.perf_counter() - start) / max(1, len(px))

    def _arrays_for_bank(self) -> dict[str, np.ndarray]:
        arrays = self.engine.bank(self.learned).graph_inputs()
        dtypes = self.predictor._dtypes
        return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptConfig:
    lr: float = 0.03  # L2P's reference: Adam, lr 0.03 (constant there; cosine here like every method)
    prompt_length: int | None = None  # default 2 l: DIKI's parameter budget per adapted layer
    seed: int = 0


class PromptEngine:
    """L2P-style prompt prepending with key-query selection (model code in :mod:`.baselines`)."""

    def __init__(self, backbone, frozen: FrozenFeatures, residual_length: int, cfg: PromptConfig,
                 schedule: Schedule):
        self.backbone = backbone
        self.frozen = frozen
        self.cfg = cfg
        self.schedule = schedule
        length = cfg.prompt_length or 2 * residual_length
        self.model = PromptedCLIP(copy.deepcopy(backbone.model), length).eval()
        self.prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.reports: dict[str, LearnReport] = {}
        self.classes: dict[str, EvalTask] = {}
        self._pass2: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[tuple, torch.Tensor] = {}

    @property
    def parameters_per_task(self) -> int:
        return self.model.parameters_per_task + self.model.embed_dim  # prompts + key

    def train(self, task: EvalTask) -> LearnReport:
        empty = torch.zeros(0)
        self.classes[task.name] = EvalTask(task.name, list(task.class_names), empty, empty, empty, empty,
                                           template=task.template)
        if task.name in self.reports:
            rep = copy.copy(self.reports[task.name])
            rep.shared = True
            return rep
        start = time.perf_counter()
        g = torch.Generator().manual_seed(self.cfg.seed)
        prompts = TaskPrompts(self.model, generator=g)
        opt = torch.optim.Adam(prompts.parameters(), lr=self.cfg.lr)
        tokens = tokenize(self.backbone.tokenizer, task.class_names, task.template)
        scale = self.model.logit_scale

        def logits(idx: torch.Tensor) -> torch.Tensor:
            text = self.model.encode_text(tokens, prompts.text_prompts())
            return scale * self.model.encode_image(task.train_x[idx], prompts.image_prompts()) @ text.T

        loss, acc = _fit(list(prompts.parameters()), opt, logits, task.train_y, self.schedule)
        query = self.frozen.image(task.train_x)
        self.keys[task.name] = F.normalize(query.mean(0), dim=0)
        self.prompts[task.name] = (prompts.image.detach().clone(), prompts.text.detach().clone())
        rep = LearnReport(task.name, time.perf_counter() - start, acc, loss, self.parameters_per_task)
        self.reports[task.name] = rep
        return rep

    def second_pass(self, task: EvalTask, holdout: bool, name: str, idx: torch.Tensor) -> torch.Tensor:
        key = (set_key(task, holdout), name)
        n = len(task.test_y)
        if key not in self._pass2:
            self._pass2[key] = (torch.zeros(n, self.model.embed_dim), torch.zeros(n, dtype=torch.bool))
        emb, done = self._pass2[key]
        todo = idx[~done[idx]]
        if len(todo):
            image_prompts = self.prompts[name][0][None]
            emb[todo] = _encode_chunks(lambda x: self.model.encode_image(x, image_prompts), task.test_x[todo])
            done[todo] = True
        return emb[idx]

    def table(self, name: str, classes_of: EvalTask) -> torch.Tensor:
        key = (name, tuple(classes_of.class_names), classes_of.template)
        if key not in self._tables:
            tokens = tokenize(self.backbone.tokenizer, classes_of.class_names, classes_of.template)
            with torch.no_grad():
                self._tables[key] = self.model.encode_text(tokens, self.prompts[name][1][None])
        return self._tables[key]

    def select(self, queries: torch.Tensor, learned: Sequence[str]) -> torch.Tensor:
        keys = torch.stack([self.keys[n] for n in learned])
        return (queries @ keys.T).argmax(1)

    def predict(self, task: EvalTask, holdout: bool, learned: Sequence[str]) -> Outcome:
        sel = self.select(self.frozen.test(task, holdout), learned)
        own = _own_or_selected(task, holdout, learned)
        pred = torch.zeros(len(sel), dtype=torch.int64)
        for s in sel.unique().tolist():
            idx = torch.nonzero(sel == s).squeeze(1)
            name = learned[s]
            classes_of = self.classes[name] if own else task
            pred[idx] = (self.second_pass(task, holdout, name, idx) @ self.table(name, classes_of).T).argmax(1)
        names = np.array([learned[s] for s in sel.tolist()], dtype=object)
        y = task.test_y.numpy()
        pred_np = pred.numpy()
        correct = (names == task.name) & (pred_np == y) if own else pred_np == y
        return Outcome(correct, pred_np, names)


class PromptMethod(Method):
    key = "prompt-l2p"
    title = "Prompt prepending, key-query selection (L2P-style)"
    selects_task = True

    def __init__(self, engine: PromptEngine):
        super().__init__()
        self.engine = engine
        m = engine.model
        self.protocol = (f"{m.prompt_length} prompt tokens prepended to the input of each of the first "
                         f"{m.image_layers} image / {m.text_layers} text blocks (deep prompting; DIKI's parameter "
                         "count) + one key per task; per-sample selection of the task whose key has the highest "
                         "cosine with the frozen image embedding; classes as for DIKI (selected task decides)")

    def learn(self, task: EvalTask) -> LearnReport:
        rep = self.engine.train(task)
        self.learned.append(task.name)
        return rep

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        return self.engine.predict(task, holdout, self.learned)

    def trainable_parameters(self) -> dict[str, int]:
        per = self.engine.parameters_per_task
        return {"per_task": per, "total": per * len(self.learned)}

    def inference_seconds(self, pixels: torch.Tensor, batch_size: int) -> float:
        eng = self.engine
        keys = torch.stack([eng.keys[n] for n in self.learned])
        image_prompts = torch.stack([eng.prompts[n][0] for n in self.learned])  # [T, L, p, W]
        table = torch.randn(64, eng.model.embed_dim)

        def run(x: torch.Tensor):
            q = eng.frozen.image(x)
            s = (q @ keys.T).argmax(1)
            f = eng.model.encode_image(x, image_prompts[s])
            return (f @ table.T).argmax(1)

        return _time_per_image(run, pixels, batch_size)


# --------------------------------------------------------------------------------------------------- fine-tuning


@dataclass
class FineTuneConfig:
    lr: float = 1e-5  # ZSCL's full fine-tuning baseline on MTIL: AdamW, lr 1e-5
    weight_decay: float = 0.0


class SequentialFineTune(Method):
    key = "finetune"
    title = "Sequential full fine-tuning"
    protocol = ("all backbone weights (both encoders; logit scale frozen) trained task after task with AdamW on a "
                "copy of the backbone; each image classified among the classes of its own task / set")

    def __init__(self, backbone, cfg: FineTuneConfig, schedule: Schedule):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.schedule = schedule
        self.model: torch.nn.Module | None = None

    def start(self, order: str) -> None:
        super().start(order)
        self.model = copy.deepcopy(self.backbone.model).eval()
        for name, p in self.model.named_parameters():
            p.requires_grad_(name != "logit_scale")

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def learn(self, task: EvalTask) -> LearnReport:
        start = time.perf_counter()
        params = self._params()
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        tokens = tokenize(self.backbone.tokenizer, task.class_names, task.template)
        scale = float(self.model.logit_scale.detach().exp())
        model = self.model

        def logits(idx: torch.Tensor) -> torch.Tensor:
            text = F.normalize(model.encode_text(tokens), dim=-1)
            return scale * F.normalize(model.encode_image(task.train_x[idx]), dim=-1) @ text.T

        torch.manual_seed(self.schedule.seed)
        loss, acc = _fit(params, opt, logits, task.train_y, self.schedule)
        self.learned.append(task.name)
        return LearnReport(task.name, time.perf_counter() - start, acc, loss, sum(p.numel() for p in params))

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        model = self.model
        f = _encode_chunks(lambda x: F.normalize(model.encode_image(x), dim=-1), task.test_x)
        with torch.no_grad():
            text = F.normalize(model.encode_text(tokenize(self.backbone.tokenizer, task.class_names,
                                                          task.template)), dim=-1)
        pred = (f @ text.T).argmax(1).numpy()
        return Outcome(pred == task.test_y.numpy(), pred)

    def trainable_parameters(self) -> dict[str, int]:
        n = sum(p.numel() for p in self._params()) if self.model is not None else 0
        return {"per_task": n, "total": n}

    def inference_seconds(self, pixels: torch.Tensor, batch_size: int) -> float:
        table = torch.randn(64, self.model.visual.output_dim)
        return _time_per_image(lambda x: (F.normalize(self.model.encode_image(x), dim=-1) @ table.T).argmax(1),
                               pixels, batch_size)

    def close(self) -> None:
        self.model = None


METHOD_KEYS = ["zero-shot", "diki", "diki-vote", "diki-no-calib", "prompt-l2p", "finetune", "diki-onnx"]
