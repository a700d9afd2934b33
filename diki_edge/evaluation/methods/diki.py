"""DIKI as the evaluator runs it: :class:`DikiEngine` trains each task once (tasks are independent) and serves
the per-sample, batch-voting, held-out-calibrated and uncalibrated variants; the second encoder pass of an image
depends only on (image, selected task, calibration) and is memoised, which gives exactly the numbers a fresh run
over each row's bank would give (tested against :class:`~diki_edge.calibrated.CalibratedDiki`)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from diki_edge.calibrated import (
    CalibratedDiki,
    calibration_levels,
    calibration_weight,
    class_text_table,
    gaussian_scores,
    interpolate_class_table,
    tokenize,
)
from diki_edge.evaluation.methods.common import (
    CHUNK,
    LearnReport,
    Method,
    Outcome,
    encode_chunks,
    own_or_selected,
    set_key,
    time_per_image,
)
from diki_edge.evaluation.tasks import EvalTask
from diki_edge.layout import layout_for
from diki_edge.model import DikiCLIP
from diki_edge.train import TrainConfig, learn_task
from diki_edge_runtime import calibration as calib
from diki_edge_runtime.bank import TaskBank, TaskSlice
from diki_edge_runtime.contract import DEFAULT_SKIP_BELOW


class UncalibratedDiki(CalibratedDiki):
    """DIKI without the calibration (ablation): per-sample task selection by the Gaussians, but ``M = 1``."""

    def select(self, f0, gauss_mean, gauss_whiten, gauss_const, calib_slope, calib_bias):
        scores, task, _ = super().select(f0, gauss_mean, gauss_whiten, gauss_const, calib_slope, calib_bias)
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
        # [1] slope, [1] bias of each (task, calibration): "task" as the task was trained, or calib.HELDOUT (the
        # task refitted to its held-out law from its statistics, for the diki-heldout variant)
        self._calib: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
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
        one = TaskBank.empty(self.layout).with_task(sl)
        arrays = one.graph_inputs()  # float32, exactly as a bank stores them
        self._gauss[name] = tuple(torch.from_numpy(np.array(arrays[k][0]))
                                  for k in ("gauss_mean", "gauss_whiten", "gauss_const"))
        for which, source in (("task", arrays), (calib.HELDOUT, one.recalibrated(calib.HELDOUT).graph_inputs())):
            self._calib[(name, which)] = tuple(torch.from_numpy(np.array(source[k]))
                                               for k in ("calib_slope", "calib_bias"))
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
            self._f0[key] = encode_chunks(self.diki.encode_image, task.test_x)
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

    def weight(self, score: torch.Tensor, names: Sequence[str], sel: torch.Tensor, which: str = "task") -> torch.Tensor:
        """The calibrated ``M`` of scores of the tasks ``names[sel]`` under calibration ``which`` ("task": each
        task's own as trained, or calib.HELDOUT: refitted), the same float32 expression as CalibratedDiki."""
        slope = torch.cat([self._calib[(n, which)][0] for n in names]).index_select(0, sel)
        bias = torch.cat([self._calib[(n, which)][1] for n in names]).index_select(0, sel)
        return calibration_weight(score, slope, bias)

    def second_pass(self, task: EvalTask, holdout: bool, name: str, which: str | None,
                    idx: torch.Tensor) -> torch.Tensor:
        """Embeddings of images ``idx`` with task ``name``'s adapter at their own ``M`` under calibration
        ``which`` (None: at M = 1)."""
        calibrated = which is not None
        key = (set_key(task, holdout), name, which or "one")
        n = len(task.test_y)
        if key not in self._pass2:
            self._pass2[key] = (torch.zeros(n, self.dim), torch.zeros(n, dtype=torch.bool))
        emb, done = self._pass2[key]
        todo = idx[~done[idx]]
        if len(todo):
            f0 = self.f0(task, holdout)
            if calibrated:
                w = self.weight(self.scores(task, holdout, [name])[todo, 0], [name],
                                torch.zeros(len(todo), dtype=torch.int64), which)
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
        of ``vote_batch`` test images of this set), "heldout" (per-sample, every task refitted to its held-out law
        whatever it was trained with) or "uncalibrated" (per-sample selection, M = 1)."""
        scores = self.scores(task, holdout, learned)  # [N, t]
        sel = scores.argmax(dim=1)
        if mode == "vote":
            for i in range(0, len(sel), vote_batch):
                votes = torch.bincount(sel[i:i + vote_batch], minlength=len(learned))
                sel[i:i + vote_batch] = int(votes.argmax())
        chosen = scores.gather(1, sel.unsqueeze(1)).squeeze(1)
        which = None if mode == "uncalibrated" else calib.HELDOUT if mode == "heldout" else "task"
        weight = self.weight(chosen, learned, sel, which) if which else torch.ones(len(sel))
        text_weight = weight.clone()
        if mode == "vote":
            for i in range(0, len(sel), vote_batch):
                text_weight[i:i + vote_batch] = weight[i:i + vote_batch].mean()
        own = own_or_selected(task, holdout, learned)
        pred = torch.zeros(len(sel), dtype=torch.int64)
        for s in sel.unique().tolist():
            idx = torch.nonzero(sel == s).squeeze(1)
            name = learned[s]
            f = self.second_pass(task, holdout, name, which, idx)
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
        "heldout": ("diki-heldout", "DIKI, per-task held-out calibration (per-sample)",
                    "per-sample task selection by Gaussian log-density, M fitted per task to its held-out law "
                    "(diki_edge_runtime.calibration, method heldout)"),
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
        return time_per_image(lambda x: module(x, **inputs), pixels, batch_size)
