"""Shared fixtures: a tiny open_clip backbone with random weights, written and loaded like a user's local one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Small enough to run everything on 2 CPU cores in seconds; 3 blocks -> 2 adapted (2/3 of the depth).
TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3},
}
TINY_PREPROCESS_CFG = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                       "resize_mode": "shortest"}


def write_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """An open_clip ``local-dir:`` folder with random weights (the same layout users load real models from)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    (path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_model_spec(tiny_model_dir) -> str:
    return f"local-dir:{tiny_model_dir}"


@pytest.fixture()
def tiny_backbone(tiny_model_spec):
    from diki_edge.backbone import load_backbone

    return load_backbone(tiny_model_spec)
