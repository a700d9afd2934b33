"""The bundled diki-tiny backbone: loads offline through open_clip's local-dir schema and has real zero-shot skill."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import diki_edge  # noqa: E402
from diki_edge import datasets as D  # noqa: E402

WEIGHTS_DIR = Path(diki_edge.__file__).resolve().parent / "weights" / "diki-tiny"
# sha256 of open_clip_model.safetensors written by `python scripts/pretrain_backbone.py` (see MODEL_CARD.md);
# update together with the weights.
EXPECTED_SHA256 = "3cb98f93062966f2ef08a7b5802d4b2a31bc325c7515492fbee8bc8f19316c86"


@pytest.fixture(scope="module")
def loaded():
    os.environ["HF_HUB_OFFLINE"] = "1"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{WEIGHTS_DIR}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{WEIGHTS_DIR}")
    model.eval()
    return model, preprocess, tokenizer


def test_files_and_hash():
    cfg_path = WEIGHTS_DIR / "open_clip_config.json"
    w_path = WEIGHTS_DIR / "open_clip_model.safetensors"
    assert cfg_path.is_file() and w_path.is_file()
    assert w_path.stat().st_size < 20e6
    assert hashlib.sha256(w_path.read_bytes()).hexdigest() == EXPECTED_SHA256
    cfg = json.loads(cfg_path.read_text())
    mc, pc = cfg["model_cfg"], cfg["preprocess_cfg"]
    assert mc["vision_cfg"]["layers"] >= 3 and mc["text_cfg"]["layers"] >= 3
    assert pc["size"] == mc["vision_cfg"]["image_size"]
    assert pc["interpolation"] == "bicubic" and pc["resize_mode"] == "shortest"
    assert cfg["diki_edge"]["zero_shot_template"] == D.TEMPLATE


def test_loads_weights_as_fp32(loaded):
    from safetensors.torch import load_file

    model, preprocess, tokenizer = loaded
    stored = load_file(str(WEIGHTS_DIR / "open_clip_model.safetensors"))
    sd = model.state_dict()
    assert set(stored) <= set(sd)
    for k in ("visual.conv1.weight", "token_embedding.weight", "text_projection"):
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], stored[k].float())  # the weights really were loaded, not random init
    toks = tokenizer(["a photo of a cat."])
    assert toks.shape == (1, json.loads((WEIGHTS_DIR / "open_clip_config.json").read_text())
                          ["model_cfg"]["text_cfg"]["context_length"])


@torch.no_grad()
def _zero_shot(loaded, task, n=None):
    model, preprocess, tokenizer = loaded
    items = task.test[:n] if n else task.test
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer(task.prompts)), dim=-1)
    x = torch.stack([preprocess(im) for im, _ in items])
    y = torch.tensor([lab for _, lab in items])
    f = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    return float(((f @ txt.T).argmax(1) == y).float().mean())


# Measured by scripts/pretrain_backbone.py on the bundled weights (MODEL_CARD.md), on held-out images never used
# in pretraining: MNIST 94.8 % (1,000 images, chance 10 %), OpenMoji jobs 86.7 % (180, chance 5 %), OpenMoji
# people 77.4 % (270, chance 2.4 %). Thresholds sit a few points below, far above chance.
def test_zero_shot_above_chance(loaded):
    hold = D.zero_shot_holdouts(include_debian=False)
    acc = {name: _zero_shot(loaded, hold[name]) for name in ("mnist", "emoji-jobs", "emoji-people")}
    assert acc["mnist"] > 0.85, acc
    assert acc["emoji-jobs"] > 0.75, acc
    assert acc["emoji-people"] > 0.65, acc


@pytest.mark.parametrize("model", ["diki-tiny", f"local-dir:{WEIGHTS_DIR}"])
@pytest.mark.parametrize("pretrained", ["random", "openai"])
def test_pretrained_with_a_bundled_or_local_dir_model_is_refused_naming_the_option(model, pretrained):
    from diki_edge.backbone import load_backbone
    from diki_edge.errors import BackboneError

    with pytest.raises(BackboneError, match=r"--pretrained") as caught:
        load_backbone(model, pretrained)
    assert pretrained in str(caught.value) and model in str(caught.value)
