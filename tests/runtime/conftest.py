"""Fixtures of the runtime's tests: banks made from numpy arrays, and the committed golden model folder.

Nothing here (or in any test of this folder) needs torch, open_clip, onnx or the other two distributions: these
tests run in a venv holding only the runtime wheel (``make test-runtime``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import GOLDEN, golden_script  # tests/support.py

from diki_edge_runtime.bank import BankLayout, TaskBank, TaskInfo, TaskSlice
from diki_edge_runtime.gaussian import GaussianStats

EMBED_DIM = 8


@pytest.fixture()
def layout() -> BankLayout:
    """A small bank layout: 2 adapted image and text layers, l = 3, widths 6 / 5, D = 8, 4 calibration levels."""
    return BankLayout(backbone={"model": "numpy-test", "pretrained": None, "weights_sha256": "ab" * 32},
                      image_layers=2, text_layers=2, residual_length=3, image_width=6, text_width=5,
                      embed_dim=EMBED_DIM, calibration_levels=[0.0, 1 / 3, 2 / 3, 1.0], ridge=1e-7, logit_scale=100.0)


@pytest.fixture()
def make_task(layout):
    """``make_task(name, n_classes, seed, samples=20)``: a TaskSlice of random arrays with a fitted Gaussian."""

    def make(name: str, n_classes: int, seed: int, samples: int = 20) -> TaskSlice:
        rng = np.random.default_rng(seed)
        img = (layout.image_layers, layout.residual_length, layout.image_width)
        txt = (layout.text_layers, layout.residual_length, layout.text_width)
        embeds = rng.normal(size=(samples, layout.embed_dim)) + seed
        embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
        table = rng.normal(size=(len(layout.calibration_levels), n_classes, layout.embed_dim)).astype(np.float32)
        return TaskSlice(TaskInfo(name, [f"{name} class {i}" for i in range(n_classes)], num_samples=samples),
                         rng.normal(size=img).astype(np.float32), rng.normal(size=img).astype(np.float32),
                         rng.normal(size=txt).astype(np.float32), rng.normal(size=txt).astype(np.float32),
                         GaussianStats.empty(layout.embed_dim).update(embeds), table)

    return make


@dataclass(frozen=True)
class Golden:
    """The committed golden folder (tests/runtime/golden, written by scripts/make_golden_model.py)."""

    root: Path
    meta: dict
    outputs: dict  # "pixel_values" and "<bank>.<output>" -> array (PyTorch reference, open_clip transform)
    banks: dict  # "three" | "four" | "other-classes" -> TaskBank

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def bank_path(self) -> Path:
        return self.model_dir / "bank.safetensors"

    @property
    def files(self) -> list[Path]:
        return [self.root / rel for rel in self.meta["images"]]

    @property
    def names(self) -> list[str]:
        return [p.stem for p in self.files]

    def image(self, name: str) -> Image.Image:
        with Image.open(self.root / "images" / f"{name}.png") as im:
            return im.convert("RGB")

    def reference(self, bank: str) -> dict[str, np.ndarray]:
        prefix = f"{bank}."
        return {k[len(prefix):]: v for k, v in self.outputs.items() if k.startswith(prefix)}


@pytest.fixture(scope="session")
def golden() -> Golden:
    meta = json.loads((GOLDEN / "golden.json").read_text())
    with np.load(GOLDEN / "golden.npz", allow_pickle=False) as z:
        outputs = {k: z[k] for k in z.files}
    banks = golden_script().golden_banks(GOLDEN)
    assert sorted(banks) == meta["banks"]
    return Golden(GOLDEN, meta, outputs, banks)


@pytest.fixture()
def empty_golden_bank(golden) -> TaskBank:
    return TaskBank.empty(golden.banks["three"].layout)
