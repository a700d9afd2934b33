"""Throughput on a photo library: pipelined decoding, fast JPEG decoding, low-memory sessions.

Setting: 200 JPEG photographs of 1600 x 1200 (quality 90), random crops / flips / brightness changes of eight
scikit-image photographs, and the bundled ``diki-tiny`` backbone exported with five synthetic tasks whose
Gaussians are fitted to *other* variants of those photographs (so task selection and M behave as on real
photos). All variants of one measurement run side by side, interleaved round by round:

* **serial loop**: what a user writes without the pipeline — per batch of 8, ``Predictor.pixel_values`` (decode +
  preprocess) then ``Predictor.run_arrays``, one after the other, in one thread;
* ``Predictor.predict(paths)`` with the default ``workers`` (decode pool overlapped with ONNX Runtime), and with
  ``workers=0`` (the code path before the pool existed);
* ``diki-edge predict FOLDER --json --quiet`` as a child process, start-up included;
* ``Predictor(fast_decode=True).predict(paths)``, plus its drift against the exact path on the same 200 photos:
  cosine of the final embeddings, task and top-1 agreement.

ViT-B/16 (random weights, the suite's 11-task world): ``predict`` with the default workers vs ``workers=0`` on
48 of the photos (no regression expected, beyond noise), and the peak RSS of ``diki-edge predict`` on 16 photos
with and without ``--low-memory`` (child's own VmHWM).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Config, Timing, make_result, python_cmd, ratio, run_measured, time_side_by_side
from benchmarks.world import get_world

NAME = "throughput"
TITLE = "photo-library throughput: decode pool and fast JPEG decoding (diki-tiny)"
TARGET = ("predict(paths) >= 1.5x the serial loop and diki-edge predict (start-up included) >= 1.0x on 200 "
          "1600x1200 JPEGs; report fast-decode speed and drift")
NAME_VIT = "throughput_vit"
TITLE_VIT = "decode pool on ViT-B/16, and low-memory sessions"
TARGET_VIT = "ViT-B/16 predict with the pool >= 0.95x workers=0 (no regression); report low-memory peak RSS"
COLUMNS = ["model", "what", "time", "vs serial"]

PHOTOS = {  # task -> (scikit-image photographs, classes)
    "pets": (["chelsea", "cat"], ["cat", "dog", "fox"]),
    "drinks": (["coffee"], ["coffee", "tea", "juice"]),
    "space": (["rocket", "hubble_deep_field"], ["rocket", "galaxy", "plane"]),
    "portraits": (["astronaut"], ["astronaut", "pilot", "diver"]),
    "science": (["immunohistochemistry", "retina"], ["tissue", "retina", "cells"]),
}
PHOTO_SIZE = (1600, 1200)
N_PHOTOS = 200
BATCH = 8
VIT_PHOTOS = 48
RSS_PHOTOS = 16


def _variant(base, rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image

    w, h = base.size
    s = rng.uniform(0.6, 1.0)
    cw, ch = int(w * s), int(h * s)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = base.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.clip(np.asarray(im, np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)


def _base_photos():
    import skimage.data as sd
    from PIL import Image

    return {name: Image.fromarray(getattr(sd, name)()).convert("RGB")
            for photos, _ in PHOTOS.values() for name in photos}


def photo_folder(cache: Path, n: int = N_PHOTOS) -> list[Path]:
    """The first ``n`` of the 200 JPEGs, in a folder of their own (written once, cached)."""
    folder = cache / f"photos-{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}-{n}"
    files = [folder / f"photo{i:03d}.jpg" for i in range(n)]
    if all(f.is_file() for f in files):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    bases = _base_photos()
    names = sorted(bases)
    for i, f in enumerate(files):
        tmp = f.with_suffix(".tmp")
        rng = np.random.default_rng(13_000 + i)
        _variant(bases[names[i % len(names)]], rng, PHOTO_SIZE).save(tmp, format="JPEG", quality=90)
        tmp.replace(f)
    return files


def bundled_model(cache: Path) -> Path:
    """diki-tiny exported with the five photo tasks (built once, cached)."""
    out = cache / "diki-tiny-photos" / "model"
    if (out / "manifest.json").is_file():
        return out
    import torch

    from diki_edge.backbone import load_backbone
    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge.synthetic import synthetic_task
    from diki_edge.train import image_transform
    from diki_edge_export import export_model
    from diki_edge_runtime.bank import TaskBank

    backbone = load_backbone()
    diki = DikiCLIP(backbone.model)
    layout = layout_for(backbone, diki)
    transform = image_transform(backbone)
    bases = _base_photos()
    rng = np.random.default_rng(99)  # other variants than the measured photos
    bank = TaskBank.empty(layout)
    for seed, (task, (photos, classes)) in enumerate(PHOTOS.items()):
        fit = torch.stack([transform(_variant(bases[p], rng, (640, 480))) for p in photos for _ in range(24)])
        bank = bank.with_task(synthetic_task(diki, backbone.tokenizer, task, classes, fit,
                                             layout.calibration_levels, seed=seed, value_scale=0.1))
    bank_path = bank.save(out.parent / "bank.safetensors")
    export_model(bank_path, out, backbone=backbone, quiet=True, force=True)
    return out


def serial_loop(predictor, files: list[Path]) -> list[np.ndarray]:
    """The loop a user writes without the pipeline: decode a batch, run it, repeat."""
    out = []
    for i in range(0, len(files), BATCH):
        pixels = predictor.pixel_values([str(f) for f in files[i:i + BATCH]])
        out.append(predictor.run_arrays(pixels)["image_embeds"])
    return out


def cli_command(model_dir: Path, inputs: list[str], *extra: str) -> list[str]:
    from benchmarks.bench_cold_start import runtime_command

    code, lead, _ = runtime_command()
    return python_cmd(code, *lead, *inputs, "--model", str(model_dir), "--json", "--quiet", *extra)


def drift(exact: list, fast: list) -> dict[str, Any]:
    cos = np.array([float(a.image_embeds @ b.image_embeds) for a, b in zip(exact, fast)])
    return {"n": len(exact), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "cosine_p01": float(np.percentile(cos, 1)),
            "task_agreement": float(np.mean([a.task == b.task for a, b in zip(exact, fast)])),
            "top1_agreement": float(np.mean([a.label == b.label for a, b in zip(exact, fast)])),
            "weight_max_abs_diff": float(max(abs(a.weight - b.weight) for a, b in zip(exact, fast)))}


def _x(r: dict[str, float]) -> str:
    return f"{r['of_medians']:.2f}x (rounds {r['round_min']:.2f}–{r['round_max']:.2f})"


def measure(cfg: Config) -> dict[str, Any]:
    from diki_edge_runtime import Predictor
    from diki_edge_runtime.pipeline import default_workers

    cache = cfg.cache_dir / "throughput"
    n = 8 if cfg.tiny else 48 if cfg.quick else N_PHOTOS
    files = photo_folder(cache, n)
    # --tiny (the harness's smoke test): the tiny random backbone's world instead of diki-tiny
    model_dir = get_world(cfg, cfg.reference_model).exported("fp32") if cfg.tiny else bundled_model(cache)
    backbone = "tiny test backbone" if cfg.tiny else "diki-tiny"
    threads = cfg.n_threads
    workers = default_workers()
    pooled = Predictor(model_dir, threads=threads)
    unpooled = Predictor(model_dir, threads=threads, workers=0)
    fast = Predictor(model_dir, threads=threads, fast_decode=True)
    paths = [str(f) for f in files]
    folder = files[0].parent
    cli_runs = []

    def cli():
        r = run_measured(cli_command(model_dir, [str(folder)], "--threads", str(threads)))
        if r.returncode != 0:
            raise RuntimeError(f"diki-edge predict failed ({r.returncode}): {r.stderr[-2000:]}")
        cli_runs.append(r)

    repeats = 1 if cfg.tiny else max(3, cfg.slow_repeats)
    t = time_side_by_side({
        "serial": lambda: serial_loop(unpooled, files),
        "predict": lambda: pooled.predict(paths, batch_size=BATCH),
        "predict_workers0": lambda: unpooled.predict(paths, batch_size=BATCH),
        "cli": cli,
        "fast": lambda: fast.predict(paths, batch_size=BATCH),
    }, warmup=1, repeats=repeats)
    exact_res, fast_res = pooled.predict(paths, batch_size=BATCH), fast.predict(paths, batch_size=BATCH)
    d = drift(exact_res, fast_res)
    lines = [json.loads(x) for x in cli_runs[-1].stdout.splitlines()]
    cli_same = [x["task"] for x in lines] == [r.task for r in exact_res]
    r_predict = ratio(t["serial"], t["predict"])
    r_cli = ratio(t["serial"], t["cli"])
    r_w0 = ratio(t["serial"], t["predict_workers0"])
    r_fast = ratio(t["predict"], t["fast"])
    mode = "--tiny" if cfg.tiny else "--quick"
    quick_note = "" if n == N_PHOTOS else f" ({mode}: the target is stated for {N_PHOTOS})"
    rows = [
        {"model": backbone, "what": "serial loop (pixel_values, run_arrays per batch of 8)",
         "time": t["serial"].fmt(1, "s"), "vs serial": "1.00x", "met": None,
         "data": {"timing": t["serial"].to_json()}},
        {"model": backbone, "what": f"Predictor.predict(paths), workers={workers} (default)",
         "time": t["predict"].fmt(1, "s"), "vs serial": _x(r_predict), "met": r_predict["of_medians"] >= 1.5,
         "data": {"timing": t["predict"].to_json(), "ratio": r_predict}},
        {"model": backbone, "what": "Predictor.predict(paths), workers=0 (before the pool)",
         "time": t["predict_workers0"].fmt(1, "s"), "vs serial": _x(r_w0), "met": None,
         "data": {"timing": t["predict_workers0"].to_json(), "ratio": r_w0}},
        {"model": backbone, "what": "diki-edge predict FOLDER --json (child process, start-up included)",
         "time": t["cli"].fmt(1, "s"), "vs serial": _x(r_cli), "met": r_cli["of_medians"] >= 1.0 and cli_same,
         "data": {"timing": t["cli"].to_json(), "ratio": r_cli, "same_tasks_as_predict": cli_same,
                  "peak_rss_mib": [r.peak_rss_mib for r in cli_runs]}},
        {"model": backbone, "what": f"predict(paths), fast_decode=True (speed-up vs exact predict: "
                                      f"{r_fast['of_medians']:.2f}x)",
         "time": t["fast"].fmt(1, "s"), "vs serial": _x(ratio(t["serial"], t["fast"])), "met": None,
         "data": {"timing": t["fast"].to_json(), "speedup_vs_exact": r_fast, "drift": d}},
        {"model": backbone, "what": "fast_decode drift vs exact on the same photos",
         "time": "", "vs serial": (f"cosine min {d['cosine_min']:.5f} / mean {d['cosine_mean']:.5f}; task "
                                   f"{d['task_agreement']:.1%}, top-1 {d['top1_agreement']:.1%} agree; "
                                   f"max |dM| {d['weight_max_abs_diff']:.2e}"),
         "met": None, "data": d},
    ]
    notes = [f"{n} JPEGs {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}{quick_note}; {repeats} interleaved rounds after one "
             f"warm-up; ONNX Runtime {threads} threads, {workers} decode workers (default); batch {BATCH}",
             f"load average at the end of the diki-tiny rounds: {_loadavg()} (other sessions share the machine)"]
    return make_result(NAME, TITLE, TARGET, COLUMNS, rows, notes, extra={"workers_default": workers, "photos": n})


def measure_vit(cfg: Config) -> dict[str, Any]:
    """ViT-B/16 (the ``throughput_vit`` measurement): no regression from the pool; peak RSS default vs
    low-memory. In --tiny mode the tiny world stands in for ViT-B/16."""
    from diki_edge_runtime import Predictor

    model = cfg.reference_model if cfg.tiny else "ViT-B-16"
    w = get_world(cfg, model)
    files = photo_folder(cfg.cache_dir / "throughput", 8 if cfg.tiny else VIT_PHOTOS)
    notes: list[str] = []
    model_dir = w.exported("fp32")
    threads = cfg.n_threads
    some = [str(f) for f in files[:(8 if cfg.tiny else 16 if cfg.quick else VIT_PHOTOS)]]
    pooled = Predictor(model_dir, threads=threads)
    unpooled = Predictor(model_dir, threads=threads, workers=0)
    repeats = 1 if cfg.tiny else max(3, cfg.slow_repeats)
    t = time_side_by_side({"pool": lambda: pooled.predict(some, batch_size=BATCH),
                           "workers0": lambda: unpooled.predict(some, batch_size=BATCH)}, warmup=1, repeats=repeats)
    pooled = unpooled = None  # both sessions released before the next measurement
    r = ratio(t["workers0"], t["pool"])
    label = "tiny test backbone" if cfg.tiny else "ViT-B/16"
    rows = [{"model": label, "what": f"predict({len(some)} photos), default workers vs workers=0",
             "time": f"{t['pool'].fmt(1, 's')} vs {t['workers0'].fmt(1, 's')}", "vs serial": _x(r),
             "met": r["of_medians"] >= 0.95, "data": {"pool": t["pool"].to_json(), "workers0": t["workers0"].to_json(),
                                                      "ratio": r}}]
    rss: dict[str, list[float]] = {"default": [], "low_memory": []}
    wall: dict[str, list[float]] = {"default": [], "low_memory": []}
    inputs = some[:RSS_PHOTOS]
    for i in range(1 if cfg.tiny else 2 if cfg.quick else 3):
        order = ("default", "low_memory") if i % 2 == 0 else ("low_memory", "default")
        for mode in order:
            extra = ["--threads", str(threads)] + (["--low-memory"] if mode == "low_memory" else [])
            run = run_measured(cli_command(model_dir, inputs, *extra))
            if run.returncode != 0:
                raise RuntimeError(f"diki-edge predict {mode} failed: {run.stderr[-2000:]}")
            rss[mode].append(run.peak_rss_mib)
            wall[mode].append(run.total_s)
    med = {k: float(np.median(v)) for k, v in rss.items()}
    tm = {k: Timing(v) for k, v in wall.items()}
    rows.append({"model": label, "what": f"peak RSS, diki-edge predict ({len(inputs)} photos): default vs "
                                              "--low-memory",
                 "time": f"{tm['default'].fmt(1, 's')} vs {tm['low_memory'].fmt(1, 's')}",
                 "vs serial": f"{med['default']:.0f} vs {med['low_memory']:.0f} MiB "
                              f"({med['low_memory'] - med['default']:+.0f} MiB with --low-memory)",
                 "met": None, "data": {"peak_rss_mib": rss, "wall": {k: v.to_json() for k, v in tm.items()}}})
    notes.append(f"{label}: random weights, the suite's 11-task world; {repeats} interleaved rounds; RSS = the "
                 f"child's own VmHWM, {len(rss['default'])} runs per mode, interleaved; load average now {_loadavg()}")
    return make_result(NAME_VIT, TITLE_VIT, TARGET_VIT, COLUMNS, rows, notes, extra={"model": model})


def _loadavg() -> str:
    try:
        import os

        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    t0 = time.perf_counter()
    render(run())
    print(f"{time.perf_counter() - t0:.0f} s")
