"""#1 ``Predictor.predict`` (ONNX Runtime, CPU) vs the PyTorch calibrated model (eager, same threads).

Both sides start from the same decoded uint8 images (HWC numpy) and end with the calibrated outputs: the runtime
through ``Predictor.predict`` (numpy/Pillow preprocessing, one graph run, top-k), PyTorch through open_clip's
eval transform and ``CalibratedDiki`` under ``torch.inference_mode`` with ``torch.set_num_threads`` equal to ONNX
Runtime's intra-op threads. Images are familiar (``M`` ~ 1: both passes run, the expensive case). Timed side by
side, interleaved, after warm-up. Target: >= 1.3x faster at batch 1 and 8. Where the time goes is recorded from
ONNX Runtime's profiler (per op type) at batch 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import (
    Config,
    make_result,
    profile_line,
    profile_ort,
    ratio,
    time_side_by_side,
)
from benchmarks.world import World, get_world

NAME = "latency"
TITLE = "Predictor.predict (ONNX Runtime) vs PyTorch calibrated model, same threads"
TARGET = ">= 1.3x faster at batch 1 and 8"
MIN_SPEEDUP = 1.3


def torch_predictor(w: World):
    import torch

    from diki_edge.calibrated import CalibratedDiki

    calibrated = CalibratedDiki(w.diki).eval()
    inputs = w.torch_inputs()

    def predict(images: list[np.ndarray]):
        with torch.inference_mode():
            out = calibrated(w.pixels(images), **inputs)
            probs = out.logits.softmax(-1)  # the runtime's top-k over the selected task's classes
            return out, probs.topk(min(5, probs.shape[1]), dim=-1)

    return predict


def measure(cfg: Config) -> dict[str, Any]:
    from diki_edge_runtime import Predictor

    rows, notes, profiles = [], [], {}
    for model in cfg.models:
        w = get_world(cfg, model)
        predictor = Predictor(w.exported("fp32"), provider=cfg.provider, threads=cfg.n_threads)
        torch_predict = torch_predictor(w)
        for batch in cfg.batches:
            images = w.familiar[:batch]
            t = time_side_by_side({"onnxruntime": lambda: predictor.predict(images, batch_size=batch),
                                   "pytorch": lambda: torch_predict(images)}, cfg.warmup, cfg.repeats)
            r = ratio(t["pytorch"], t["onnxruntime"])
            res = predictor.predict(images, batch_size=batch)
            ref, _ = torch_predict(images)
            same_task = sum(int(p.task_index == int(ref.task[i])) for i, p in enumerate(res))
            ref_top1 = ref.logits.argmax(-1).numpy()
            names = predictor.classes
            same_top1 = sum(int(p.label == names[ref_top1[i]]) for i, p in enumerate(res))
            m = [round(p.weight, 3) for p in res]
            rows.append({
                "model": model.split("/")[-1], "batch": batch,
                "onnxruntime": t["onnxruntime"].fmt(), "pytorch": t["pytorch"].fmt(),
                "speed-up": f"{r['of_medians']:.2f}x (rounds {r['round_min']:.2f}–{r['round_max']:.2f})",
                "agree task/top-1": f"{same_task}/{batch}, {same_top1}/{batch}",
                "met": r["of_medians"] >= MIN_SPEEDUP,
                "data": {"onnxruntime": t["onnxruntime"].to_json(), "pytorch": t["pytorch"].to_json(), "ratio": r,
                         "weights_M": m, "threads": cfg.n_threads},
            })
        # where the ONNX Runtime time goes (batch 1, familiar)
        feeds = predictor.feeds(predictor.pixel_values(list(w.familiar[:1])))
        prof = profile_ort(w.exported("fp32") / "model.onnx", feeds, cfg.n_threads, runs=1 if cfg.quick else 2)
        profiles[model] = prof
        notes.append(f"{model} ORT profile (batch 1, familiar): {profile_line(prof)}")
    notes.append("both sides from uint8 HWC images to calibrated outputs; familiar images (both passes run); "
                 "timed interleaved; speed-up = PyTorch median / ONNX Runtime median")
    cols = ["model", "batch", "onnxruntime", "pytorch", "speed-up", "agree task/top-1"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"profiles": profiles})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
