"""The L2P-style baseline: prompts prepended per adapted layer, task chosen by key-query cosine."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diki_edge.calibrated import tokenize
from diki_edge.evaluation.baselines import PromptedCLIP, TaskPrompts
from diki_edge.evaluation.methods.common import (
    FrozenFeatures,
    LearnReport,
    Method,
    Outcome,
    Schedule,
    encode_chunks,
    fit_baseline,
    own_or_selected,
    set_key,
    time_per_image,
)
from diki_edge.evaluation.tasks import EvalTask


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

        loss, acc = fit_baseline(list(prompts.parameters()), opt, logits, task.train_y, self.schedule)
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
            emb[todo] = encode_chunks(lambda x: self.model.encode_image(x, image_prompts), task.test_x[todo])
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
        own = own_or_selected(task, holdout, learned)
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

        return time_per_image(run, pixels, batch_size)
