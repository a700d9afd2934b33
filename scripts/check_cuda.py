"""The CUDA execution-provider check, for a machine with a GPU and `onnxruntime-gpu` (CI has neither).

Exports the bundled backbone with a 3-task bank of real DCIL tasks (synthetic adapters, real statistics), then:

* predicts the same images with the CPU and the CUDA provider: same tasks, same top-1, embeddings within 1e-4;
* checks that with CUDA the bank is uploaded once (IO binding) and not on every call, and again after load_bank;
* exports fp16 and validates it where CUDA can run it;
* times CPU vs CUDA predict (median of repeats).

Run: ``python scripts/check_cuda.py [--out DIR]``; prints a table and writes ``DIR/cuda_check.json``; exits 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch
    from diki_edge_export import export_model
    from diki_edge_runtime import Predictor
    from diki_edge_runtime.bank import TaskBank

    from diki_edge.backbone import load_backbone
    from diki_edge.datasets import make_task
    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge.synthetic import synthetic_task
    from diki_edge.train import image_transform

    results: dict = {"available_providers": ort.get_available_providers(), "checks": {}}
    checks = results["checks"]
    tmp = Path(tempfile.mkdtemp(prefix="diki-cuda-"))
    backbone = load_backbone()
    diki = DikiCLIP(backbone.model)
    layout = layout_for(backbone, diki)
    transform = image_transform(backbone)
    tasks = [make_task(n) for n in ("mnist", "emoji-jobs", "textures")]
    bank = TaskBank.empty(layout)
    for i, t in enumerate(tasks):
        fit = torch.stack([transform(im) for im, _ in t.train])
        bank = bank.with_task(synthetic_task(diki, backbone.tokenizer, t.name, t.class_names, fit,
                                             layout.calibration_levels, seed=i, value_scale=0.1))
    bank_path = bank.save(tmp / "bank.safetensors")
    smaller = bank.select([0, 1]).save(tmp / "bank2.safetensors")
    export_model(bank_path, tmp / "fp32", quiet=True)
    images = [im for t in tasks for im, _ in t.test[:16]]

    cpu = Predictor(tmp / "fp32", provider="cpu")
    gpu = Predictor(tmp / "fp32", provider="cuda")
    results["gpu_providers"] = gpu.providers
    a, b = cpu.predict(images, batch_size=16), gpu.predict(images, batch_size=16)
    gpu.predict(images, batch_size=16)
    checks["same_tasks"] = all(x.task == y.task for x, y in zip(a, b))
    checks["same_top1"] = all(x.top_k[0][0] == y.top_k[0][0] for x, y in zip(a, b))
    max_diff = max(float(np.abs(x.image_embeds - y.image_embeds).max()) for x, y in zip(a, b))
    results["embeds_max_abs_diff"] = max_diff
    checks["embeds_within_1e-4"] = max_diff <= 1e-4
    checks["bank_uploaded_once"] = getattr(gpu.session, "bank_uploads", None) == 1
    gpu.load_bank(smaller)
    gpu.predict(images[:4])
    gpu.predict(images[:4])
    checks["bank_reuploaded_once_after_swap"] = getattr(gpu.session, "bank_uploads", None) == 2

    timings = {}
    for name, pred in (("cpu", cpu), ("cuda", gpu)):
        for bs in (1, 8):
            batch = images[:bs]
            pred.predict(batch, batch_size=bs)
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                pred.predict(batch, batch_size=bs)
                samples.append((time.perf_counter() - t0) * 1e3)
            timings[f"{name}_b{bs}_ms"] = {"min": min(samples), "median": statistics.median(samples),
                                           "max": max(samples)}
    results["timings"] = timings

    fp16 = export_model(bank_path, tmp / "fp16", precision="fp16", quiet=True)
    results["fp16_manifest_validation"] = fp16.manifest.get("validation", {}).get("fp16")
    checks["fp16_validated_on_cuda"] = "CUDAExecutionProvider" in fp16.manifest.get("validated_providers", [])

    ok = all(checks.values())
    results["ok"] = ok
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(results, indent=2, default=str))
    for k, v in checks.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    for k, v in timings.items():
        print(f"{k:12s} median {v['median']:.2f} ms (min {v['min']:.2f}, max {v['max']:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
