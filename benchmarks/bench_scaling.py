"""Latency and memory as the bank grows: 1, 11, 50, 100 tasks on the same graph.

Banks with more than 11 tasks repeat the 11 tasks' arrays under new names (9-10 classes each, so 100 tasks carry
~900 classes): the per-task work — one more ``[D, D]`` whitening in the Gaussian scoring matmul, one more slot
in the gathers, ~9 more classes in the table — is what grows. Graph runs at batch 1 (ONNX Runtime session
configured like the runtime's), familiar (two passes) and unfamiliar (one pass) images, all task counts timed
interleaved together with the plain single-pass encoder of calibration_overhead.
Per-task cost = least-squares slope of the median
latency over the task count; target: <= 1 % of one encoder pass (the plain encoder's median) per extra task.
Memory: the bank's graph-input bytes, and the peak RSS of a fresh process that loads the model with that bank and
predicts one image (``Predictor``, torch-free).
"""

from __future__ import annotations

import sys
import textwrap
from typing import Any

import numpy as np

from benchmarks.common import (
    Config,
    make_result,
    ort_session,
    python_cmd,
    run_measured,
    time_side_by_side,
)
from benchmarks.world import get_world

NAME = "scaling"
TITLE = "latency and memory vs number of tasks in the bank"
TARGET = "each extra task adds <= 1% of one encoder pass"
MAX_FRACTION = 0.01

RSS_CODE = textwrap.dedent("""
    import sys
    from diki_edge_runtime import Predictor
    p = Predictor(sys.argv[1], threads=int(sys.argv[3]), bank=sys.argv[2])
    r = p.predict([sys.argv[4]])
    print(r[0].task, flush=True)
    assert "torch" not in sys.modules
""")


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def measure(cfg: Config) -> dict[str, Any]:
    from PIL import Image

    model = cfg.reference_model
    w = get_world(cfg, model)
    sess = ort_session(w.exported("fp32") / "model.onnx", cfg.n_threads, cfg.provider)
    plain = ort_session(w.plain_encoder_path, cfg.n_threads, cfg.provider)
    fam = w.pixels(w.familiar[:1]).numpy()
    unf = w.pixels(w.unfamiliar[:1]).numpy()
    banks = {t: w.bank_with_tasks(t) for t in cfg.task_counts}
    feeds = {t: b.graph_inputs() for t, b in banks.items()}
    fns = {"plain": lambda: plain.run(None, {"pixel_values": fam})}
    for t in cfg.task_counts:
        fns[f"fam{t}"] = lambda t=t: sess.run(None, {"pixel_values": fam, **feeds[t]})
        fns[f"unf{t}"] = lambda t=t: sess.run(None, {"pixel_values": unf, **feeds[t]})
    timings = time_side_by_side(fns, cfg.warmup, cfg.repeats)
    pass_s = timings["plain"].median

    image_path = w.dir / "familiar0.png"
    Image.fromarray(w.familiar[0]).save(image_path)
    rss = {}
    for t in cfg.task_counts:
        path = w.bank_file_with_tasks(t)
        proc = run_measured(python_cmd(RSS_CODE, str(w.exported("fp32")), str(path), str(cfg.n_threads),
                                       str(image_path)))
        rss[t] = proc.peak_rss_mib if proc.returncode == 0 else None
        if proc.returncode != 0:
            rss[t] = None
            print(proc.stderr[-2000:], file=sys.stderr)
    rows, notes = [], []
    for case in ("fam", "unf"):
        meds = [timings[f"{case}{t}"].median for t in cfg.task_counts]
        per_task = slope(cfg.task_counts, meds)
        frac = per_task / pass_s
        for t, med in zip(cfg.task_counts, meds):
            b = banks[t]
            rows.append({"images": "familiar" if case == "fam" else "unfamiliar", "tasks": t,
                         "classes": len(b.class_names), "latency (batch 1)": timings[f"{case}{t}"].fmt(),
                         "bank inputs": f"{sum(a.nbytes for a in feeds[t].values()) / 2**20:.1f} MiB",
                         "peak RSS": f"{rss[t]:.0f} MiB" if rss[t] else "n/a",
                         "per extra task": "", "met": None,
                         "data": {"latency": timings[f"{case}{t}"].to_json(),
                                  "bank_input_bytes": int(sum(a.nbytes for a in feeds[t].values())),
                                  "peak_rss_mib": rss[t]}})
        rows[-1]["per extra task"] = (f"{per_task * 1e3:+.3f} ms = {frac:+.3%} of a pass "
                                      f"({pass_s * 1e3:.1f} ms)")
        rows[-1]["met"] = frac <= MAX_FRACTION
        rows[-1]["data"]["slope_s_per_task"] = per_task
        rows[-1]["data"]["fraction_of_pass"] = frac
    ts = cfg.task_counts
    rss_vals = [rss[t] for t in ts if rss[t]]
    if len(rss_vals) == len(ts) and len(ts) > 1:
        notes.append(f"peak RSS grows {slope(ts, rss_vals):.2f} MiB per task (the [D, D] whitening is "
                     f"{w.layout.embed_dim ** 2 * 4 / 2**20:.2f} MiB per task in float32)")
    notes.append(f"{model}; per-task cost = slope of median latency over {ts} tasks; one encoder pass = plain "
                 "encoder median at batch 1, timed in the same rounds")
    cols = ["images", "tasks", "classes", "latency (batch 1)", "bank inputs", "peak RSS", "per extra task"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes,
                       extra={"model": model, "plain_pass": timings["plain"].to_json()})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
