"""Run task sequences for every method, fill the accuracy matrices and collect the measurements.

For each task order and each method: learn task ``t``, then evaluate every task ``j`` of the sequence ->
``A[t, j]`` (percent); after the whole sequence, evaluate the held-out sets of the backbone's pretraining
domains (retention; "before" is the frozen backbone, the common starting point of every method). Also recorded:
trainable parameters (per task, total), training time (sum over the sequence's tasks), inference time per image
(final model, fixed images and batch size), task-selection accuracy, the mean calibration weight ``M`` on
held-out images, and the ONNX-vs-PyTorch parity of DIKI's predictions.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diki_edge.evaluation import metrics as M
from diki_edge.evaluation.methods import (
    METHOD_KEYS,
    DikiEngine,
    DikiMethod,
    FineTuneConfig,
    FrozenFeatures,
    Method,
    PromptConfig,
    PromptEngine,
    PromptMethod,
    Schedule,
    SequentialFineTune,
    ZeroShot,
)
from diki_edge.evaluation.tasks import EvalTask
from diki_edge.train import TrainConfig

Log = Callable[[str], None]


@dataclass
class EvalConfig:
    orders: list[str] = field(default_factory=lambda: ["A", "B"])
    methods: list[str] = field(default_factory=lambda: list(METHOD_KEYS))
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    vote_batch: int = 32
    # Learning rates. Each method's reference value (DIKI SGD 5.0, L2P Adam 0.03, ZSCL's full fine-tuning AdamW
    # 1e-5) is for CLIP ViT-B/16 (logit scale 100); diki-tiny is tiny and its logit scale is 14. Each method's
    # rate was chosen ONCE from a grid by TRAINING accuracy only (never test), 10 epochs, batch 32, on the first
    # three tasks (textures, mnist, emoji-jobs) of the bundled diki-tiny (1200 steps): the smallest rate whose
    # mean training accuracy is within 2 points of the best (the gentler update where rates tie). Mean training
    # accuracy: DIKI 5: 70.6, 50: 90.1, 500: 36.2, 2000: 11.7 -> 50; prompts 0.003: 70.9, 0.03: 91.3,
    # 0.3: 92.3 -> 0.03; fine-tuning 1e-5: 72.5, 1e-4: 98.8, 1e-3: 99.9 -> 1e-4.
    diki_lr: float = 50.0
    prompt_lr: float = 0.03
    finetune_lr: float = 1e-4
    max_train: int | None = None
    max_test: int | None = None
    max_holdout: int | None = None
    timing_images: int = 256
    timing_batch: int = 32
    include_debian: bool = False
    threads: int | None = None  # ONNX Runtime intra-op threads (torch's are set by the caller)
    onnx_pixels: str = "runtime"  # "runtime" (numpy/Pillow preprocessing of the runtime) or "torch"
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> EvalConfig:
        """The reduced benchmark (a few steps per task, a few images per set) for tests and smoke runs."""
        base = dict(epochs=2, max_train=48, max_test=32, max_holdout=40, timing_images=32, quick=True)
        return cls(**{**base, **overrides})


def _quiet_log(_: str) -> None:
    pass


# Methods other distributions provide (``diki-onnx`` comes with diki-edge-export), so that the training core never
# imports the exporter: entry point name = method key, value = the Method class.
METHOD_GROUP = "diki_edge.eval_methods"


def plugin_method(key: str) -> type[Method]:
    from importlib.metadata import entry_points

    from diki_edge_runtime.errors import DikiEdgeError

    for ep in entry_points(group=METHOD_GROUP):
        if ep.name == key:
            return ep.load()
    raise DikiEdgeError(f"method {key!r} comes with the exporter, which is not installed here: "
                        "pip install diki-edge-export")


def build_methods(backbone, cfg: EvalConfig, work_dir: Path) -> list[Method]:
    unknown = [m for m in cfg.methods if m not in METHOD_KEYS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHOD_KEYS}")
    schedule = Schedule(cfg.epochs, cfg.batch_size, cfg.seed)
    frozen = FrozenFeatures(backbone.model, backbone.tokenizer)
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.diki_lr, seed=cfg.seed)
    needs_diki = any(m.startswith("diki") for m in cfg.methods)
    engine = DikiEngine(backbone, train_cfg) if needs_diki else None
    out: list[Method] = []
    for key in METHOD_KEYS:  # a fixed order: shared training happens in the first DIKI method
        if key not in cfg.methods:
            continue
        if key == "zero-shot":
            out.append(ZeroShot(frozen))
        elif key == "diki":
            out.append(DikiMethod(engine, "sample"))
        elif key == "diki-heldout":
            out.append(DikiMethod(engine, "heldout"))
        elif key == "diki-vote":
            out.append(DikiMethod(engine, "vote", cfg.vote_batch))
        elif key == "diki-no-calib":
            out.append(DikiMethod(engine, "uncalibrated"))
        elif key == "diki-onnx":
            out.append(plugin_method(key)(engine, work_dir / "onnx", cfg.onnx_pixels, cfg.threads))
        elif key == "prompt-l2p":
            pe = PromptEngine(backbone, frozen, train_cfg.residual_length, PromptConfig(cfg.prompt_lr, seed=cfg.seed),
                              schedule)
            out.append(PromptMethod(pe))
        elif key == "finetune":
            out.append(SequentialFineTune(backbone, FineTuneConfig(cfg.finetune_lr), schedule))
    return out


def timing_pixels(tasks: Sequence[EvalTask], count: int) -> torch.Tensor:
    """``count`` test images taken round-robin from the tasks (the same for every method)."""
    picks, i = [], 0
    while len(picks) < count and any(i < len(t.test_y) for t in tasks):
        picks.extend(t.test_x[i] for t in tasks if i < len(t.test_y))
        i += 1
    return torch.stack(picks[:count])


def _pct(x: float) -> float:
    return round(100.0 * x, 4) if not math.isnan(x) else math.nan


def untouched_holdouts(holdouts: Sequence[EvalTask], tasks: Sequence[EvalTask]) -> list[str]:
    """Held-out sets none of whose class names is a class of a benchmark task (pure pretrained knowledge)."""
    learned = {c for t in tasks for c in t.class_names}
    return [h.name for h in holdouts if not (set(h.class_names) & learned)]


def run_sequence(method: Method, order: str, tasks: Sequence[EvalTask], holdouts: Sequence[EvalTask],
                 cfg: EvalConfig, log: Log = _quiet_log, keep: bool = False) -> tuple[dict[str, Any], dict]:
    """One method through one task order. Returns its result record (and the raw outcomes when ``keep``)."""
    n = len(tasks)
    acc = np.full((n, n), np.nan)
    selection = np.full((n, n), np.nan)
    learn, outcomes = [], {}
    start = time.perf_counter()
    eval_seconds = 0.0
    method.start(order)
    for t, task in enumerate(tasks):
        rep = method.learn(task)
        learn.append(asdict(rep))
        e0 = time.perf_counter()
        for j, other in enumerate(tasks):
            out = method.evaluate(other)
            acc[t, j] = out.accuracy
            if out.selected is not None and j <= t:
                selection[t, j] = float(np.mean(out.selected == other.name))
            if keep:
                outcomes[(t, j)] = out
        eval_seconds += time.perf_counter() - e0
        log(f"  [{order}] {method.key}: learned {task.name} ({rep.seconds:.1f} s"
            f"{', shared' if rep.shared else ''}); row {t}: " + " ".join(f"{100 * a:.1f}" for a in acc[t]))
    after, weights = {}, {}
    e0 = time.perf_counter()
    for h in holdouts:
        out = method.evaluate(h, holdout=True)
        after[h.name] = _pct(out.accuracy)
        if out.weight is not None:
            weights[h.name] = float(np.mean(out.weight))
        if keep:
            outcomes[("holdout", h.name)] = out
    eval_seconds += time.perf_counter() - e0
    pixels = timing_pixels(tasks, cfg.timing_images)
    infer = method.inference_seconds(pixels, cfg.timing_batch)
    A = 100.0 * acc
    record = {
        "matrix": A.round(4).tolist(),
        **{k: round(v, 4) for k, v in M.mtil_metrics(A).items()},
        "transfer_per_task": M.transfer_per_task(A).round(4).tolist(),
        "selection_accuracy": None if np.all(np.isnan(selection)) else
        [[None if math.isnan(v) else round(100 * v, 2) for v in row] for row in selection],
        "learn": learn,
        "train_seconds": round(sum(r["seconds"] for r in learn), 3),
        "train_shared": any(r["shared"] for r in learn),
        "trainable_parameters": method.trainable_parameters(),
        "inference_ms_per_image": round(1000.0 * infer, 4),
        "retention_after": after,
        "holdout_mean_weight": weights or None,
        "eval_seconds": round(eval_seconds, 3),
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    return record, outcomes


def _parity(ref: dict, other: dict) -> dict[str, Any]:
    """Prediction-level agreement of two methods' raw outcomes over every cell and held-out set."""
    images = differ = 0
    for key, a in ref.items():
        b = other.get(key)
        if b is None:
            continue
        same = (a.pred_class == b.pred_class)
        if a.selected is not None and b.selected is not None:
            same &= (a.selected == b.selected)
        images += len(same)
        differ += int((~same).sum())
    return {"images": images, "differing_predictions": differ}


def run_sequences(backbone, sequences: dict[str, list[EvalTask]], holdouts: Sequence[EvalTask], cfg: EvalConfig,
                  work_dir: Path | None = None, log: Log = _quiet_log) -> dict[str, Any]:
    """Every method through every task order (same backbone, tasks, order and budget)."""
    total_start = time.perf_counter()
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="diki-eval-")
        work_dir = Path(tmp.name)
    methods = build_methods(backbone, cfg, Path(work_dir))
    zs = next((m for m in methods if m.key == "zero-shot"), None) or ZeroShot(FrozenFeatures(backbone.model,
                                                                                             backbone.tokenizer))
    before = {h.name: _pct(zs.evaluate(h, holdout=True).accuracy) for h in holdouts}
    results: dict[str, Any] = {"orders": {}, "methods": {m.key: m.describe() for m in methods},
                               "retention_before": before, "errors": {}}
    for order, tasks in sequences.items():
        log(f"order {order}: " + " -> ".join(t.name for t in tasks))
        untouched = untouched_holdouts(holdouts, tasks)
        rec_order: dict[str, Any] = {"tasks": [t.name for t in tasks], "methods": {},
                                     "untouched_holdouts": untouched}
        raw = {}
        for method in methods:
            try:
                rec, outs = run_sequence(method, order, tasks, holdouts, cfg, log,
                                         keep=method.key in ("diki", "diki-onnx"))
            except Exception as exc:  # one method failing (e.g. the exporter missing) never loses the others
                if method.key != "diki-onnx":
                    raise
                results["errors"][f"{order}/{method.key}"] = f"{type(exc).__name__}: {exc}"
                log(f"  [{order}] {method.key} failed: {type(exc).__name__}: {exc}")
                continue
            rec["retention"] = _retention_summary(before, rec["retention_after"], untouched)
            if method.key == "diki-onnx":
                rec["export_seconds"] = round(method.export_seconds, 3)
                rec["model_bytes"] = method.model_bytes
            rec_order["methods"][method.key] = rec
            raw[method.key] = outs
        if "diki" in raw and "diki-onnx" in raw:
            par = _parity(raw["diki"], raw["diki-onnx"])
            d, o = rec_order["methods"]["diki"], rec_order["methods"]["diki-onnx"]
            par["max_abs_matrix_difference"] = float(np.max(np.abs(np.array(d["matrix"]) - np.array(o["matrix"]))))
            par["metrics_equal"] = all(abs(d[k] - o[k]) < 1e-9 for k in ("transfer", "avg", "last"))
            rec_order["onnx_parity"] = par
        results["orders"][order] = rec_order
    for m in methods:
        m.close()
    results["seconds_total"] = round(time.perf_counter() - total_start, 1)
    if tmp is not None:
        tmp.cleanup()
    return results


def _retention_summary(before: dict[str, float], after: dict[str, float], untouched: list[str]) -> dict[str, Any]:
    names = list(before)
    mb = float(np.mean([before[n] for n in names])) if names else math.nan
    ma = float(np.mean([after[n] for n in names])) if names else math.nan
    ub = float(np.mean([before[n] for n in untouched])) if untouched else math.nan
    ua = float(np.mean([after[n] for n in untouched])) if untouched else math.nan
    return {"mean_before": round(mb, 4), "mean_after": round(ma, 4), "mean_change": round(ma - mb, 4),
            "untouched_before": round(ub, 4), "untouched_after": round(ua, 4), "untouched_change": round(ua - ub, 4)}


def run_dcil(cfg: EvalConfig, model: str | None = None, pretrained: str | None = None,
             work_dir: Path | None = None, log: Log = _quiet_log) -> dict[str, Any]:
    """The DCIL benchmark of :mod:`diki_edge.datasets` on a backbone (default: the bundled ``diki-tiny``)."""
    from diki_edge.backbone import DEFAULT_MODEL, load_backbone
    from diki_edge.datasets import dcil
    from diki_edge.evaluation.tasks import dcil_sequence, holdout_sets
    from diki_edge.train import image_transform

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(model or DEFAULT_MODEL, pretrained)
    transform = image_transform(backbone)
    all_tasks = dcil.dcil_tasks(cfg.seed)
    sequences = {o: dcil_sequence(o, transform, max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed,
                                  tasks=all_tasks) for o in cfg.orders}
    holdouts = holdout_sets(transform, max_test=cfg.max_holdout, include_debian=cfg.include_debian, seed=cfg.seed)
    log(f"data ready in {time.perf_counter() - t0:.1f} s: " + ", ".join(
        f"{t.name} {len(t.train_y)}/{len(t.test_y)}" for t in next(iter(sequences.values()))) +
        "; held-out " + ", ".join(f"{h.name} {len(h.test_y)}" for h in holdouts))
    results = run_sequences(backbone, sequences, holdouts, cfg, work_dir, log)
    first = next(iter(sequences.values()))
    results["benchmark"] = {
        "name": "DCIL (diki_edge.datasets.dcil)",
        "backbone": backbone.describe(),
        "config": asdict(cfg),
        "task_orders": {o: [t.name for t in s] for o, s in sequences.items()},
        "tasks": [t.describe() for t in first],
        "holdouts": [h.describe() for h in holdouts],
        "torch_threads": torch.get_num_threads(),
    }
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    return results
