"""A tiny open_clip backbone with random weights, for tests, smoke benchmarks and examples (PyTorch side).

Written as an open_clip ``local-dir:`` folder, the same layout users load real local models from, so the
project's own loading code is what tests exercise. 3 blocks per encoder -> 2 adapted (2/3 of the depth).
"""

from __future__ import annotations

import json
from pathlib import Path

from diki_edge_runtime.preprocess import CLIP_MEAN, CLIP_STD

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3},
}
TINY_PREPROCESS_CFG = {"size": 32, "mean": list(CLIP_MEAN),
                       "std": list(CLIP_STD), "interpolation": "bicubic",
                       "resize_mode": "shortest"}


def write_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """Write ``open_clip_config.json`` + random ``open_clip_model.safetensors`` (seeded) into ``path``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    (path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path
