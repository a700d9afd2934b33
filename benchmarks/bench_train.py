"""Training throughput: the streamed loader vs images held in memory, 2 Gloo processes vs 1, fp32 vs bf16 on CUDA.

Target: at 224 px, batch 32, random weights (ViT-B/16; --quick: ViT-B/32), the streamed loader costs at
most 10 % more per image than the in-memory path on the same threads (the images decoded in the same process:
``--workers 0``, the CPU default). Each variant trains one epoch of ``steps + 1`` batches in its own process
(interleaved A, B, A, B); the first step (warm-up) is left out and the time per image is the median step's. Peak
RSS is each process's VmHWM: the in-memory one holds every image (602 KB each at 224 px), the streamed one a
batch. Also stated, without a target: time per step of ``torchrun --nproc-per-node 2`` (Gloo, 1 thread each) vs
one process with the same 2 threads; on CUDA (when present) images/s in fp32 and bf16.

A process of this module is started as ``python -m benchmarks.bench_train --worker MODE ...`` (or under torchrun)
and prints one JSON line with its step times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Config, make_result, python_cmd, run_measured

NAME = "train"
TITLE = "training throughput: streamed vs in-memory, 2 Gloo processes vs 1, CUDA fp32 vs bf16"
TARGET = "streamed <= 1.10 x in-memory time per image (224 px, batch 32)"
IMAGE_SIZE = 224


def worker(mode: str, model: str, data: str, batch: int, device: str, precision: str, threads: int) -> dict:
    """Train one epoch of the folder ``data`` with ``mode`` = memory | streamed; step times on rank 0."""
    import torch

    from diki_edge.backbone import load_backbone
    from diki_edge.data import load_tensors, scan_image_folder
    from diki_edge.device import Precision
    from diki_edge.distributed import process_group
    from diki_edge.loader import FolderSource, TensorSource
    from diki_edge.model import DikiCLIP
    from diki_edge.train import TaskRun, TrainConfig, image_transform, input_size

    torch.set_num_threads(threads)
    with process_group(device) as ctx:
        local = model.startswith("local-dir:")
        backbone = load_backbone(model, None if local else "random")
        diki = DikiCLIP(backbone.model)
        folder = scan_image_folder(data)
        transform = image_transform(backbone)
        if mode == "memory":
            images, labels = load_tensors(folder, transform)
            source = TensorSource(images, labels)
        else:
            source = FolderSource(folder.samples, transform, input_size(backbone), workers=0,
                                  pin_memory=ctx.device.type == "cuda")
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=5.0)
        run = TaskRun(diki, backbone.tokenizer, source, folder.classes, cfg, ctx, Precision.of(precision, ctx.device))
        diki.to(ctx.device)
        loop, _ = run.make_loop(list(range(len(source))))
        ends: list[float] = []
        step = loop._step

        def timed_step(batch_):
            step(batch_)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            ends.append(time.perf_counter())

        loop._step = timed_step
        loop.run()
    step_s = [b - a for a, b in zip(ends, ends[1:])]  # from the end of the warm-up step on: load + compute
    return {"mode": mode, "world": ctx.world, "device": str(ctx.device), "precision": precision, "batch": batch,
            "threads": threads, "step_s": step_s, "images": len(source)}


def _one(mode: str, model: str, data: Path, batch: int, threads: int, device: str = "cpu", precision: str = "fp32",
         world: int = 1) -> dict:
    args = ["--worker", mode, "--model", model, "--data", str(data), "--batch", str(batch), "--device", device,
            "--precision", precision, "--threads", str(threads)]
    if world == 1:
        code = ("import runpy, sys; sys.argv[0] = 'bench_train'; "
                "runpy.run_module('benchmarks.bench_train', run_name='__main__')")
        cmd = python_cmd(code, *args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "benchmarks.bench_train", *args]
    proc = run_measured(cmd, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} worker failed ({proc.returncode}): {proc.stderr[-1500:]}")
    out = json.loads(lines[0])
    out["peak_rss_mib"] = round(proc.peak_rss_mib, 1) if world == 1 else None  # torchrun: the agent's, not ours
    return out


def _median_step(runs: list[dict]) -> float:
    return statistics.median(s for r in runs for s in r["step_s"])


def measure(cfg: Config) -> dict[str, Any]:
    from diki_edge.testing import write_photo_folder

    model = cfg.reference_model
    batch = 8 if cfg.tiny else 32
    steps = 3 if cfg.quick else 4
    per_class = -(-batch * (steps + 1) // 4)
    data = Path(cfg.cache_dir) / f"train-photos-{per_class}"
    if not data.is_dir():
        write_photo_folder(data, per_class, size=256, seed=0)
    threads = cfg.n_threads
    runs: dict[str, list[dict]] = {"memory": [], "streamed": []}
    for _ in range(max(1, cfg.slow_repeats)):  # interleaved: a burst of load hits both
        for mode in runs:
            runs[mode].append(_one(mode, model, data, batch, threads))
    per_image = {m: _median_step(r) / batch for m, r in runs.items()}
    ratio = per_image["streamed"] / per_image["memory"]
    rows = []
    for mode, rs in runs.items():
        rows.append({"variant": f"{mode} (1 process, {threads} threads)", "s/step": f"{_median_step(rs):.3f}",
                     "images/s": f"{1 / per_image[mode]:.1f}",
                     "peak RSS MiB": f"{max(r['peak_rss_mib'] for r in rs):.0f}",
                     "vs in-memory": f"{per_image[mode] / per_image['memory']:.3f}",
                     "met": (ratio <= 1.10) if mode == "streamed" else None, "data": rs})
    notes = [f"{model}, random weights, {IMAGE_SIZE} px, batch {batch}, {steps} timed steps per run, "
             f"{max(1, cfg.slow_repeats)} interleaved runs per variant; peak RSS of the whole training process"]
    if threads >= 2:
        dist = [_one("streamed", model, data, batch, max(1, threads // 2), world=2)]
        one = _median_step(runs["streamed"])
        two = _median_step(dist)
        rows.append({"variant": f"streamed, torchrun 2 Gloo processes x {max(1, threads // 2)} thread",
                     "s/step": f"{two:.3f}", "images/s": f"{batch / two:.1f}", "peak RSS MiB": "-",
                     "vs in-memory": f"{two / batch / per_image['memory']:.3f}", "met": None, "data": dist})
        notes.append(f"2 Gloo processes vs 1 process: {two / one:.2f} x the time per step (no target: same cores)")
    import torch

    if torch.cuda.is_available():
        for precision in ("fp32", "bf16"):
            r = _one("streamed", model, data, batch, threads, device="cuda", precision=precision)
            s = statistics.median(r["step_s"])
            rows.append({"variant": f"streamed, CUDA {precision}", "s/step": f"{s:.4f}",
                         "images/s": f"{batch / s:.1f}", "peak RSS MiB": f"{r['peak_rss_mib']:.0f}",
                         "vs in-memory": "-", "met": None, "data": [r]})
    else:
        notes.append("no CUDA device: fp32/bf16 images/s not measured (scripts/check_cuda.py also reports them)")
    cols = ["variant", "s/step", "images/s", "peak RSS MiB", "vs in-memory"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"ratio_streamed_vs_memory": ratio})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["memory", "streamed"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    out = worker(a.worker, a.model, a.data, a.batch, a.device, a.precision, a.threads)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
