"""Calibrated DIKI inference in PyTorch: the reference implementation of the exported graph
(its inputs and outputs: runtime/diki_edge_runtime/contract.py).

:class:`CalibratedDiki` takes exactly the graph's inputs and returns exactly its outputs:

1. pass 1: frozen image encoder -> normalised embedding ``f0``;
2. Gaussian scores of ``f0`` against every task by one batched matmul (``S = c - 0.5 ||W (f - mu)||^2``);
3. per sample: task ``s = argmax S``, weight ``M = sigmoid(calib_slope[s] * S_s + calib_bias[s])`` (the paper's
   ``sigmoid(S_s / D - 1)`` is slope ``1/D``, bias ``-1``; :mod:`diki_edge_runtime.calibration`);
4. pass 2: image encoder with each sample's own ``K_r/V_r`` (gathered by ``s``) weighted by its own ``M``;
   samples with ``M`` below ``skip_below`` keep ``f0`` (the branch would add ~nothing);
5. class scores against the cached text table interpolated at each sample's ``M`` (:func:`class_text_table`); classes of
   other tasks than ``s`` are masked to ``-inf``.

``batch_vote=True`` reproduces the reference's behaviour instead: one task per batch by majority vote and the
batch-mean ``M`` on the text side (results then depend on the batch).

The text table itself (``class_embeds``) is made by :func:`class_text_table` from a task's text adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diki_edge.model import DikiCLIP
from diki_edge_runtime.contract import DEFAULT_SKIP_BELOW

DEFAULT_LEVELS = 9
# Below this M the residual branch's contribution is under the fp32 parity bound (see README, "skip pass 2").


class CalibratedOutput(NamedTuple):
    logits: torch.Tensor  # [B, C]
    task: torch.Tensor  # [B] int64
    weight: torch.Tensor  # [B]
    task_scores: torch.Tensor  # [B, T]
    image_embeds: torch.Tensor  # [B, D]
    frozen_embeds: torch.Tensor  # [B, D]: pass 1, what the Gaussians score


def calibration_levels(count: int = DEFAULT_LEVELS) -> list[float]:
    if count < 2:
        raise ValueError("need at least 2 calibration levels")
    return [i / (count - 1) for i in range(count)]


def gaussian_scores(f: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-densities ``c_t - 0.5 ||W_t (f - mu_t)||^2`` by one matmul batched over the tasks.

    ``f - mu_t`` is formed before whitening: ``W_t`` (inverse Cholesky factor of a ridge-regularised covariance)
    has entries of order ``1/sqrt(ridge)``, so ``W_t f - W_t mu_t`` would cancel two large terms and lose
    ~50x more float32 accuracy (measured against float64).
    """
    delta = f.unsqueeze(0) - mean.unsqueeze(1)  # [T, B, D]
    z = torch.matmul(delta, whiten.transpose(1, 2))  # [T, B, D]: W_t (f - mu_t)
    return const.unsqueeze(0) - 0.5 * (z * z).sum(-1).transpose(0, 1)


def calibration_weight(score: torch.Tensor, slope: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The calibrated weight ``M = sigmoid(slope * S + bias)`` of a selected task's log-density ``S`` (the paper's
    ``sigmoid(S / D - 1)`` with slope ``1/D``, bias ``-1``)."""
    return torch.sigmoid(score * slope + bias)


def interpolate_class_table(class_embeds: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample class text embeddings ``[B, C, D]`` at each sample's ``M``, linear between grid levels."""
    g = class_embeds.shape[0]
    pos = weight.clamp(0.0, 1.0) * (g - 1)
    lo = torch.clamp(torch.floor(pos), max=g - 2).to(torch.int64)
    frac = (pos - lo.to(pos.dtype)).reshape(-1, 1, 1)
    table = (1.0 - frac) * class_embeds[lo] + frac * class_embeds[lo + 1]
    return F.normalize(table, dim=-1)


def mask_other_tasks(logits: torch.Tensor, class_task: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    other = class_task.unsqueeze(0) != task.unsqueeze(1)
    return logits.masked_fill(other, float("-inf"))


class CalibratedDiki(nn.Module):
    """The calibrated forward over stacked bank tensors; its signature is the graph contract."""

    def __init__(self, diki: DikiCLIP, batch_vote: bool = False, skip_below: float = DEFAULT_SKIP_BELOW):
        super().__init__()
        self.diki = diki
        self.batch_vote = batch_vote
        self.skip_below = skip_below
        self.register_buffer("logit_scale", torch.tensor(diki.logit_scale), persistent=False)

    def select(self, f0: torch.Tensor, gauss_mean: torch.Tensor, gauss_whiten: torch.Tensor,
               gauss_const: torch.Tensor, calib_slope: torch.Tensor, calib_bias: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task scores, selected task and calibrated weight ``M`` per sample."""
        scores = gaussian_scores(f0, gauss_mean, gauss_whiten, gauss_const)
        task = scores.argmax(dim=1)
        if self.batch_vote:
            votes = torch.bincount(task, minlength=scores.shape[1])
            task = torch.full_like(task, int(votes.argmax()))
        chosen = scores.gather(1, task.unsqueeze(1)).squeeze(1)
        return scores, task, calibration_weight(chosen, calib_slope.index_select(0, task),
                                                calib_bias.index_select(0, task))

    def classify(self, f: torch.Tensor, task: torch.Tensor, text_weight: torch.Tensor, class_embeds: torch.Tensor,
                 class_task: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` logits against the text table at each sample's ``M``; other tasks' classes at ``-inf``."""
        table = interpolate_class_table(class_embeds, text_weight)
        logits = self.logit_scale * torch.einsum("bd,bcd->bc", f, table)
        return mask_other_tasks(logits, class_task, task)

    def forward(self, pixel_values: torch.Tensor, bank_k: torch.Tensor, bank_v: torch.Tensor,
                gauss_mean: torch.Tensor, gauss_whiten: torch.Tensor, gauss_const: torch.Tensor,
                class_embeds: torch.Tensor, class_task: torch.Tensor, calib_slope: torch.Tensor,
                calib_bias: torch.Tensor) -> CalibratedOutput:
        f0 = self.diki.encode_image(pixel_values)
        scores, task, weight = self.select(f0, gauss_mean, gauss_whiten, gauss_const, calib_slope, calib_bias)
        run = weight >= self.skip_below
        f = f0.clone()
        if bool(run.any()):
            idx = torch.nonzero(run).squeeze(1)
            t = task[idx]
            f[idx] = self.diki.encode_image(pixel_values[idx], bank_k[t], bank_v[t], weight[idx])
        text_weight = weight.mean().expand_as(weight) if self.batch_vote else weight
        logits = self.classify(f, task, text_weight, class_embeds, class_task)
        return CalibratedOutput(logits, task, weight, scores, f, f0)


def tokenize(tokenizer, classes: Sequence[str], template: str) -> torch.Tensor:
    return tokenizer([template.format(c) for c in classes])


@torch.no_grad()
def class_text_table(diki: DikiCLIP, tokens: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor,
                     levels: Sequence[float]) -> torch.Tensor:
    """``[G, C, D]``: each class prompt under one task's text adapter (``[L, l, W]``) at every level of ``M``."""
    out = []
    for m in levels:
        weight = torch.full((tokens.shape[0],), float(m))
        out.append(diki.encode_text(tokens, text_k[None], text_v[None], weight))
    return torch.stack(out)


@torch.no_grad()
def exact_class_embeds(diki: DikiCLIP, tokens: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor,
                       weight: float) -> torch.Tensor:
    """The exact text path the cache approximates: class embeddings ``[C, D]`` at one ``M``."""
    w = torch.full((tokens.shape[0],), float(weight))
    return diki.encode_text(tokens, text_k[None], text_v[None], w)


def bank_tensors(bank, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The graph inputs of a :class:`diki_edge_runtime.bank.TaskBank` as torch tensors (same names, same layout)."""
    return {k: torch.from_numpy(v.copy()).to(device) for k, v in bank.graph_inputs().items()}
