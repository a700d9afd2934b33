"""Calibrated PyTorch inference: per-sample selection and weight, batch voting, and the cached text table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diki_edge.calibrated import (
    CalibratedDiki,
    bank_tensors,
    calibration_levels,
    exact_class_embeds,
    interpolate_class_table,
    tokenize,
)
from diki_edge.layout import layout_for
from diki_edge.model import DikiCLIP
from diki_edge.synthetic import synthetic_task
from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.gaussian import log_density

CENTRES = (-1.0, 0.0, 1.0)


def _images(centre, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 0.1 + centre


@pytest.fixture()
def three_tasks(tiny_backbone):
    diki = DikiCLIP(tiny_backbone.model)
    layout = layout_for(tiny_backbone, diki)
    bank = TaskBank.empty(layout)
    for i, c in enumerate(CENTRES):
        bank = bank.with_task(synthetic_task(diki, tiny_backbone.tokenizer, f"task{i}",
                                             [f"thing {i}-{j}" for j in range(3 + i)], _images(c, 60, i),
                                             layout.calibration_levels, seed=i))
    return diki, bank


def test_scores_and_weight_follow_the_definition(three_tasks):
    diki, bank = three_tasks
    model = CalibratedDiki(diki).eval()
    x = torch.cat([_images(c, 3, 100 + i) for i, c in enumerate(CENTRES)])
    with torch.no_grad():
        out = model(x, **bank_tensors(bank))
        f0 = diki.encode_image(x)
    a = bank.arrays
    want = log_density(f0.double().numpy(), a["stats_sum"] / a["stats_count"][:, None],
                       a["gauss_whiten"].astype(np.float64), a["gauss_const"].astype(np.float64))
    np.testing.assert_allclose(out.task_scores.numpy(), want, rtol=1e-4)
    assert out.task.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # each image is recognised as its own task
    d = f0.shape[1]
    chosen = out.task_scores.gather(1, out.task[:, None]).squeeze(1)
    torch.testing.assert_close(out.weight, torch.sigmoid(chosen / d - 1), rtol=0, atol=1e-7)
    # classes of other tasks are masked out; the top-1 is always one of the selected task's classes
    class_task = torch.from_numpy(bank.arrays["class_task"])
    assert (class_task[out.logits.argmax(1)] == out.task).all()
    assert torch.isinf(out.logits[class_task[None, :] != out.task[:, None]]).all()


def test_per_sample_results_do_not_depend_on_the_batch(three_tasks):
    diki, bank = three_tasks
    model = CalibratedDiki(diki).eval()
    inputs = bank_tensors(bank)
    x = torch.cat([_images(c, 2, 200 + i) for i, c in enumerate(CENTRES)] + [torch.rand(2, 3, 32, 32) * 6 - 3])
    with torch.no_grad():
        together = model(x, **inputs)
        alone = [model(x[i:i + 1], **inputs) for i in range(len(x))]
        shuffled_order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        shuffled = model(x[shuffled_order], **inputs)
    for i in range(len(x)):
        assert together.task[i] == alone[i].task[0]
        torch.testing.assert_close(together.image_embeds[i], alone[i].image_embeds[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.weight[i], alone[i].weight[0], atol=1e-5, rtol=0)
        assert together.logits[i].argmax() == alone[i].logits[0].argmax()
    torch.testing.assert_close(shuffled.image_embeds, together.image_embeds[shuffled_order], atol=1e-5, rtol=0)


def test_batch_vote_reproduces_the_reference_one_task_per_batch(three_tasks):
    diki, bank = three_tasks
    inputs = bank_tensors(bank)
    x = torch.cat([_images(CENTRES[0], 3, 300), _images(CENTRES[2], 1, 301)])
    with torch.no_grad():
        per_sample = CalibratedDiki(diki).eval()(x, **inputs)
        voted = CalibratedDiki(diki, batch_vote=True).eval()(x, **inputs)
        voted_alone = CalibratedDiki(diki, batch_vote=True).eval()(x[3:], **inputs)
    assert per_sample.task.tolist() == [0, 0, 0, 2]
    assert voted.task.tolist() == [0, 0, 0, 0]  # the majority wins for everyone
    assert voted_alone.task.tolist() == [2]  # so the result for image 3 depends on its batch
    assert not torch.allclose(voted.image_embeds[3], voted_alone.image_embeds[0], atol=1e-4)


def test_unfamiliar_images_skip_the_residual_and_equal_the_frozen_model(three_tasks):
    diki, bank = three_tasks
    model = CalibratedDiki(diki).eval()
    far = torch.rand(4, 3, 1, 1).expand(4, 3, 32, 32) * 8 - 4  # flat colour images, nothing like the tasks
    with torch.no_grad():
        out = model(far, **bank_tensors(bank))
        frozen = diki.encode_image(far)
    unfamiliar = out.weight < model.skip_below
    assert unfamiliar.any()
    torch.testing.assert_close(out.image_embeds[unfamiliar], frozen[unfamiliar], atol=0, rtol=0)


def test_cached_text_table_matches_the_exact_text_path(three_tasks, tiny_backbone):
    """The cached text table (diki_edge/calibrated.py): G = 9 levels, linear interpolation; measured on this tiny
    random model: worst cosine error ~1e-4, top-1 agreement 100 %. The bound asserted: cosine >= 0.999 per class
    embedding and top-1 agreement >= 99.9 % over random image embeddings."""
    diki, bank = three_tasks
    levels = calibration_levels(9)
    rng = np.random.default_rng(0)
    agree, total, worst = 0, 0, 1.0
    for i in range(bank.num_tasks):
        task = bank.task_slice(i)
        tokens = tokenize(tiny_backbone.tokenizer, task.info.classes, task.info.template)
        table = torch.from_numpy(task.class_embeds)
        text_k, text_v = torch.from_numpy(task.text_k), torch.from_numpy(task.text_v)
        probe = torch.nn.functional.normalize(torch.randn(200, table.shape[-1]), dim=-1)
        for m in rng.uniform(0, 1, 12).tolist() + [0.0, 1.0, levels[3]]:
            exact = exact_class_embeds(diki, tokens, text_k, text_v, m)
            approx = interpolate_class_table(table, torch.tensor([m]))[0]
            worst = min(worst, float((exact * approx).sum(-1).min()))
            agree += int(((probe @ exact.T).argmax(1) == (probe @ approx.T).argmax(1)).sum())
            total += len(probe)
    assert worst >= 0.999
    assert agree / total >= 0.999
