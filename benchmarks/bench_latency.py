"""``Predictor.predict`` (ONNX Runtime, CPU) vs the PyTorch calibrated model at its fastest eager setting.

Both sides start from the same decoded uint8 images (HWC numpy) and end with the calibrated outputs: the runtime
through ``Predictor.predict`` (numpy/Pillow preprocessing, one graph run, top-k), PyTorch through open_clip's
eval transform and ``CalibratedDiki`` in the fastest eager configuration of
:func:`benchmarks.torch_eager.fastest_eager` (chosen per batch by a trial; ``torch.inference_mode``,
``torch.set_num_threads`` equal to ONNX Runtime's intra-op threads; the settings are recorded). Images are
familiar (``M`` ~ 1: both passes run, the expensive case). Timed side by side, interleaved, after warm-up.

The ratio is reported, not targeted: both sides spend most of their time in the same float32 GEMMs, at a large
fraction of what this CPU can do at all (the roofline benchmark), so a ratio against PyTorch says little about what is
left.
Where the time goes is recorded from ONNX Runtime's profiler (per op type) at batch 1.
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
TITLE = "Predictor.predict (ONNX Runtime) vs PyTorch calibrated model (fastest eager), same threads"
TARGET = "report (the target lives in roofline: fraction of the measured peak)"


def torch_predictor(w: World, images: list[np.ndarray]):
    """PyTorch from uint8 images to top-k, in the eager configuration that is fastest on ``images``."""
    from benchmarks.torch_eager import fastest_eager

    name, forward, record = fastest_eager(w.diki, w.torch_inputs(), w.pixels(images))

    def predict(batch: list[np.ndarray]):
        out = forward(w.pixels(batch))
        probs = out.logits.softmax(-1)  # the runtime's top-k over the selected task's classes
        return out, probs.topk(min(5, probs.shape[1]), dim=-1)

    return predict, record


def measure(cfg: Config) -> dict[str, Any]:
    from diki_edge_runtime import Predictor

    rows, notes, profiles = [], [], {}
    for model in cfg.models:
        w = get_world(cfg, model)
        predictor = Predictor(w.exported("fp32"), provider=cfg.provider, threads=cfg.n_threads)
        for batch in cfg.batches:
            images = w.familiar[:batch]
            torch_predict, torch_record = torch_predictor(w, images)
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
                "pytorch setting": torch_record["chosen"],
                "agree task/top-1": f"{same_task}/{batch}, {same_top1}/{batch}",
                "met": None,
                "data": {"onnxruntime": t["onnxruntime"].to_json(), "pytorch": t["pytorch"].to_json(), "ratio": r,
                         "weights_M": m, "threads": cfg.n_threads, "pytorch_eager": torch_record},
            })
        # where the ONNX Runtime time goes (batch 1, familiar)
        feeds = predictor.feeds(predictor.pixel_values(list(w.familiar[:1])))
        prof = profile_ort(w.exported("fp32") / "model.onnx", feeds, cfg.n_threads, runs=1 if cfg.quick else 2)
        profiles[model] = prof
        notes.append(f"{model} ORT profile (batch 1, familiar): {profile_line(prof)}")
    from benchmarks.torch_eager import torch_thread_settings

    notes.append("both sides from uint8 HWC images to calibrated outputs; familiar images (both passes run); "
                 "timed interleaved; speed-up = PyTorch median / ONNX Runtime median")
    notes.append(f"threads: ONNX Runtime {cfg.n_threads} intra-op + 1 inter-op; PyTorch {torch_thread_settings()}; "
                 "PyTorch setting = the fastest eager candidate of a trial on the same batch "
                 "(benchmarks/torch_eager.py)")
    cols = ["model", "batch", "onnxruntime", "pytorch", "speed-up", "pytorch setting", "agree task/top-1"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"profiles": profiles})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
