"""Calibrated inference vs a plain single-pass CLIP image encoder exported the same way.

The plain encoder is open_clip's ``encode_image`` + L2 normalisation, exported with the same exporter settings
as the calibrated graph (TorchScript exporter, opset 18, constant folding, dynamic batch, MHA fast path off) and
run in an ONNX Runtime session configured the same way (intra-op threads, one inter-op thread, default graph
optimisation). Both are timed as graph runs on the same preprocessed pixels (the preprocessing is identical on
both sides and would only dilute the ratio), interleaved, after warm-up.

* familiar images (``M`` ~ 1): pass 2 runs for every image -> two encoder passes; target <= 2.1x (floor 2.0x);
* unfamiliar images (``M`` ~ 0): pass 2 gets a zero-row sub-batch -> one pass; target <= 1.15x.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import (
    Config,
    make_result,
    ort_session,
    profile_line,
    profile_ort,
    ratio,
    time_side_by_side,
)
from benchmarks.world import World, get_world

NAME = "calibration_overhead"
TITLE = "calibrated graph vs plain single-pass CLIP image encoder (both ONNX Runtime)"
TARGET = "familiar <= 2.1x, unfamiliar <= 1.15x"
LIMITS = {"familiar": 2.1, "unfamiliar": 1.15}


def preprocessed(w: World, images: list[np.ndarray]) -> np.ndarray:
    return w.pixels(images).numpy().astype(np.float32)


def measure(cfg: Config) -> dict[str, Any]:
    rows, notes, profiles = [], [], {}
    for model in cfg.models:
        w = get_world(cfg, model)
        calibrated = ort_session(w.exported("fp32") / "model.onnx", cfg.n_threads, cfg.provider)
        plain = ort_session(w.plain_encoder_path, cfg.n_threads, cfg.provider)
        bank = w.bank.graph_inputs()
        for batch in cfg.batches:
            fam = preprocessed(w, w.familiar[:batch])
            unf = preprocessed(w, w.unfamiliar[:batch])
            out_f = dict(zip([o.name for o in calibrated.get_outputs()],
                             calibrated.run(None, {"pixel_values": fam, **bank})))
            out_u = dict(zip([o.name for o in calibrated.get_outputs()],
                             calibrated.run(None, {"pixel_values": unf, **bank})))
            m_f, m_u = out_f["weight"], out_u["weight"]
            t = time_side_by_side({
                "plain": lambda: plain.run(None, {"pixel_values": fam}),
                "familiar": lambda: calibrated.run(None, {"pixel_values": fam, **bank}),
                "unfamiliar": lambda: calibrated.run(None, {"pixel_values": unf, **bank}),
            }, cfg.warmup, cfg.repeats)
            for case, mm in (("familiar", m_f), ("unfamiliar", m_u)):
                r = ratio(t[case], t["plain"])
                rows.append({
                    "model": model.split("/")[-1], "batch": batch, "images": case,
                    "M (min–max)": f"{float(mm.min()):.3g}–{float(mm.max()):.3g}",
                    "calibrated": t[case].fmt(), "plain encoder": t["plain"].fmt(),
                    "ratio": f"{r['of_medians']:.2f}x (rounds {r['round_min']:.2f}–{r['round_max']:.2f})",
                    "limit": f"<= {LIMITS[case]}x",
                    "met": r["of_medians"] <= LIMITS[case],
                    "data": {"calibrated": t[case].to_json(), "plain": t["plain"].to_json(), "ratio": r,
                             "weights_M": [float(x) for x in mm]},
                })
        runs = 1 if cfg.quick else 2
        one_f = preprocessed(w, w.familiar[:1])
        one_u = preprocessed(w, w.unfamiliar[:1])
        profiles[model] = {
            "plain": profile_ort(w.plain_encoder_path, {"pixel_values": one_f}, cfg.n_threads, runs),
            "calibrated_unfamiliar": profile_ort(w.exported("fp32") / "model.onnx", {"pixel_values": one_u, **bank},
                                                 cfg.n_threads, runs),
        }
        for k, p in profiles[model].items():
            notes.append(f"{model} profile, batch 1, {k}: {profile_line(p)}")
    notes.append("ratio = calibrated median / plain median (graph runs on the same pixels, interleaved)")
    cols = ["model", "batch", "images", "M (min–max)", "calibrated", "plain encoder", "ratio", "limit"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"profiles": profiles})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
