"""Model code of the baselines DIKI is compared with: prompt prepending with key-query selection (L2P-style).

:class:`PromptedCLIP` wraps (never copies) the first blocks of both encoders of an open_clip CLIP — the same
blocks DIKI adapts — in :class:`PromptedBlock`: before such a block runs, ``p`` learned prompt tokens of that
layer are prepended to the token sequence, and they are dropped again after it (deep prompting, as in
VPT-deep / DualPrompt's prefix prompts). Unlike DIKI's residual branch, the prompt tokens join the frozen
attention's softmax, so they change every token's output, also for images the prompt was never trained on:
the interference DIKI is designed to avoid.

Budget: with ``p = 2 l`` prompt tokens per adapted layer a task has exactly as many prompt parameters as DIKI's
``K_r``/``V_r`` (``2 l`` vectors of the layer width per adapted layer), plus one ``D``-dim key.

Selection (L2P): the query is the frozen model's normalised image embedding; each task's key is matched by
cosine and the best key's prompts are used. The key is the normalised mean query of the task's training
images, which is the minimiser of L2P's key surrogate loss ``sum_i (1 - cos(k, q_i))`` for a single key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from diki_edge.model import adapted_depth, text_transformer


class PromptSlot:
    """The prompts of one encoder for the forward in progress (``None`` = the frozen encoder)."""

    def __init__(self) -> None:
        self.prompts: torch.Tensor | None = None  # [B or 1, L_adapted, p, width]


@contextmanager
def prompted(slot: PromptSlot, prompts: torch.Tensor | None) -> Iterator[None]:
    previous = slot.prompts
    slot.prompts = prompts
    try:
        yield
    finally:
        slot.prompts = previous


def _extend_mask(mask: torch.Tensor | None, p: int, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The attention mask for ``p`` prompt tokens prepended to ``n`` tokens: every token sees every prompt (the
    prompts come first), the original mask applies among the original tokens. Prompt rows see only prompts
    (their outputs are discarded anyway)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    full = torch.zeros(p + n, p + n, dtype=mask.dtype, device=mask.device)
    full[:p, p:] = float("-inf")
    full[p:, p:] = mask[-n:, -n:]
    return full


class PromptedBlock(nn.Module):
    """An open_clip residual attention block that runs with its layer's prompt tokens prepended."""

    def __init__(self, block: nn.Module, layer_index: int, slot: PromptSlot, batch_first: bool):
        super().__init__()
        self.block = block
        self.layer_index = layer_index
        self.slot = slot
        self.batch_first = batch_first

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks the first block
        return self.block.get_weight_dtype()

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: torch.Tensor | None = None):
        prompts = self.slot.prompts
        if prompts is None:
            return self.block(q_x, k_x, v_x, attn_mask=attn_mask)
        x = q_x if self.batch_first else q_x.transpose(0, 1)  # [B, N, W]
        b, n, _ = x.shape
        p = prompts[:, self.layer_index].to(x.dtype)  # [B|1, p, W]
        p = p.expand(b, -1, -1) if p.shape[0] == 1 else p
        length = p.shape[1]
        x = torch.cat([p, x], dim=1)
        mask = _extend_mask(attn_mask, length, n, x.dtype)
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self.block(x, attn_mask=mask)
        out = out if self.batch_first else out.transpose(0, 1)
        out = out[:, length:]
        return out if self.batch_first else out.transpose(0, 1)


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP whose first blocks accept prompt tokens (see the module docstring)."""

    def __init__(self, clip: nn.Module, prompt_length: int, image_layers: int | None = None,
                 text_layers: int | None = None):
        super().__init__()
        self.clip = clip
        for q in clip.parameters():
            q.requires_grad_(False)
        vis = clip.visual.transformer
        txt = text_transformer(clip)
        self.image_layers = adapted_depth(len(vis.resblocks)) if image_layers is None else image_layers
        self.text_layers = adapted_depth(len(txt.resblocks)) if text_layers is None else text_layers
        self.prompt_length = prompt_length
        self.image_width, self.text_width = vis.width, txt.width
        self.embed_dim = int(clip.visual.output_dim)
        self.image_slot, self.text_slot = PromptSlot(), PromptSlot()
        for blocks, depth, slot, tf in ((vis.resblocks, self.image_layers, self.image_slot, vis),
                                        (txt.resblocks, self.text_layers, self.text_slot, txt)):
            for i in range(depth):
                if isinstance(blocks[i], PromptedBlock):
                    raise RuntimeError("prompts are already injected into this model")
                blocks[i] = PromptedBlock(blocks[i], i, slot, getattr(tf, "batch_first", True))

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())

    @property
    def parameters_per_task(self) -> int:
        """Prompt parameters of one task (the key's ``D`` values are counted separately)."""
        return self.prompt_length * (self.image_layers * self.image_width + self.text_layers * self.text_width)

    def encode_image(self, pixels: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        with prompted(self.image_slot, prompts):
            return F.normalize(self.clip.encode_image(pixels), dim=-1)

    def encode_text(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        with prompted(self.text_slot, prompts):
            return F.normalize(self.clip.encode_text(tokens), dim=-1)


class TaskPrompts(nn.Module):
    """One task's prompts for both encoders, initialised ``U(-1, 1)`` (L2P's prompt initialisation)."""

    def __init__(self, model: PromptedCLIP, generator: torch.Generator | None = None):
        super().__init__()
        p = model.prompt_length
        self.image = nn.Parameter(torch.rand(model.image_layers, p, model.image_width, generator=generator) * 2 - 1)
        self.text = nn.Parameter(torch.rand(model.text_layers, p, model.text_width, generator=generator) * 2 - 1)

    def image_prompts(self) -> torch.Tensor:
        return self.image[None]

    def text_prompts(self) -> torch.Tensor:
        return self.text[None]
