"""Reduced-precision variants vs fp32: int8 on the CPU (dynamic quantisation), fp16 only with CUDA.

Both graphs come from ``export_model(precision=...)`` of the same bank (the int8 one has passed the exporter's
own validation against fp32). Graph runs on the same preprocessed familiar images (both passes run), sessions
configured like the runtime's, interleaved. Agreement over familiar and unfamiliar images: selected task, top-1
class, minimum cosine of the final embeddings. fp16 only when a GPU is lent (``--provider cuda``).

Target (set from the hardware): int8 >= 1.8x the fp32 graph at batch 8, with the export's int8 bounds
held — the exporter's own validation passed (``manifest.json``: embedding cosine and top-1 agreement on real
photos) and the benchmark's images keep the cosine bound (``diki_edge_export.validate.INT8_MIN_COSINE``). Top-1
agreement on the benchmark's images is reported, not bounded: their class table is random unit vectors, whose
top-2 logit margins (0.04-1.1 at logit scale 100 on ViT-B/32) a 0.9998-cosine embedding can cross.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import Config, make_result, ort_session, ratio, time_side_by_side
from benchmarks.world import get_world

NAME = "int8"
TITLE = "int8 (CPU) / fp16 (CUDA) graphs vs fp32"
TARGET = "int8 >= 1.8x fp32 at batch 8 with the export bounds held; fp16 when a GPU is lent"
MIN_INT8_SPEEDUP = 1.8
TARGET_BATCH = 8


def export_bounds_held(model_dir, variant: str) -> bool:
    """The exporter's validation of ``variant`` passed (as recorded in the folder's manifest)."""
    import json

    manifest = json.loads((model_dir / "manifest.json").read_text())
    return bool(manifest.get("validation", {}).get(variant, {}).get("passed"))


def outputs(sess, pixels: np.ndarray, bank: dict[str, np.ndarray], batch: int = 8) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    parts = [dict(zip(names, sess.run(None, {"pixel_values": pixels[i:i + batch], **bank})))
             for i in range(0, len(pixels), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in names}


def measure(cfg: Config) -> dict[str, Any]:
    model = cfg.reference_model
    w = get_world(cfg, model)
    variants = ["int8"] + (["fp16"] if cfg.provider == "cuda" else [])
    bank = w.bank.graph_inputs()
    sessions = {"fp32": ort_session(w.exported("fp32") / "model.onnx", cfg.n_threads, cfg.provider)}
    for v in variants:
        sessions[v] = ort_session(w.exported(v) / "model.onnx", cfg.n_threads, cfg.provider)
    rows, notes = [], []
    n_each = 8 if cfg.quick else 16
    pix = w.pixels(w.familiar[:n_each] + w.unfamiliar[:n_each]).numpy()
    outs = {k: outputs(s, pix, bank) for k, s in sessions.items()}
    ref = outs["fp32"]
    for batch in cfg.batches:
        fam = w.pixels(w.familiar[:batch]).numpy()
        t = time_side_by_side({k: (lambda s=s: s.run(None, {"pixel_values": fam, **bank}))
                               for k, s in sessions.items()}, cfg.warmup, cfg.repeats)
        for v in variants:
            r = ratio(t["fp32"], t[v])
            o = outs[v]
            cos = np.sum(o["image_embeds"] * ref["image_embeds"], -1) / (
                np.linalg.norm(o["image_embeds"], axis=-1) * np.linalg.norm(ref["image_embeds"], axis=-1))
            n = len(pix)
            task_agree = int(np.sum(o["task"] == ref["task"]))
            top1_agree = int(np.sum(o["logits"].argmax(-1) == ref["logits"].argmax(-1)))
            size = {k: (w.exported(k) / "model.onnx").stat().st_size / 2**20 for k in ("fp32", v)}
            held = None
            if v == "int8":
                from diki_edge_export.validate import INT8_MIN_COSINE

                held = export_bounds_held(w.exported(v), v) and float(cos.min()) >= INT8_MIN_COSINE
            rows.append({
                "model": model.split("/")[-1], "variant": v, "batch": batch,
                "fp32": t["fp32"].fmt(), "reduced": t[v].fmt(),
                "speed-up": f"{r['of_medians']:.2f}x (rounds {r['round_min']:.2f}–{r['round_max']:.2f})",
                "agreement (fam+unf)": f"task {task_agree}/{n}, top-1 {top1_agree}/{n}, min cos {cos.min():.4f}",
                "graph size": f"{size[v]:.0f} vs {size['fp32']:.0f} MiB",
                "bounds held": "" if held is None else ("yes" if held else "NO"),
                "met": (r["of_medians"] >= MIN_INT8_SPEEDUP and held) if v == "int8" and batch == TARGET_BATCH
                else None,
                "data": {"fp32": t["fp32"].to_json(), v: t[v].to_json(), "ratio": r, "task_agree": task_agree,
                         "top1_agree": top1_agree, "n": n, "min_cosine": float(cos.min()),
                         "mean_cosine": float(cos.mean()), "size_mib": size, "bounds_held": held},
            })
    if cfg.provider != "cuda":
        rows.append({"model": model.split("/")[-1], "variant": "fp16", "batch": "-", "fp32": "", "reduced": "",
                     "speed-up": "n/a: no GPU lent (CPU has no fp16 kernels worth timing)",
                     "agreement (fam+unf)": "", "graph size": "", "bounds held": "", "met": None})
    notes.append("int8 = ONNX Runtime dynamic quantisation of the encoder MatMul/Gemm weights (per channel), "
                 "activations quantised per call; Gaussian scoring and class table stay float32")
    cols = ["model", "variant", "batch", "fp32", "reduced", "speed-up", "agreement (fam+unf)", "graph size",
            "bounds held"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"model": model})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
