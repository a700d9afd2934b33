"""Helpers of the training tests (tests/train): digit and photo folders, CLI and torchrun runs, comparisons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digit_folder(root: Path, classes=(0, 1, 2), per_class=12, seed=0) -> Path:
    """Real 8x8 handwritten digits (scikit-learn) as an image folder."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for c in classes:
        idx = rng.permutation(np.nonzero(d.target == c)[0])[:per_class]
        folder = root / DIGIT_NAMES[c]
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "diki_edge", "train", "--quiet", *args]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--monitor-interval=0.5", "-m", "diki_edge", "train", "--quiet", *args]


def run(cmd: list[str], timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(**extra_env), timeout=timeout)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))
