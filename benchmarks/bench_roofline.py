"""Roofline: work per image counted from the graphs, and the fraction of this CPU's measured GEMM peak.

The machine's limit is measured, not looked up: one 4096-cube GEMM per precision and library on the same
threads — float32 through ONNX Runtime (``MatMul``) and PyTorch (``torch.mm``), int8 through ONNX Runtime
(``MatMulInteger``, the kernel dynamic quantisation runs), bf16 through PyTorch (oneDNN) where the CPU has bf16
units (:func:`benchmarks.roofline.peak_gemms`) — timed in the same interleaved rounds as the paths, so that a
fraction of the peak compares figures taken under the same load. A precision's peak in a round is its fastest
library's rate; every path reports its fraction of the peak of its own precision. The CPU's relevant features
(AMX, AVX512-BF16, VNNI) are printed and written to the JSON. Each path's work is counted from the shapes its MatMul /
Gemm / Conv nodes ran with (:func:`benchmarks.roofline.count_graph_flops`; PyTorch's ``FlopCounterMode``
cross-checks the calibrated count). Paths, timed side by side on the same preprocessed pixels (graph runs; no
image decoding):

* calibrated graph, float32, familiar images (``M`` ~ 1: two encoder passes) and unfamiliar ones (pass 2 skipped);
* calibrated graph, int8 (familiar);
* the plain encoder exported through the exporter's attention rewrite (the calibrated graph's pass 1 alone), and,
  where it fuses anything, the same after ONNX Runtime's transformer optimizer;
* PyTorch ``CalibratedDiki``, fastest eager configuration (:mod:`benchmarks.torch_eager`), familiar.

Achieved GFLOP/s = counted GFLOP per image / median seconds per image. Target: ViT-B/16, familiar,
float32, batch 8 >= 75 % of the measured float32 peak. Other rows are reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import Config, make_result, ort_session, time_side_by_side
from benchmarks.roofline import (
    PEAK_SIZE,
    bf16_kernel,
    count_graph_flops,
    cpu_flags,
    int8_kernel,
    peak_gemms,
    torch_flops,
)
from benchmarks.world import get_world

NAME = "roofline"
TITLE = "roofline: counted GFLOP per image, achieved GFLOP/s, fraction of this CPU's measured GEMM peak"
TARGET = "ViT-B/16 familiar fp32 at batch 8 >= 75 % of the measured fp32 peak"
MIN_FRACTION = 0.75
TARGET_MODEL = "ViT-B-16"
TARGET_BATCH = 8
TINY_PEAK_SIZE = 256


def measure(cfg: Config) -> dict[str, Any]:
    from benchmarks.torch_eager import fastest_eager

    n = TINY_PEAK_SIZE if cfg.tiny else PEAK_SIZE
    peaks = peak_gemms(cfg.n_threads, n)
    gemms = {label: g for pairs in peaks.values() for label, g in pairs}
    rows: list[dict[str, Any]] = []
    notes = [f"CPU features: {', '.join(cpu_flags()) or 'none reported'}; int8 GEMM kernel by CPU flags: "
             f"{int8_kernel()}; bf16 units: {bf16_kernel()}"
             + ("" if "bf16" in peaks else " (no bf16 peak measured)") + f"; {cfg.n_threads} threads"]
    measured_peaks: dict[str, list[float]] = {k: [] for k in peaks}
    counts: dict[str, Any] = {}
    for model in cfg.models:
        w = get_world(cfg, model)
        bank = w.bank.graph_inputs()
        graphs = {"calibrated fp32": w.exported("fp32") / "model.onnx",
                  "calibrated int8": w.exported("int8") / "model.onnx",
                  "plain encoder (rewrite)": w.plain_encoder_path}
        ortopt, fused = w.plain_encoder_ort_optimized
        if ortopt is not None:
            graphs["plain encoder (rewrite + ORT optimizer)"] = ortopt
        notes.append(f"{model}: ORT transformer optimizer (model_type vit) on the plain encoder fused "
                     f"{fused or 'nothing'}" + ("" if ortopt is not None else "; not timed separately"))
        sessions = {k: ort_session(p, cfg.n_threads, cfg.provider) for k, p in graphs.items()}
        # (label, graph, image kind); the calibrated graph also on unfamiliar images (pass 2 skipped)
        paths = [("calibrated fp32, familiar", "calibrated fp32", "familiar"),
                 ("calibrated fp32, unfamiliar", "calibrated fp32", "unfamiliar"),
                 ("calibrated int8, familiar", "calibrated int8", "familiar"),
                 *[(g, g, "familiar") for g in graphs if g.startswith("plain")]]
        images = {"familiar": w.familiar, "unfamiliar": w.unfamiliar}

        def feeds(graph: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
            return {"pixel_values": pixels, **(bank if graph.startswith("calibrated") else {})}

        # work per image: every node's work is per image, so one image of each kind is counted
        flop = {}
        for label, graph, kind in paths:
            one = w.pixels(images[kind][:1]).numpy()
            flop[label] = count_graph_flops(graphs[graph], feeds(graph, one), cfg.n_threads)
        for batch in cfg.batches:
            pix = {k: w.pixels(v[:batch]).numpy() for k, v in images.items()}
            torch_pix = w.pixels(images["familiar"][:batch])
            chosen, forward, record = fastest_eager(w.diki, w.torch_inputs(), torch_pix)
            torch_label = f"PyTorch {chosen}, familiar"
            if batch == cfg.batches[0]:
                flop[torch_label] = {"flop": torch_flops(lambda: forward(torch_pix)) / batch, "by_op": {},
                                     "node_runs": None, "counter": "torch.utils.flop_counter"}
            else:
                flop[torch_label] = next(v for k, v in flop.items() if k.startswith("PyTorch"))
            fns = {label: (lambda s=sessions[graph], f=feeds(graph, pix[kind]): s.run(None, f))
                   for label, graph, kind in paths}
            fns[torch_label] = lambda: forward(torch_pix)
            fns.update({label: g.run for label, g in gemms.items()})
            t = time_side_by_side(fns, cfg.warmup, cfg.repeats)
            rate = {k: max(g.rate(t[label]) for label, g in pairs) for k, pairs in peaks.items()}
            fp32_peak, int8_peak = rate["fp32"], rate["int8"]
            for k, pairs in peaks.items():
                measured_peaks[k].append(rate[k])
                for label, g in pairs:
                    mine = g.rate(t[label])
                    rows.append({"model": model.split("/")[-1], "batch": batch, "path": label,
                                 "GFLOP/image": f"{g.flop / 1e9:.1f} per run", "ms/image": t[label].fmt(),
                                 "GFLOP/s": f"{mine:.0f}",
                                 "of peak": f"the {k} peak" if mine == rate[k] else f"{mine / rate[k]:.0%} of {k}",
                                 "met": None,
                                 "data": {"timing": t[label].to_json(), "gflops": mine, "n": g.n, "precision": k,
                                          "is_peak": mine == rate[k]}})
            for label, timing in t.items():
                if label in gemms:
                    continue
                gflop = flop[label]["flop"] / 1e9
                per_image = timing.median / batch
                achieved = gflop / per_image
                int8 = "int8" in label
                frac = achieved / (int8_peak if int8 else fp32_peak)
                target = (model.split("/")[-1] == TARGET_MODEL and batch == TARGET_BATCH
                          and label == "calibrated fp32, familiar")
                rows.append({
                    "model": model.split("/")[-1], "batch": batch, "path": label,
                    "GFLOP/image": f"{gflop:.1f}", "ms/image": f"{per_image * 1e3:.1f}",
                    "GFLOP/s": f"{achieved:.0f}",
                    "of peak": f"{frac:.0%} of {'int8' if int8 else 'fp32'}"
                               + (f" ({achieved / fp32_peak:.0%} of fp32)" if int8 else ""),
                    "met": (frac >= MIN_FRACTION) if target else None,
                    "data": {"timing": timing.to_json(), "gflop_per_image": gflop, "gflops": achieved,
                             "fraction_of_peak": frac, "peak": "int8" if int8 else "fp32",
                             "peak_gflops": int8_peak if int8 else fp32_peak,
                             "flop_count": flop[label], **({"pytorch_eager": record} if "PyTorch" in label else {})},
                })
        counts[model] = {k: v["flop"] / 1e9 for k, v in flop.items()}
        cal = flop["calibrated fp32, familiar"]["flop"] / 1e9
        pt = next(v for k, v in flop.items() if k.startswith("PyTorch"))["flop"] / 1e9
        notes.append(f"{model}: calibrated familiar {cal:.2f} GFLOP/image counted from the ONNX graph vs "
                     f"{pt:.2f} by PyTorch's FlopCounterMode; plain encoder "
                     f"{flop['plain encoder (rewrite)']['flop'] / 1e9:.2f}")
    notes.append("GFLOP = 2 x multiply-adds of MatMul/Gemm/Conv (element-wise work not counted); "
                 "fraction = achieved / measured peak (medians); int8 rows: integer ops against the int8 peak")
    cols = ["model", "batch", "path", "GFLOP/image", "ms/image", "GFLOP/s", "of peak"]
    notes.append("peak = the GEMM timed in the same rounds as the paths of its block; the fraction of peak of a "
                 "row is against its own block's peak")
    return make_result(NAME, TITLE, TARGET, cols, rows, notes,
                       extra={"peaks": {k: {"n": n, "gflops_by_block": v} for k, v in measured_peaks.items()},
                              "cpu_features": list(cpu_flags()), "bf16_units": bf16_kernel(),
                              "gflop_per_image": counts})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
