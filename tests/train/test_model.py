"""The residual branch (diki_edge/model.py) is the reference's, is an exact identity when it should be, and
freezes the backbone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diki_edge.model import DikiCLIP, ResidualKVAttention, ResidualSlot, TaskAdapter, adapted_depth, residual


def plain_reference_attention(x, w_in, b_in, w_out, b_out, heads, k_r, v_r, m, mask=None):
    """DIKI's attention written out with plain tensors, independently of diki_edge.model."""
    b, n, width = x.shape
    dh = width // heads
    qkv = x @ w_in.T + b_in
    q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
    out = torch.zeros(b, n, width, dtype=torch.float64)
    for s in range(b):
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            qh, kh, vh = q[s, :, sl], k[s, :, sl], v[s, :, sl]
            scores = qh @ kh.T / math.sqrt(dh)
            if mask is not None:
                scores = scores + mask
            o_l = torch.softmax(scores, -1) @ vh
            krh, vrh = k_r[s][:, sl], v_r[s][:, sl]
            o_r = torch.softmax(qh @ krh.T / math.sqrt(dh), -1) @ vrh  # no mask on the residual branch
            out[s, :, sl] = o_l + m[s] * o_r
    return out @ w_out.T + b_out


@pytest.mark.parametrize("causal", [False, True])
def test_branch_matches_plain_computation(causal):
    torch.manual_seed(0)
    width, heads, n, b, length = 64, 4, 10, 3, 8
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()  # a non-zero query bias must be reused
        mha.out_proj.bias.normal_()
    slot = ResidualSlot()
    wrapper = ResidualKVAttention(mha, layer_index=1, slot=slot)
    x = torch.randn(b, n, width)
    keys = torch.rand(b, 2, length, width) * 2 - 1
    values = torch.randn(b, 2, length, width)
    m = torch.tensor([0.0, 0.4, 1.0])
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else None
    with torch.no_grad(), residual(slot, keys, values, m):
        got = wrapper(x, x, x, need_weights=False, attn_mask=mask)[0]
    want = plain_reference_attention(
        x.double(), mha.in_proj_weight.double(), mha.in_proj_bias.double(), mha.out_proj.weight.double(),
        mha.out_proj.bias.double(), heads, keys[:, 1].double(), values[:, 1].double(), m.double(),
        mask.double() if mask is not None else None)
    assert (got.double() - want).abs().max().item() <= 1e-5


def test_adapters_wrap_first_two_thirds_of_both_encoders(tiny_backbone):
    diki = DikiCLIP(tiny_backbone.model)
    visual = diki.clip.visual.transformer.resblocks
    text = diki.clip.transformer.resblocks
    assert [isinstance(b.attn, ResidualKVAttention) for b in visual] == [True, True, False]
    assert [isinstance(b.attn, ResidualKVAttention) for b in text] == [True, True, False]
    assert adapted_depth(12) == 8 and adapted_depth(6) == 4
    s = diki.shape
    assert (s.image_layers, s.text_layers, s.residual_length) == (2, 2, 8)


def test_vit_b16_shape_and_parameter_count():
    import open_clip

    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    diki = DikiCLIP(clip)
    assert (diki.shape.image_layers, diki.shape.text_layers) == (8, 8)
    image_only = 8 * 2 * 8 * 768
    assert image_only + 8 * 2 * 8 * 512 == diki.shape.parameters_per_task == 163_840


def test_fresh_adapter_and_zero_weight_are_exact_identities(tiny_backbone):
    reference = copy.deepcopy(tiny_backbone.model)
    diki = DikiCLIP(tiny_backbone.model)
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32)
    tokens = tiny_backbone.tokenizer(["a photo of a cat.", "a dog", "x", "a photo of a tree."])
    with torch.no_grad():
        want_img = F.normalize(reference.encode_image(pixels), dim=-1)
        want_txt = F.normalize(reference.encode_text(tokens), dim=-1)
        adapter = TaskAdapter(diki.shape, generator=torch.Generator().manual_seed(0))
        assert adapter.image_k.min() >= -1 and adapter.image_k.max() <= 1 and adapter.image_k.std() > 0.4
        assert torch.count_nonzero(adapter.image_v) == 0 and torch.count_nonzero(adapter.text_v) == 0
        fresh_img = diki.encode_image(pixels, *adapter.image_kv())
        fresh_txt = diki.encode_text(tokens, *adapter.text_kv())
        adapter.image_v.normal_()
        adapter.text_v.normal_()
        zero_img = diki.encode_image(pixels, *adapter.image_kv(), weight=torch.zeros(4))
        zero_txt = diki.encode_text(tokens, *adapter.text_kv(), weight=torch.zeros(4))
        trained_img = diki.encode_image(pixels, *adapter.image_kv())
    for got, want in [(fresh_img, want_img), (fresh_txt, want_txt), (zero_img, want_img), (zero_txt, want_txt)]:
        assert (got - want).abs().max().item() <= 1e-6
    assert (trained_img - want_img).abs().max().item() > 1e-3  # and a non-zero V_r does change the output


def test_wrapping_does_not_copy_frozen_weights(tiny_backbone):
    before = {n: p.data_ptr() for n, p in tiny_backbone.model.named_parameters()}
    diki = DikiCLIP(tiny_backbone.model)
    after = {n.replace(".frozen.", "."): p.data_ptr() for n, p in diki.clip.named_parameters()}
    assert before == after
    assert not any(p.requires_grad for p in diki.clip.parameters())
    with pytest.raises(RuntimeError, match="already injected"):
        DikiCLIP(diki.clip)
