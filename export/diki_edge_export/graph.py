"""The export-ready PyTorch module: :class:`CalibratedDiki`'s forward written without data-dependent Python.

:class:`ExportGraph` computes exactly what :class:`diki_edge.calibrated.CalibratedDiki` computes (per-sample
selection, no batch vote) with the same helpers, but pass 2 runs on a ``nonzero``-selected sub-batch that is
written back with ``index_put`` instead of a Python ``if``; the traced graph therefore contains the skip for
every batch, including a batch where no image needs pass 2 (a sub-batch of zero rows).

Zero rows: open_clip's ``VisionTransformer._embeds`` flattens the patch grid with ``reshape(b, c, -1)``, which
ONNX Runtime rejects when ``b == 0`` (``-1`` cannot be inferred from zero elements). :func:`static_reshapes`
swaps in the same computation with the grid size written out (``reshape(b, c, gh * gw)``) for the duration of
the export; the residual attention reshapes in :mod:`diki_edge.model` name every dimension for the same reason.
Blocks beyond the adapted depth still hold ``nn.MultiheadAttention``, whose ONNX form reshapes to
``[tgt_len * bsz, embed_dim]``; with ``bsz == 0`` that shape holds a 0, which ONNX ``Reshape`` reads as "copy the
input dimension". For the export those blocks are wrapped too (:class:`ResidualKVAttention` with a slot that is
never filled, i.e. the frozen attention computed with batch-leading reshapes). The result is a graph with no
``If``: zero-row sub-batches simply flow through every node.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from diki_edge.calibrated import CalibratedDiki, CalibratedOutput
from diki_edge.model import ResidualKVAttention, ResidualSlot, residual
from diki_edge_export.errors import ExportError


def _static_embeds(self, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer._embeds`` with the patch-grid reshape spelled out (no ``-1``)."""
    from open_clip.transformer import _expand_token

    x = self.conv1(x)  # [b, width, gh, gw]
    gh, gw = self.grid_size
    x = x.reshape(x.shape[0], self.conv1.out_channels, gh * gw)
    x = x.permute(0, 2, 1)
    x = torch.cat([_expand_token(self.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
    x = x + self.positional_embedding.to(x.dtype)
    x = self.patch_dropout(x)
    x = self.ln_pre(x)
    return x


def check_visual(visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ExportError(f"unsupported image tower {type(visual).__name__}: export supports open_clip ViTs "
                          "(open_clip.transformer.VisionTransformer)")
    for attr in ("_embeds", "conv1", "grid_size", "class_embedding", "positional_embedding", "patch_dropout",
                 "ln_pre"):
        if not hasattr(visual, attr):
            raise ExportError(f"this open_clip version's VisionTransformer has no {attr!r}; "
                              "export needs open_clip >= 3.0")


@contextmanager
def static_reshapes(visual: nn.Module) -> Iterator[None]:
    """Temporarily make ``visual`` safe for zero-row batches in ONNX Runtime (see the module docstring).

    ``_embeds`` without ``-1`` reshapes, and every block still holding a plain ``nn.MultiheadAttention`` wrapped
    by a :class:`ResidualKVAttention` whose slot stays empty (the same frozen weights, batch-leading reshapes).
    """
    check_visual(visual)
    had_own = "_embeds" in visual.__dict__
    previous = visual.__dict__.get("_embeds")
    visual._embeds = types.MethodType(_static_embeds, visual)
    try:
        with frozen_attention_rewritten(visual.transformer.resblocks):
            yield
    finally:
        if had_own:
            visual._embeds = previous
        else:
            del visual._embeds


@contextmanager
def frozen_attention_rewritten(blocks: nn.ModuleList) -> Iterator[None]:
    """Every block still holding a plain ``nn.MultiheadAttention`` temporarily wrapped by a
    :class:`ResidualKVAttention` whose slot stays empty: the same frozen weights computed with batch-leading
    reshapes (and the attention form ONNX Runtime runs faster, see the README's benchmark notes)."""
    never_filled = ResidualSlot()
    swapped = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention):
            block.attn = ResidualKVAttention(attn, i, never_filled)
            swapped.append((block, attn))
    try:
        yield
    finally:
        for block, attn in swapped:
            block.attn = attn


@contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """``torch.backends.mha.set_fastpath_enabled(False)`` for the duration of an export (restored after)."""
    mha = torch.backends.mha
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


class ExportGraph(nn.Module):
    """The graph contract (inputs/outputs: :mod:`diki_edge_runtime.contract`) as a traceable module.

    ``encoder_dtype=torch.float16`` runs both encoder passes in half precision (a half copy of the backbone);
    inputs, the Gaussian scoring (whose log-densities overflow float16), selection and the class table stay
    float32, so an fp16 graph has the same float32 interface as an fp32 one.
    """

    def __init__(self, calibrated: CalibratedDiki, encoder_dtype: torch.dtype = torch.float32):
        super().__init__()
        if calibrated.batch_vote:
            raise ExportError("the exported graph selects tasks per sample; batch_vote is a PyTorch-only option")
        self.calibrated = calibrated
        self.encoder_dtype = encoder_dtype
        self.skip_below = float(calibrated.skip_below)
        diki = calibrated.diki
        if encoder_dtype != torch.float32:
            diki = copy.deepcopy(diki).to(encoder_dtype)
        self.diki = diki

    def encode(self, pixels: torch.Tensor, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
        dt = self.encoder_dtype
        if dt == torch.float32:
            return self.diki.encode_image(pixels, keys, values, weight)
        keys = keys.to(dt) if keys is not None else None
        values = values.to(dt) if values is not None else None
        weight = weight.to(dt) if weight is not None else None
        with residual(self.diki.image_slot, keys, values, weight):
            f = self.diki.clip.encode_image(pixels.to(dt))
        return F.normalize(f.float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor, bank_k: torch.Tensor, bank_v: torch.Tensor,
                gauss_mean: torch.Tensor, gauss_whiten: torch.Tensor, gauss_const: torch.Tensor,
                class_embeds: torch.Tensor, class_task: torch.Tensor, calib_slope: torch.Tensor,
                calib_bias: torch.Tensor) -> CalibratedOutput:
        f0 = self.encode(pixel_values)
        scores, task, weight = self.calibrated.select(f0, gauss_mean, gauss_whiten, gauss_const, calib_slope,
                                                      calib_bias)
        # Pass 2 only for images whose M can matter; the others keep f0 (possibly a zero-row sub-batch).
        idx = torch.nonzero(weight >= self.skip_below).reshape(-1)
        sub_task = task.index_select(0, idx)
        f1 = self.encode(pixel_values.index_select(0, idx), bank_k.index_select(0, sub_task),
                         bank_v.index_select(0, sub_task), weight.index_select(0, idx))
        f = f0.index_put((idx,), f1)
        logits = self.calibrated.classify(f, task, weight, class_embeds, class_task)
        return CalibratedOutput(logits, task, weight, scores, f, f0)
