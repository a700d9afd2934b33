"""Skipping pass 2: an unfamiliar batch should cost about one encoder pass, a familiar one about two.

    python benchmarks/bench_skip_pass.py [--model ViT-B-32] [--batch 8] [--repeats 5]

Exports one fp32 graph (random weights; speed does not depend on the values) and times ONNX Runtime (CPU) on
batches of the same size: every image familiar (M ~ 1, pass 2 for all), half familiar, every image unfamiliar
(M ~ 0, the zero-row pass 2). Writes benchmarks/results/skip_pass.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "skip_pass.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights) or local-dir:PATH")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from rich.console import Console
    from rich.table import Table

    from diki_edge.backbone import load_backbone
    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge.synthetic import synthetic_task
    from diki_edge_export import export_model
    from diki_edge_runtime.bank import TaskBank
    from diki_edge_runtime.contract import OUTPUT_NAMES

    console = Console(width=max(Console().width, 120))
    backbone = load_backbone(args.model)
    diki = DikiCLIP(backbone.model).eval()
    layout = layout_for(backbone, diki)
    size = backbone.preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    b = args.batch
    familiar = []
    bank = TaskBank.empty(layout)
    for t in range(2):
        images = torch.randn(1, 3, h, w, generator=g) + 0.3 * torch.randn(b, 3, h, w, generator=g)
        bank = bank.with_task(synthetic_task(diki, backbone.tokenizer, f"task{t}", [f"c{t}_{j}" for j in range(5)],
                                             images, layout.calibration_levels, seed=t))
        familiar.append(images)  # images a task's Gaussian was fitted on: M ~ 1
    familiar = torch.cat(familiar)[::2][:b]  # both tasks mixed
    unfamiliar = torch.randn(1, 3, h, w, generator=g) + 0.3 * torch.randn(b, 3, h, w, generator=g)
    half = torch.cat([familiar[: b // 2], unfamiliar[: b - b // 2]])
    inputs = bank.graph_inputs()

    with tempfile.TemporaryDirectory(prefix="diki-skip-") as tmp:
        bank_path = bank.save(Path(tmp) / "bank.safetensors")
        result = export_model(bank_path, Path(tmp) / "model", backbone=backbone, quiet=True)
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(result.model_path), sess_options=opts, providers=["CPUExecutionProvider"])

        def run(pixels):
            return dict(zip(OUTPUT_NAMES, sess.run(None, {**inputs, "pixel_values": pixels.numpy()})))

        rows = []
        for name, pixels in (("familiar", familiar), ("half familiar", half), ("unfamiliar", unfamiliar)):
            out = run(pixels)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(pixels)
                times.append(time.perf_counter() - t0)
            rows.append({"batch": name, "images": b, "pass2_images": int(np.sum(out["weight"] >= 1e-6)),
                         "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                         "weight_min": float(out["weight"].min()), "weight_max": float(out["weight"].max())})
    base = next(r for r in rows if r["batch"] == "unfamiliar")["median_ms"]
    for r in rows:
        r["relative_to_unfamiliar"] = r["median_ms"] / base
        r["encoder_passes"] = 1 + r["pass2_images"] / r["images"]
    table = Table(title=f"skip pass 2 — {args.model}, batch {b}, ONNX Runtime CPU ({os.cpu_count()} cores)")
    for col in ("batch", "pass 2 images", "M range", "median ms", "vs unfamiliar", "encoder passes"):
        table.add_column(col, justify="left" if col == "batch" else "right")
    for r in rows:
        table.add_row(r["batch"], f"{r['pass2_images']}/{r['images']}",
                      f"{r['weight_min']:.1e}…{r['weight_max']:.2f}", f"{r['median_ms']:.1f}",
                      f"{r['relative_to_unfamiliar']:.2f}×", f"{r['encoder_passes']:.2f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "batch": b, "repeats": args.repeats,
                                    "onnxruntime": ort.__version__, "cpus": os.cpu_count(), "rows": rows},
                                   indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
