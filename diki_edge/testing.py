"""A tiny open_clip backbone with random weights, and folders of real photographs, for tests, smoke benchmarks and
examples (PyTorch side).

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


def write_tiny_model_dir(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write ``open_clip_config.json`` + random ``open_clip_model.safetensors`` (seeded) into ``path``.

    ``image_size`` other than 32 (e.g. 224, for tests of real-size images) keeps 4x4 patches, so compute stays tiny.
    """
    import copy

    import open_clip
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_cfg, preprocess_cfg = copy.deepcopy(TINY_MODEL_CFG), dict(TINY_PREPROCESS_CFG, size=image_size)
    model_cfg["vision_cfg"].update(image_size=image_size, patch_size=image_size // 4)
    model = open_clip.CLIP(**model_cfg)
    (path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled photographs, one class each


def write_photo_folder(root: Path, per_class: int, size: int = 256, seed: int = 0) -> Path:
    """Real photographs as an image folder: random ``size`` crops (flipped at random) of four scikit-image photos,
    saved as JPEG — each file decodes to a different image, as a real data set's would."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, -1)
        photo = photo[..., :3]
        h, w = photo.shape[:2]
        scale = max(1.0, (size + 8) / min(h, w))
        if scale > 1.0:
            photo = np.asarray(Image.fromarray(photo).resize((int(w * scale) + 1, int(h * scale) + 1)))
            h, w = photo.shape[:2]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            crop = photo[y:y + size, x:x + size]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:05d}.jpg", quality=90)
    return root
