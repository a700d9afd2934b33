"""Peers: the runtime's fastest validated CPU path against PyTorch's fastest CPU path on the same calibrated DIKI
model, and against OpenVINO running the plain (single-pass) image encoder.

Paths, all on the same threads, timed in the same interleaved rounds (images/s at each batch):

* runtime fp32 (ONNX Runtime), runtime int8 (the exporter's int8 graph, when its validation passed), runtime bf16
  (the fp32 graph through OpenVINO at bf16, ``--precision bf16``, when the CPU has bf16 units and it agrees with
  fp32 here: same task, embedding cosine >= ``tolerances.BF16_MIN_COSINE``; top-1 is reported, not required, for
  the reason bench_int8 gives);
* PyTorch: the fastest of eager fp32 (inference mode, with / without channels-last; torch_eager.py) and bf16
  autocast of that forward where the CPU has bf16 units;
* OpenVINO on the plain encoder (its default CPU precision: bf16 on AMX / AVX512-BF16).

``summary.fastest_vs_torch_fastest``: the smaller over the batches of (fastest validated runtime path) / (fastest
PyTorch path), as throughput ratios. Each reduced-precision path reports its fraction of its own precision's GEMM
peak (roofline.peak_gemms, timed in the same rounds): int8 against the int8 peak, bf16 against the bf16 peak.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import Config, make_result, time_side_by_side
from benchmarks.roofline import PEAK_SIZE, count_graph_flops, has_bf16_units, peak_gemms
from benchmarks.world import get_world

NAME = "peers"
TITLE = "runtime's fastest validated CPU path vs PyTorch's fastest and OpenVINO (plain encoder)"
TARGET = "reported: fastest validated runtime path / fastest PyTorch path (images/s), b1 and b8"
TINY_PEAK_SIZE = 256


def _agreement(ref: dict, got: dict) -> dict[str, Any]:
    a, b = (np.asarray(x["image_embeds"], np.float64) for x in (ref, got))
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"task": int(np.sum(ref["task"] == got["task"])), "top1": int(np.sum(ref["logits"].argmax(-1)
                                                                             == got["logits"].argmax(-1))),
            "n": int(len(a)), "min_cosine": float(cos.min())}


def measure(cfg: Config) -> dict[str, Any]:
    import torch

    from benchmarks.bench_int8 import export_bounds_held
    from benchmarks.torch_eager import fastest_eager
    from diki_edge_runtime.session import Session
    from diki_edge_runtime.tolerances import BF16_MIN_COSINE

    model = cfg.reference_model
    w = get_world(cfg, model)
    threads = cfg.n_threads
    torch.set_num_threads(threads)
    bank = w.bank.graph_inputs()
    fp32_graph = w.exported("fp32") / "model.onnx"
    runtime = {"runtime fp32 (ORT)": Session(fp32_graph, "cpu", threads)}
    notes, validated = [], {"runtime fp32 (ORT)": True}
    int8_dir = w.exported("int8")
    runtime["runtime int8 (ORT MatMulInteger)"] = Session(int8_dir / "model.onnx", "cpu", threads)
    validated["runtime int8 (ORT MatMulInteger)"] = export_bounds_held(int8_dir, "int8")
    bf16 = has_bf16_units()
    ov_plain = None
    try:
        import openvino as ov

        from diki_edge_runtime.ov_session import OpenVinoSession

        if bf16:
            runtime["runtime bf16 (OpenVINO)"] = OpenVinoSession(fp32_graph, threads, "bf16")
        core = ov.Core()
        ov_plain = core.compile_model(core.read_model(str(w.plain_encoder_path)), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads})
        ov_plain_precision = str(ov_plain.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    except ImportError:
        notes.append("openvino not installed: no bf16 runtime path, no OpenVINO peer (pip install openvino)")
    handles = {k: s.prepare_bank(bank) for k, s in runtime.items()}
    check_pix = w.pixels(w.familiar[:8] + w.unfamiliar[:8]).numpy()
    outs = {k: s.run(check_pix, handles[k]) for k, s in runtime.items()}
    agree = {k: _agreement(outs["runtime fp32 (ORT)"], o) for k, o in outs.items()}
    if "runtime bf16 (OpenVINO)" in runtime:
        a = agree["runtime bf16 (OpenVINO)"]
        validated["runtime bf16 (OpenVINO)"] = a["task"] == a["n"] and a["min_cosine"] >= BF16_MIN_COSINE
    one = w.pixels(w.familiar[:1]).numpy()
    flop_per_image = count_graph_flops(fp32_graph, {"pixel_values": one, **bank}, threads)["flop"]
    peaks = peak_gemms(threads, TINY_PEAK_SIZE if cfg.tiny else PEAK_SIZE)
    gemms = {label: g for pairs in peaks.values() for label, g in pairs if label.split()[1] in ("int8", "bf16")}
    rows, ratios = [], {}
    for batch in cfg.batches:
        pix = w.pixels(w.familiar[:batch]).numpy()
        torch_pix = w.pixels(w.familiar[:batch])
        chosen, forward, _ = fastest_eager(w.diki, w.torch_inputs(), torch_pix)
        fns = {k: (lambda s=s, h=handles[k]: s.run(pix, h)) for k, s in runtime.items()}
        fns[f"PyTorch fp32 {chosen}"] = lambda: forward(torch_pix)
        if bf16:
            def autocast(f=forward):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return f(torch_pix)
            fns[f"PyTorch bf16 autocast {chosen}"] = autocast
        if ov_plain is not None:
            request = ov_plain.create_infer_request()
            fns[f"OpenVINO plain encoder ({ov_plain_precision})"] = lambda r=request: r.infer({0: pix})
        fns.update({label: g.run for label, g in gemms.items()})
        t = time_side_by_side(fns, cfg.warmup, cfg.repeats)
        peak_rate = {k: max(g.rate(t[label]) for label, g in pairs) for k, pairs in peaks.items()
                     if k in ("int8", "bf16")}
        ips = {k: batch / t[k].median for k in fns if k not in gemms}
        best_rt = max((k for k in runtime if validated[k]), key=lambda k: ips[k])
        best_torch = max((k for k in ips if k.startswith("PyTorch")), key=lambda k: ips[k])
        ratios[batch] = ips[best_rt] / ips[best_torch]
        for k in ips:
            prec = "int8" if "int8" in k else "bf16" if "bf16" in k else None
            frac = (flop_per_image * ips[k] / 1e9 / peak_rate[prec]) if prec in peak_rate and "plain" not in k \
                else None
            rows.append({"model": model.split("/")[-1], "batch": batch, "path": k, "time": t[k].fmt(),
                         "images/s": f"{ips[k]:.1f}",
                         "validated": "" if k not in runtime else ("yes" if validated[k] else "NO"),
                         "of own peak": "" if frac is None else f"{frac:.0%} of {prec}",
                         "fastest": "runtime" if k == best_rt else "torch" if k == best_torch else "",
                         "met": None,
                         "data": {"timing": t[k].to_json(), "images_per_s": ips[k], "fraction_of_peak": frac,
                                  "peak": prec, "agreement": agree.get(k)}})
        notes.append(f"batch {batch}: {best_rt} {ips[best_rt]:.1f} img/s vs {best_torch} {ips[best_torch]:.1f} "
                     f"img/s = {ratios[batch]:.2f}x; peaks (GFLOP/s or GOP/s): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in peak_rate.items()))
    notes.append(f"{threads} threads everywhere; agreement vs runtime fp32 on 16 images: "
                 + "; ".join(f"{k}: task {a['task']}/{a['n']}, top-1 {a['top1']}/{a['n']}, min cos "
                             f"{a['min_cosine']:.4f}" for k, a in agree.items() if k != "runtime fp32 (ORT)"))
    cols = ["model", "batch", "path", "time", "images/s", "validated", "of own peak", "fastest"]
    summary = {"fastest_vs_torch_fastest": min(ratios.values()), "by_batch": ratios,
               "gflop_per_image": flop_per_image / 1e9}
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"model": model, "summary": summary})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode(reference_model="ViT-B-16", models=["ViT-B-16"], repeats=3) if quick
                   else Config.full(repeats=3))


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
