"""Full-size export check: ViT-B/32 and ViT-B/16 (random weights), export + parity, figures to a table.

    python benchmarks/export_full_size.py [--models ViT-B-32 ViT-B-16] [--precisions fp32 int8]

Writes benchmarks/results/export_full_size.json. Speed and size do not depend on the weights' values, and the
parity check is the one ``diki-edge export`` runs (real scikit-image photos + random inputs, bank + probe bank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "export_full_size.json"


def build_bank(backbone, tasks: int, per_task: int, path: Path):
    import torch

    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge.synthetic import synthetic_task
    from diki_edge_runtime.bank import TaskBank

    diki = DikiCLIP(backbone.model).eval()
    layout = layout_for(backbone, diki)
    size = backbone.preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    bank = TaskBank.empty(layout)
    for t in range(tasks):
        mean = torch.randn(1, 3, h, w, generator=g)
        images = mean + 0.3 * torch.randn(per_task, 3, h, w, generator=g)
        bank = bank.with_task(synthetic_task(diki, backbone.tokenizer, f"task{t}", [f"class{t}_{j}" for j in range(5)],
                                             images, layout.calibration_levels, seed=t))
    return bank.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--per-task", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import onnxruntime
    import torch
    from rich.console import Console
    from rich.table import Table

    from diki_edge.backbone import load_backbone
    from diki_edge_export import export_model

    console = Console(width=max(Console().width, 120))
    rows = []
    with tempfile.TemporaryDirectory(prefix="diki-full-size-") as tmp:
        for name in args.models:
            backbone = load_backbone(name)  # random weights, seeded
            t0 = time.perf_counter()
            bank_path = build_bank(backbone, args.tasks, args.per_task, Path(tmp) / f"{name}.safetensors")
            bank_s = time.perf_counter() - t0
            for precision in args.precisions:
                console.rule(f"{name} {precision}")
                out = Path(tmp) / f"{name}-{precision}"
                result = export_model(bank_path, out, backbone=backbone, precision=precision)
                v = result.validation
                fp32 = v.get("fp32", {}).get("summary", {})
                var = v.get(precision, {}).get("summary", {}) if precision != "fp32" else {}
                rows.append({
                    "model": name, "precision": precision, "bank_seconds": round(bank_s, 1),
                    "export_seconds": round(result.seconds, 1),
                    "export_step_seconds": {k: round(s, 2) for k, s in result.timings.items()},
                    "model_mb": round(result.model_bytes / 1e6, 1),
                    "fp32_embeds_max_abs": fp32.get("embeds_max_abs"),
                    "fp32_scores_max_rel": fp32.get("scores_max_rel"),
                    "fp32_weight_max_abs": fp32.get("weight_max_abs"),
                    "fp32_task_mismatches": fp32.get("task_mismatches"),
                    "fp32_top1_mismatches": fp32.get("top1_mismatches"),
                    "variant_cosine_min": var.get("cosine_min"), "variant_top1_agreement": var.get("top1_agreement"),
                    "variant_task_agreement": var.get("task_agreement"),
                    "validated_images": fp32.get("images") or var.get("images"),
                    "validated_providers": result.manifest.validated_providers,
                    "not_validated": result.manifest.not_validated,
                })
    table = Table(title="full-size export (random weights, CPU)")
    for col in ("model", "prec", "export s", "MB", "embeds Δ", "scores rel", "M Δ", "task/top1 ≠", "cos min",
                "top1 agree"):
        table.add_column(col, justify="left" if col in ("model", "prec") else "right")
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        table.add_row(r["model"], r["precision"], f"{r['export_seconds']:.1f}", f"{r['model_mb']:.1f}",
                      fmt(r["fp32_embeds_max_abs"], ".1e"), fmt(r["fp32_scores_max_rel"], ".1e"),
                      fmt(r["fp32_weight_max_abs"], ".1e"),
                      "" if r["fp32_task_mismatches"] is None
                      else f"{r['fp32_task_mismatches']}/{r['fp32_top1_mismatches']}",
                      fmt(r["variant_cosine_min"], ".5f"), fmt(r["variant_top1_agreement"], ".3f"))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
