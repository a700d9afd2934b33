"""The GPU check: one script for a machine with an NVIDIA GPU and ``onnxruntime-gpu`` (CI has neither).

    python scripts/check_cuda.py [--out benchmarks/results] [--parts parity,latency,...] [--repeats 20]
    python scripts/check_cuda.py --dry-run      # on a machine without a GPU: the CPU halves only, to test the script

Builds (once, cached like the benchmarks, under ``--cache``) the bundled ``diki-tiny`` backbone exported with five
tasks fitted to scikit-image photographs, and 200 JPEG photos of 1600 x 1200 (benchmarks/bench_throughput.py),
then runs the parts below. Each part is a function ``part_NAME(ctx) -> {"checks": {name: bool | None},
"figures": {...}}`` registered in :data:`PARTS`; a part that raises is recorded as failed and the others still
run. ``None`` as a check means "not run here" (a dry run, or TensorRT absent).

* ``env``: the ONNX Runtime build and its providers, the GPU (nvidia-smi), torch's view of CUDA;
* ``parity``: CPU vs CUDA on the image graph (same tasks and top-1, embeddings and M within 1e-4) and, when the
  model folder has a text graph (``Predictor.has_text``), on the text graph (text embeddings within 1e-4);
* ``io_binding``: the bank is uploaded to the device once per bank (``Session.bank_uploads``), not per call, and
  once more after ``load_bank``, whose predictions again match the CPU;
* ``fp16``: the fp16 export is validated on CUDA (manifest ``validated_providers``) and agrees with fp32 on the
  photos (tasks, cosine >= 0.999);
* ``latency``: graph latency at batch 1 / 8 / 32 for fp32 and fp16 on CUDA (CPU fp32 beside it), and the 200
  photos through ``predict(paths)`` with the default decode workers vs ``workers=0``;
* ``tensorrt``: when the build offers TensorRT: ``provider="tensorrt,cuda"`` with an engine cache, parity with the
  CPU and latency at batch 1 / 8;
* ``training``: ``diki-edge train`` of a real DCIL task (textures, bundled backbone, 3 epochs, batch 32, 2 loader
  workers) on the CPU (fp32), on CUDA in fp32 and in bf16. Bounds, relative to the largest entry of the CPU
  run's arrays (:data:`TRAIN_BOUNDS`): statistics CUDA fp32 vs CPU 1e-5 (other fp32 kernels; TF32 is off for
  them), CUDA bf16 vs CUDA fp32 1e-12 (the statistics never see the training precision); adapters CUDA fp32 vs
  CPU 1e-3 (float32 reduction order through 3 epochs of SGD), bf16 vs CPU 0.1 (8-bit mantissa); class text
  tables (always fp32) 1e-3 / 0.05; held-out top-1 of the three banks within 5 points; images/s in fp32 and
  bf16. A dry run trains on the CPU twice (bit-identical) and leaves bf16 out.

Writes ``<out>/gpu_check.json`` (``gpu_check_dry_run.json`` for a dry run) and prints one line per check. Exit
codes: 0 every check passed, 1 a check failed, 2 no usable CUDA provider (nothing long is started then; use
``--dry-run`` to exercise the script without a GPU). Budget: under 10 minutes on a GPU machine (the export and
the fp16 export take most of it; the TensorRT engine build is cached in the temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmark helpers (photos, model) live in the repository's benchmarks/
    sys.path.insert(0, str(REPO))

EMBED_TOLERANCE = 1e-4
FP16_MIN_COSINE = 0.999
BATCHES = (1, 8, 32)
PARITY_PHOTOS = 32


@dataclass
class Context:
    """What the parts share: arguments, the model folders, the photos, one predictor per (provider, precision)."""

    args: argparse.Namespace
    tmp: Path
    notes: list[str] = field(default_factory=list)
    _predictors: dict = field(default_factory=dict)

    @property
    def dry_run(self) -> bool:
        return bool(self.args.dry_run)

    @property
    def gpu(self) -> str:
        """The provider of the GPU side: cuda, or (dry run) cpu through the same IO-binding code path."""
        return "cpu" if self.dry_run else "cuda"

    @cached_property
    def cache(self) -> Path:
        return Path(self.args.cache) / "throughput"

    @cached_property
    def photos(self) -> list[Path]:
        from benchmarks.bench_throughput import photo_folder

        return photo_folder(self.cache, self.args.photos)

    @cached_property
    def model_fp32(self) -> Path:
        from benchmarks.bench_throughput import bundled_model

        return bundled_model(self.cache)

    @cached_property
    def model_fp16(self) -> Path:
        from diki_edge_export import export_model

        out = self.tmp / "fp16"
        export_model(self.model_fp32 / "bank.safetensors", out, precision="fp16", quiet=True, force=True)
        return out

    def new_predictor(self, side: str, precision: str = "fp32", **kw):
        """``side``: "cpu" (the reference) or "gpu" (CUDA; in a dry run the CPU through the IO-binding path)."""
        from diki_edge_runtime import Predictor

        folder = self.model_fp32 if precision == "fp32" else self.model_fp16
        if side == "cpu":
            return Predictor(folder, provider="cpu", **kw)
        return Predictor(folder, provider=self.gpu, **({"io_binding": True} if self.dry_run else {}), **kw)

    def predictor(self, side: str, precision: str = "fp32"):
        """One shared predictor per (side, precision)."""
        if (side, precision) not in self._predictors:
            self._predictors[side, precision] = self.new_predictor(side, precision)
        return self._predictors[side, precision]


# ------------------------------------------------------------------------------------------------------- parts
def part_env(ctx: Context) -> dict[str, Any]:
    import onnxruntime as ort

    from diki_edge_runtime.providers import describe_build

    figures: dict[str, Any] = {"onnxruntime": describe_build(ort), "available": ort.get_available_providers()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        figures["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        figures["nvidia_smi"] = f"not available ({exc})"
    try:
        import torch

        figures["torch_cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
    except Exception as exc:  # torch is optional for the runtime side
        figures["torch_cuda"] = f"unknown ({type(exc).__name__})"
    cuda = "CUDAExecutionProvider" in figures["available"]
    return {"checks": {"cuda_provider_offered": None if ctx.dry_run else cuda}, "figures": figures}


def _compare(a: list, b: list) -> dict[str, Any]:
    return {"same_tasks": all(x.task == y.task for x, y in zip(a, b)),
            "same_top1": all(x.label == y.label for x, y in zip(a, b)),
            "embeds_max_abs_diff": max(float(np.abs(x.image_embeds - y.image_embeds).max()) for x, y in zip(a, b)),
            "weight_max_abs_diff": max(abs(x.weight - y.weight) for x, y in zip(a, b))}


def part_parity(ctx: Context) -> dict[str, Any]:
    paths = [str(p) for p in ctx.photos[:PARITY_PHOTOS]]
    cpu, gpu = ctx.predictor("cpu"), ctx.predictor("gpu")
    figures = _compare(cpu.predict(paths, batch_size=16), gpu.predict(paths, batch_size=16))
    figures["gpu_providers"] = gpu.providers
    checks = {"image_same_tasks": figures["same_tasks"], "image_same_top1": figures["same_top1"],
              f"image_embeds_within_{EMBED_TOLERANCE:g}": figures["embeds_max_abs_diff"] <= EMBED_TOLERANCE,
              f"image_weight_within_{EMBED_TOLERANCE:g}": figures["weight_max_abs_diff"] <= EMBED_TOLERANCE,
              "ran_on_cuda": None if ctx.dry_run else gpu.providers[0] == "CUDAExecutionProvider"}
    if getattr(cpu, "has_text", False):  # the text graph (open-vocabulary issue), when the folder has one
        texts = [f"a photo of a {c}." for c in cpu.classes] + ["a photo of something else."]
        diffs = [float(np.abs(cpu.encode_text(texts, task=t, weight=w) - gpu.encode_text(texts, task=t, weight=w)
                              ).max()) for t, w in ((None, 0.0), (0, 1.0), (len(cpu.tasks) - 1, 0.5))]
        figures["text_embeds_max_abs_diff"] = max(diffs)
        checks[f"text_embeds_within_{EMBED_TOLERANCE:g}"] = max(diffs) <= EMBED_TOLERANCE
    else:
        figures["text_graph"] = "absent from this model folder / runtime: not checked"
    return {"checks": checks, "figures": figures}


def part_io_binding(ctx: Context) -> dict[str, Any]:
    from diki_edge_runtime import Predictor
    from diki_edge_runtime.bank import TaskBank

    paths = [str(p) for p in ctx.photos[:16]]
    gpu = ctx.new_predictor("gpu")  # a fresh one: its upload counter starts at 1
    for _ in range(5):
        gpu.predict(paths, batch_size=4)
    after_calls = gpu.session.bank_uploads
    bank = TaskBank.load(ctx.model_fp32 / "bank.safetensors")
    smaller = bank.select([0, 2])
    gpu.load_bank(smaller)
    swapped = gpu.predict(paths, batch_size=4)
    gpu.predict(paths, batch_size=4)
    cpu_small = Predictor(ctx.model_fp32, provider="cpu", bank=smaller)
    figures = {"uploads_after_5x4_calls": after_calls, "uploads_after_swap_and_2x4_calls": gpu.session.bank_uploads,
               "bank_on_device": gpu.session.bank_device, "after_swap": _compare(cpu_small.predict(paths), swapped)}
    return {"checks": {"bank_uploaded_once": after_calls == 1,
                       "bank_uploaded_once_more_after_swap": gpu.session.bank_uploads == 2,
                       "bank_lives_on_the_gpu": None if ctx.dry_run else gpu.session.bank_device == "cuda",
                       "swap_matches_cpu": figures["after_swap"]["same_tasks"] and figures["after_swap"]["same_top1"]
                       and figures["after_swap"]["embeds_max_abs_diff"] <= EMBED_TOLERANCE},
            "figures": figures}


def part_fp16(ctx: Context) -> dict[str, Any]:
    from diki_edge_runtime.contract import Manifest

    manifest = Manifest.load(ctx.model_fp16)
    paths = [str(p) for p in ctx.photos[:PARITY_PHOTOS]]
    ref = ctx.predictor("cpu").predict(paths, batch_size=16)
    half = ctx.predictor("gpu", "fp16").predict(paths, batch_size=16)
    cos = [float(a.image_embeds @ b.image_embeds) for a, b in zip(ref, half)]
    figures = {"validated_providers": manifest.validated_providers, "min_cosine_vs_fp32_cpu": min(cos),
               "same_tasks": all(a.task == b.task for a, b in zip(ref, half)),
               "top1_agreement": float(np.mean([a.label == b.label for a, b in zip(ref, half)]))}
    validated = "CUDAExecutionProvider" in manifest.validated_providers
    return {"checks": {"fp16_validated_on_cuda": None if ctx.dry_run else validated,
                       f"fp16_cosine_at_least_{FP16_MIN_COSINE}": min(cos) >= FP16_MIN_COSINE,
                       "fp16_same_tasks": figures["same_tasks"]},
            "figures": figures}


def _time(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "n": repeats}


def part_latency(ctx: Context) -> dict[str, Any]:
    pixels = ctx.predictor("cpu").pixel_values([str(p) for p in ctx.photos[:max(BATCHES)]])
    figures: dict[str, Any] = {}
    for side, precision in (("gpu", "fp32"), ("gpu", "fp16"), ("cpu", "fp32")):
        pred = ctx.predictor(side, precision)
        for b in BATCHES if side == "gpu" else BATCHES[:2]:
            figures[f"{side}_{precision}_b{b}"] = _time(lambda: pred.run_arrays(pixels[:b]), ctx.args.repeats)
    paths = [str(p) for p in ctx.photos]
    for workers in (None, 0):
        pred = ctx.new_predictor("gpu", workers=workers)
        t0 = time.perf_counter()
        pred.predict(paths, batch_size=32)
        figures[f"predict_{len(paths)}_photos_workers_{pred.workers}_s"] = time.perf_counter() - t0
    return {"checks": {}, "figures": figures}


def part_tensorrt(ctx: Context) -> dict[str, Any]:
    import onnxruntime as ort

    from diki_edge_runtime import Predictor

    if "TensorrtExecutionProvider" not in ort.get_available_providers() or ctx.dry_run:
        return {"checks": {"tensorrt": None}, "figures": {"tensorrt": "not offered by this build (or a dry run)"}}
    cache = ctx.tmp / "trt-engines"
    options = {"tensorrt": {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}}
    t0 = time.perf_counter()
    trt = Predictor(ctx.model_fp32, provider="tensorrt,cuda", provider_options=options)
    paths = [str(p) for p in ctx.photos[:PARITY_PHOTOS]]
    got = trt.predict(paths, batch_size=8)
    figures: dict[str, Any] = {"providers": trt.providers, "notes": trt.session.provider_notes,
                               "first_predict_with_engine_build_s": time.perf_counter() - t0,
                               **_compare(ctx.predictor("cpu").predict(paths, batch_size=8), got)}
    pixels = ctx.predictor("cpu").pixel_values(paths[:8])
    for b in (1, 8):
        figures[f"b{b}"] = _time(lambda: trt.run_arrays(pixels[:b]), ctx.args.repeats)
    return {"checks": {"tensorrt_started": trt.session.primary == "TensorrtExecutionProvider",
                       "tensorrt_same_tasks_and_top1": figures["same_tasks"] and figures["same_top1"]},
            "figures": figures}


TRAIN_BOUNDS = {  # relative to the largest entry of the reference (the CPU run); see the module docstring
    "stats_fp32_vs_cpu": 1e-5,
    "stats_bf16_vs_fp32": 1e-12,
    "adapter_fp32_vs_cpu": 1e-3,
    "adapter_bf16_vs_cpu": 0.1,
    "table_fp32_vs_cpu": 1e-3,
    "table_bf16_vs_cpu": 0.05,
    "top1_points": 5.0,
}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


def part_training(ctx: Context) -> dict[str, Any]:
    import torch

    from diki_edge.backbone import load_backbone
    from diki_edge.calibrated import CalibratedDiki, bank_tensors
    from diki_edge.datasets import make_task, write_image_folder
    from diki_edge.model import DikiCLIP
    from diki_edge.train import RunOptions, TrainConfig, image_transform, train_into_bank

    device = "cpu" if ctx.dry_run else "cuda"
    task = make_task("textures")
    data = write_image_folder(task, ctx.tmp / "train-data")
    cfg = TrainConfig(epochs=3, batch_size=32)
    runs = {"cpu": ("cpu", "fp32"), "fp32": (device, "fp32")}
    if not ctx.dry_run:
        runs["bf16"] = (device, "bf16")
    banks, speed = {}, {}
    for name, (dev, precision) in runs.items():
        t0 = time.perf_counter()
        bank, report = train_into_bank(ctx.tmp / f"train-{name}.safetensors", data, "textures", cfg=cfg, quiet=True,
                                       options=RunOptions(device=dev, precision=precision, workers=2))
        seconds = time.perf_counter() - t0
        banks[name] = bank
        speed[name] = {"device": report.device, "seconds": round(seconds, 2),
                       "images_per_s": round(report.samples * cfg.epochs / seconds, 1)}
    backbone = load_backbone()
    transform = image_transform(backbone)
    x = torch.stack([transform(im) for im, _ in task.test])
    y = torch.tensor([label for _, label in task.test])
    model = CalibratedDiki(DikiCLIP(backbone.model)).eval()
    top1 = {}
    for name, bank in banks.items():
        with torch.no_grad():
            top1[name] = 100.0 * float((model(x, **bank_tensors(bank)).logits.argmax(1) == y).float().mean())
    diffs: dict[str, float] = {}
    ref = banks["cpu"].arrays
    for name in [n for n in banks if n != "cpu"]:
        arr = banks[name].arrays
        diffs[f"stats_{name}_vs_cpu"] = max(_relative(ref[k], arr[k]) for k in ("stats_sum", "stats_outer"))
        diffs[f"adapter_{name}_vs_cpu"] = max(_relative(ref[k], arr[k])
                                              for k in ("bank_k", "bank_v", "text_k", "text_v"))
        diffs[f"table_{name}_vs_cpu"] = _relative(ref["class_embeds"], arr["class_embeds"])
    if "bf16" in banks:
        diffs["stats_bf16_vs_fp32"] = max(_relative(banks["fp32"].arrays[k], banks["bf16"].arrays[k])
                                          for k in ("stats_sum", "stats_outer"))
    checks: dict[str, bool | None] = {f"{k}_within_{TRAIN_BOUNDS[k]:g}": v <= TRAIN_BOUNDS[k]
                                      for k, v in diffs.items() if k in TRAIN_BOUNDS}
    checks["bf16_ran"] = None if ctx.dry_run else "bf16" in banks
    checks[f"top1_within_{TRAIN_BOUNDS['top1_points']:g}_points"] = (
        max(top1.values()) - min(top1.values()) <= TRAIN_BOUNDS["top1_points"])
    checks["trained_on_cuda"] = None if ctx.dry_run else all(speed[n]["device"].startswith("cuda")
                                                             for n in runs if n != "cpu")
    return {"checks": checks, "figures": {"runs": speed, "top1": top1, "differences": diffs,
                                          "bounds": TRAIN_BOUNDS}}


# name -> part, in the order of the run.
PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "env": part_env,
    "parity": part_parity,
    "io_binding": part_io_binding,
    "fp16": part_fp16,
    "latency": part_latency,
    "tensorrt": part_tensorrt,
    "training": part_training,
}


# ------------------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python scripts/check_cuda.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the JSON result")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "DIKI_BENCH_CACHE", Path.home() / ".cache" / "diki-edge" / "benchmarks")), help="benchmark cache folder")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats per latency figure")
    ap.add_argument("--photos", type=int, default=200, help="photos for the predict(paths) figure (<= 200)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run the CPU halves to test the script")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    if not 1 <= args.repeats <= 1000 or not 32 <= args.photos <= 200:
        ap.error("--repeats must be 1..1000 and --photos 32..200")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diki_edge_runtime.session import provider_unavailable_reason

    if not args.dry_run:
        reason = provider_unavailable_reason("cuda")
        if reason:
            print(f"error: no usable CUDA execution provider here: {reason}\n"
                  "This check needs a GPU machine with onnxruntime-gpu; `--dry-run` exercises the script on the CPU.",
                  file=sys.stderr)
            return 2
    results: dict[str, Any] = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "command": " ".join(["python scripts/check_cuda.py"] + (argv or sys.argv[1:])),
                               "parts": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diki-gpu-check-") as tmp:
        ctx = Context(args, Path(tmp))
        for name in args.parts:
            t0 = time.perf_counter()
            try:
                part = PARTS[name](ctx)
            except Exception as exc:  # one broken part must not lose the others
                part = {"checks": {"completed": False}, "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()}
            part["seconds"] = round(time.perf_counter() - t0, 1)
            results["parts"][name] = part
            for check, ok in part["checks"].items():
                print(f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {name}.{check}", flush=True)
            if "error" in part:
                print(f"      {part['error']}", flush=True)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    failed = [f"{n}.{c}" for n, p in results["parts"].items() for c, ok in p["checks"].items() if ok is False]
    results["ok"] = not failed
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for name, part in results["parts"].items():
        for key, value in part.get("figures", {}).items():
            if isinstance(value, dict) and "median_ms" in value:
                print(f"{name}.{key}: median {value['median_ms']:.2f} ms (min {value['min_ms']:.2f}, "
                      f"max {value['max_ms']:.2f})")
    print(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {results['seconds']} s "
          f"-> {path}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
