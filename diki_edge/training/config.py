"""What a training run learns and how it executes: :class:`TrainConfig` (the recipe, checked when made),
:class:`RunOptions` (device, precision, workers, checkpoints: never the result) and :class:`TrainReport`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diki_edge.errors import TrainUsageError
from diki_edge.loader import STATS_BATCH
from diki_edge.model import DEFAULT_RESIDUAL_LENGTH
from diki_edge_runtime import calibration as calib
from diki_edge_runtime.contract import DEFAULT_TEMPLATE
from diki_edge_runtime.gaussian import DEFAULT_RIDGE


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None  # None: backbone.recommended_lr (the reference's 5.0 unless the backbone says)
    min_lr_ratio: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    levels: int = 9
    ridge: float = DEFAULT_RIDGE
    calibration: str = calib.DEFAULT_METHOD  # diki_edge_runtime.calibration: "paper" or "heldout"

    def __post_init__(self) -> None:
        problem = config_problem(self)
        if problem:
            raise TrainUsageError(problem)


def config_problem(cfg: TrainConfig) -> str | None:
    """What is wrong with a training configuration, or None (see the module docstring)."""
    if cfg.lr is not None and not (_finite(cfg.lr) and cfg.lr > 0):
        return f"the learning rate must be a finite number > 0, got {cfg.lr}"
    if not (_finite(cfg.ridge) and cfg.ridge >= 0):
        return f"the covariance ridge must be a finite number >= 0, got {cfg.ridge}"
    if not (_finite(cfg.min_lr_ratio) and 0 <= cfg.min_lr_ratio <= 1):
        return f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}"
    if not (_finite(cfg.weight_decay) and cfg.weight_decay >= 0):
        return f"weight_decay must be a finite number >= 0, got {cfg.weight_decay}"
    for name in ("epochs", "batch_size", "residual_length"):
        if getattr(cfg, name) < 1:
            return f"{name} must be >= 1, got {getattr(cfg, name)}"
    if cfg.levels < 2:
        return f"levels must be >= 2, got {cfg.levels}"
    if cfg.calibration not in calib.METHODS:
        return f"the calibration must be one of {', '.join(calib.METHODS)}, got {cfg.calibration!r}"
    return template_problem(cfg.template)


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a prompt template with exactly one ``{}`` for the class name, or None."""
    marker = "\x00class\x00"
    try:
        filled = template.format(marker) if template.count("{}") == 1 else None
    except (IndexError, KeyError, ValueError):
        filled = None
    if filled is None or filled.count(marker) != 1:
        return (f"the template {template!r} must hold exactly one '{{}}' for the class name (and no other "
                "braces; write '{{' and '}}' for literal ones)")
    return None


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class RunOptions:
    """How a run executes (not what it learns): none of these changes the recipe."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (the last two on CUDA only)
    workers: int | None = None  # DataLoader processes; None: 0 on the CPU, up to 8 per GPU
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at the end of every epoch only)
    resume: bool = False
    stats_batch_size: int = STATS_BATCH  # most images per step of the statistics pass (capped by batch_size)


@dataclass
class TrainReport:
    task: str
    samples: int
    skipped: int
    seconds: float
    final_loss: float
    train_accuracy: float
    device: str = "cpu"
    processes: int = 1
    rank: int = 0
    resumed_from: str | None = None  # "epoch E, batch B" when --resume continued a checkpoint
    warning: str | None = None  # calibration.few_images_warning: too few images for the task's Gaussian
