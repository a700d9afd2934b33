"""The L2P-style prompt-prepending model (diki_edge.evaluation.baselines)."""

from __future__ import annotations

import copy

import torch

from diki_edge.evaluation.baselines import PromptedCLIP, TaskPrompts


def test_prompts_change_outputs_and_budget_matches_diki(tiny_backbone):
    from diki_edge.model import DikiCLIP

    frozen = copy.deepcopy(tiny_backbone.model)
    model = PromptedCLIP(copy.deepcopy(tiny_backbone.model), prompt_length=16)
    diki = DikiCLIP(copy.deepcopy(tiny_backbone.model), residual_length=8)
    assert model.parameters_per_task == diki.shape.parameters_per_task  # 2 l vectors per adapted layer
    assert (model.image_layers, model.text_layers) == (diki.shape.image_layers, diki.shape.text_layers)

    x = torch.randn(3, 3, 32, 32)
    tokens = tiny_backbone.tokenizer(["a photo of a cat.", "a dog.", "x"])
    with torch.no_grad():
        ref_i = torch.nn.functional.normalize(frozen.encode_image(x), dim=-1)
        ref_t = torch.nn.functional.normalize(frozen.encode_text(tokens), dim=-1)
        torch.testing.assert_close(model.encode_image(x), ref_i)  # no prompts: the frozen model exactly
        torch.testing.assert_close(model.encode_text(tokens), ref_t)
        p = TaskPrompts(model, generator=torch.Generator().manual_seed(0))
        img = model.encode_image(x, p.image_prompts())
        txt = model.encode_text(tokens, p.text_prompts())
    assert img.shape == ref_i.shape and txt.shape == ref_t.shape
    assert (img - ref_i).abs().max() > 1e-3 and (txt - ref_t).abs().max() > 1e-3  # prompts interfere
    # per-sample prompts: a batch of different prompts equals running each sample alone
    with torch.no_grad():
        q = TaskPrompts(model, generator=torch.Generator().manual_seed(1))
        both = torch.stack([p.image, q.image, p.image])
        mixed = model.encode_image(x, both)
        torch.testing.assert_close(mixed[1], model.encode_image(x[1:2], q.image_prompts())[0], atol=1e-5, rtol=1e-5)


def test_prompt_gradients_reach_only_prompts(tiny_backbone):
    model = PromptedCLIP(copy.deepcopy(tiny_backbone.model), prompt_length=4)
    p = TaskPrompts(model)
    tokens = tiny_backbone.tokenizer(["a", "b"])
    loss = (model.encode_image(torch.randn(2, 3, 32, 32), p.image_prompts())
            @ model.encode_text(tokens, p.text_prompts()).T).sum()
    loss.backward()
    assert p.image.grad is not None and p.image.grad.abs().sum() > 0
    assert p.text.grad is not None and p.text.grad.abs().sum() > 0
    assert all(q.grad is None for q in model.clip.parameters())
