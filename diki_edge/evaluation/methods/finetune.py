"""Sequential full fine-tuning of the image encoder: the upper bound on plasticity, the lower one on retention."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diki_edge.calibrated import tokenize
from diki_edge.evaluation.methods.common import (
    LearnReport,
    Method,
    Outcome,
    Schedule,
    encode_chunks,
    fit_baseline,
    time_per_image,
)
from diki_edge.evaluation.tasks import EvalTask


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
        loss, acc = fit_baseline(params, opt, logits, task.train_y, self.schedule)
        self.learned.append(task.name)
        return LearnReport(task.name, time.perf_counter() - start, acc, loss, sum(p.numel() for p in params))

    def evaluate(self, task: EvalTask, holdout: bool = False) -> Outcome:
        model = self.model
        f = encode_chunks(lambda x: F.normalize(model.encode_image(x), dim=-1), task.test_x)
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
        return time_per_image(lambda x: (F.normalize(self.model.encode_image(x), dim=-1) @ table.T).argmax(1),
                               pixels, batch_size)

    def close(self) -> None:
        self.model = None
