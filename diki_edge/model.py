"""DIKI's residual attention branch, injected around a frozen open_clip CLIP (PyTorch only).

For each adapted block (the first 2/3 of both encoders by default) the block's ``nn.MultiheadAttention`` is
wrapped — never copied — by :class:`ResidualKVAttention`, which computes::

    Q, K, V = x W_in + b_in                    (the frozen projection, query with its bias reused)
    O_L     = softmax(Q K^T / sqrt(dh) + mask) V
    O_R     = softmax(Q K_r^T / sqrt(dh)) V_r  (own softmax over the l residual keys, no causal mask)
    out     = (O_L + M * O_R) W_o + b_o

``K_r``/``V_r`` live in the post-projection space, split into heads like the frozen keys. They and the
per-sample weight ``M`` are not module state: a caller hands them to one encoder for one forward through
:func:`residual` (a context manager), which is how training (one task's parameters, ``M = 1``), calibrated
inference (per-sample gathered slices) and the ONNX export (graph inputs) all drive the same code.

Where tensors come from: ``K_r``/``V_r`` are trained in :mod:`diki_edge.train` (:class:`TaskAdapter`), stored
in :mod:`diki_edge_runtime.bank`, gathered per sample in :mod:`diki_edge.calibrated`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diki_edge_runtime.bank import TaskInfo, TaskSlice
from diki_edge_runtime.gaussian import GaussianStats

DEFAULT_RESIDUAL_LENGTH = 8
DEFAULT_DEPTH_FRACTION = 2.0 / 3.0


class ResidualSlot:
    """The residual inputs of one encoder for the forward in progress (empty = frozen behaviour)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [B or 1, L_adapted, l, width]
        self.values: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # [B] (M per sample) or None for M = 1

    def clear(self) -> None:
        self.keys = self.values = self.weight = None

    @property
    def active(self) -> bool:
        return self.keys is not None


@contextmanager
def residual(slot: ResidualSlot, keys: torch.Tensor | None, values: torch.Tensor | None,
             weight: torch.Tensor | None = None) -> Iterator[None]:
    """Run the encoder owning ``slot`` with residual keys/values (``[B|1, L, l, W]``) and weight ``M`` ([B])."""
    if (keys is None) != (values is None):
        raise ValueError("residual keys and values must be given together")
    previous = (slot.keys, slot.values, slot.weight)
    slot.keys, slot.values, slot.weight = keys, values, weight
    try:
        yield
    finally:
        slot.keys, slot.values, slot.weight = previous


class ResidualKVAttention(nn.Module):
    """A frozen ``nn.MultiheadAttention`` plus DIKI's residual key/value branch (see the module docstring)."""

    def __init__(self, frozen: nn.MultiheadAttention, layer_index: int, slot: ResidualSlot):
        super().__init__()
        if not getattr(frozen, "_qkv_same_embed_dim", True) or frozen.in_proj_weight is None:
            raise TypeError("only self-attention with a packed in-projection is supported")
        self.frozen = frozen  # registered as a submodule: the same parameters, not a copy
        self.layer_index = layer_index
        self.slot = slot
        self.num_heads = frozen.num_heads
        self.head_dim = frozen.embed_dim // frozen.num_heads
        self.batch_first = frozen.batch_first

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None, **_: object):
        x = query if self.batch_first else query.transpose(0, 1)  # [B, N, W]
        kx = x if key is None or key is query else (key if self.batch_first else key.transpose(0, 1))
        vx = x if value is None or value is query else (value if self.batch_first else value.transpose(0, 1))
        b, n, width = x.shape
        h, dh = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.frozen.in_proj_weight.chunk(3, dim=0)
        b_q, b_k, b_v = (self.frozen.in_proj_bias.chunk(3) if self.frozen.in_proj_bias is not None
                         else (None, None, None))
        q = F.linear(x, w_q, b_q).reshape(b, n, h, dh).transpose(1, 2)  # [B, H, N, dh]
        # Every dimension named (no -1): ONNX Runtime cannot infer -1 for a zero-row batch
        # (export/diki_edge_export/graph.py).
        k = F.linear(kx, w_k, b_k).reshape(b, kx.shape[1], h, dh).transpose(1, 2)
        v = F.linear(vx, w_v, b_v).reshape(b, vx.shape[1], h, dh).transpose(1, 2)
        scale = 1.0 / math.sqrt(dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        out = torch.matmul(scores.softmax(dim=-1), v)
        slot = self.slot
        if slot.active:
            out = out + self._residual(q, slot)
        out = out.transpose(1, 2).reshape(b, n, width)
        out = self.frozen.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _residual(self, q: torch.Tensor, slot: ResidualSlot) -> torch.Tensor:
        kr = slot.keys[:, self.layer_index]  # [B|1, l, W]
        vr = slot.values[:, self.layer_index]
        bk, length = kr.shape[0], kr.shape[1]
        kr = kr.reshape(bk, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B|1, H, l, dh]
        vr = vr.reshape(bk, length, self.num_heads, self.head_dim).transpose(1, 2)
        attn = (torch.matmul(q, kr.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))).softmax(dim=-1)
        branch = torch.matmul(attn, vr)  # [B, H, N, dh]
        if slot.weight is not None:
            branch = branch * slot.weight.reshape(-1, 1, 1, 1).to(branch.dtype)
        return branch


def adapted_depth(num_blocks: int, fraction: float = DEFAULT_DEPTH_FRACTION) -> int:
    """The reference adapts the first 8 of 12 blocks; scale that with depth (at least one block)."""
    return max(1, min(num_blocks, int(round(num_blocks * fraction))))


def text_transformer(clip: nn.Module) -> nn.Module:
    if hasattr(clip, "transformer") and hasattr(clip.transformer, "resblocks"):
        return clip.transformer
    text = getattr(clip, "text", None)
    if text is not None and hasattr(getattr(text, "transformer", None), "resblocks"):
        return text.transformer
    raise TypeError("unsupported text tower: expected an open_clip text transformer with resblocks")


def _inject(blocks: nn.ModuleList, depth: int, slot: ResidualSlot) -> list[ResidualKVAttention]:
    wrappers = []
    for i in range(depth):
        block = blocks[i]
        attn = getattr(block, "attn", None)
        if isinstance(attn, ResidualKVAttention):
            raise RuntimeError("adapters are already injected into this model")
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"block {i}: unsupported attention {type(attn).__name__} "
                            "(diki-edge adapts open_clip's standard ResidualAttentionBlock)")
        wrapper = ResidualKVAttention(attn, i, slot)
        block.attn = wrapper
        wrappers.append(wrapper)
    return wrappers



def unwrapped_copy(clip: nn.Module) -> nn.Module:
    """A deep copy of an open_clip CLIP with any injected residual wrappers removed: the inverse of the wrapping
    :class:`DikiCLIP` does (``_inject``), kept beside it so the two cannot drift apart."""
    clip = copy.deepcopy(clip)
    for blocks in (clip.visual.transformer.resblocks, text_transformer(clip).resblocks):
        for block in blocks:
            if isinstance(getattr(block, "attn", None), ResidualKVAttention):
                block.attn = block.attn.frozen
    return clip


@dataclass(frozen=True)
class AdapterShape:
    image_layers: int
    text_layers: int
    residual_length: int
    image_width: int
    text_width: int
    embed_dim: int

    @property
    def parameters_per_task(self) -> int:
        return 2 * self.residual_length * (self.image_layers * self.image_width + self.text_layers * self.text_width)


class DikiCLIP(nn.Module):
    """A frozen open_clip CLIP whose first blocks carry residual branches, driven through :func:`residual`."""

    def __init__(self, clip: nn.Module, residual_length: int = DEFAULT_RESIDUAL_LENGTH,
                 image_layers: int | None = None, text_layers: int | None = None):
        super().__init__()
        self.clip = clip
        for p in clip.parameters():
            p.requires_grad_(False)
        visual_blocks = clip.visual.transformer.resblocks
        text_tf = text_transformer(clip)
        image_layers = adapted_depth(len(visual_blocks)) if image_layers is None else image_layers
        text_layers = adapted_depth(len(text_tf.resblocks)) if text_layers is None else text_layers
        if not 1 <= image_layers <= len(visual_blocks) or not 1 <= text_layers <= len(text_tf.resblocks):
            raise ValueError(f"adapted layers must be within the encoders' depth "
                             f"({len(visual_blocks)} image, {len(text_tf.resblocks)} text blocks)")
        self.image_slot = ResidualSlot()
        self.text_slot = ResidualSlot()
        _inject(visual_blocks, image_layers, self.image_slot)
        _inject(text_tf.resblocks, text_layers, self.text_slot)
        self.shape = AdapterShape(
            image_layers=image_layers,
            text_layers=text_layers,
            residual_length=residual_length,
            image_width=clip.visual.transformer.width,
            text_width=text_tf.width,
            embed_dim=int(clip.visual.output_dim),
        )

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())

    def encode_image(self, pixels: torch.Tensor, keys: torch.Tensor | None = None,
                     values: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised image embeddings; without keys the frozen encoder runs unchanged."""
        with residual(self.image_slot, keys, values, weight):
            return F.normalize(self.clip.encode_image(pixels), dim=-1)

    def encode_text(self, tokens: torch.Tensor, keys: torch.Tensor | None = None,
                    values: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings; the residual branch has no causal mask (the frozen path keeps it)."""
        with residual(self.text_slot, keys, values, weight):
            return F.normalize(self.clip.encode_text(tokens), dim=-1)


class TaskAdapter(nn.Module):
    """One task's trainable residual keys and values: ``K_r ~ U(-1, 1)``, ``V_r = 0`` (an exact identity)."""

    def __init__(self, shape: AdapterShape, generator: torch.Generator | None = None):
        super().__init__()
        s = shape
        self.image_k = nn.Parameter(torch.rand(s.image_layers, s.residual_length, s.image_width,
                                               generator=generator) * 2 - 1)
        self.image_v = nn.Parameter(torch.zeros(s.image_layers, s.residual_length, s.image_width))
        self.text_k = nn.Parameter(torch.rand(s.text_layers, s.residual_length, s.text_width,
                                              generator=generator) * 2 - 1)
        self.text_v = nn.Parameter(torch.zeros(s.text_layers, s.residual_length, s.text_width))

    def image_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_k[None], self.image_v[None]

    def text_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_k[None], self.text_v[None]

    def to_slice(self, info: TaskInfo, stats: GaussianStats, class_embeds: torch.Tensor) -> TaskSlice:
        """This adapter as the numpy slice a bank appends (with the task's statistics and text table)."""
        def arr(t: torch.Tensor):
            return t.detach().cpu().numpy().copy()

        return TaskSlice(info=info, image_k=arr(self.image_k), image_v=arr(self.image_v), text_k=arr(self.text_k),
                         text_v=arr(self.text_v), stats=stats, class_embeds=arr(class_embeds))
