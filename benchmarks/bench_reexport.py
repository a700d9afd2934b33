"""Swapping the bank of a running Predictor vs a full re-export.

Two ways to serve another 11-task bank: ``Predictor.load_bank(path)`` (read + validate the safetensors file, cast
the arrays; on CUDA one upload) vs ``export_model(bank, out, force=True)`` (trace, write, validate against
PyTorch) plus a new ``Predictor`` on the new folder. The backbone is handed to ``export_model`` already loaded,
which favours the re-export (a ``diki-edge export`` from the command line also loads the backbone). The method is
the one of ``benchmarks/bench_bank_swap.py`` (runtime engineer), applied to the suite's 11-task, 100-class banks
of the reference backbone; that script is also run as is by the harness. Target: >= 100x faster.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from benchmarks.common import Config, Timing, make_result, time_fn, under_load_watch
from benchmarks.world import get_world

NAME = "reexport"
TITLE = "load_bank (swap 11 tasks) vs full re-export"
TARGET = ">= 100x faster"
MIN_SPEEDUP = 100.0
# One export (minutes for ViT-B on 2 cores): the target has orders of magnitude of margin.
EXPORTS = 1


def measure(cfg: Config) -> dict[str, Any]:
    from diki_edge_runtime import Predictor

    model = cfg.reference_model
    w = get_world(cfg, model)
    n = cfg.tasks
    bank_a = w.bank_path
    bank_b = w.dir / f"bank{n}-b.safetensors"
    if not bank_b.is_file():
        w.bank_with_tasks(2 * n).select(list(range(n, 2 * n))).save(bank_b)
    predictor = Predictor(w.exported("fp32"), provider=cfg.provider, threads=cfg.n_threads)
    state = {"i": 0}

    def swap():
        state["i"] += 1
        predictor.load_bank(bank_b if state["i"] % 2 else bank_a)

    swap_t = time_fn(swap, warmup=2, repeats=21 if not cfg.quick else 9)
    out = w.dir / "reexport-scratch"

    def exports() -> tuple[list[float], list[float]]:
        export_s, new_pred_s = [], []
        for i in range(EXPORTS):
            t0 = time.perf_counter()
            w.export_to(out, "fp32", bank_path=bank_b if i % 2 == 0 else bank_a)
            t1 = time.perf_counter()
            Predictor(out, provider=cfg.provider, threads=cfg.n_threads)
            export_s.append(t1 - t0)
            new_pred_s.append(time.perf_counter() - t1)
        return export_s, new_pred_s

    (export_s, new_pred_s), window = under_load_watch(exports)
    shutil.rmtree(out, ignore_errors=True)
    total = Timing([a + b for a, b in zip(export_s, new_pred_s)], window)
    speedup = total.median / swap_t.median
    rows = [{
        "model": model.split("/")[-1], "tasks": f"{n} <-> {n}",
        "load_bank": swap_t.fmt(), "export_model": Timing(export_s, window).fmt(1, "s"),
        "new Predictor": Timing(new_pred_s, window).fmt(), "re-export total": total.fmt(1, "s"),
        "speed-up": f"{speedup:,.0f}x", "met": speedup >= MIN_SPEEDUP,
        "data": {"load_bank": swap_t.to_json(), "export_model": Timing(export_s, window).to_json(),
                 "new_predictor": Timing(new_pred_s, window).to_json(), "reexport_total": total.to_json(),
                 "speedup": speedup, "bank_bytes": w.bank.nbytes()},
    }]
    notes = [f"load_bank: {len(swap_t.samples)} swaps alternating two {n}-task banks after 2 warm-up swaps; "
             f"re-export: {len(export_s)} export(s) with the backbone already loaded, including export-time "
             "validation, plus a new Predictor"]
    cols = ["model", "tasks", "load_bank", "export_model", "new Predictor", "re-export total", "speed-up"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes)


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
