"""Labels at prediction time: cost of a cached label set, of the first call, ``encode_text``
throughput, label-table memory.

* cached label set vs image-only ``Predictor.predict`` (same images, same predictor, interleaved; b1 and b8):
  target <= 5 % more;
* the first call for ``C = 100`` labels on one selected task (tables dropped by ``load_bank`` before each round):
  text-encoder prompt passes (target <= 3C) and the time on top of an image-only call, side by side with the same
  call at the full context length (what the runtime ran before it trimmed each batch of prompts to its longest
  end-of-text position): target >= 3x faster;
* ``Predictor.encode_text`` (tokenizer + ONNX text graph) vs open_clip's PyTorch text encoder (tokenizer +
  ``encode_text`` + normalise), the same 100 prompts, the same threads: prompts/s, target >= 3x;
* the label-table cache: bytes per 1,000 labels (measured at ``C = 100`` for one task's two levels; the tables are
  linear in the label count), and the ``label_cache_bytes`` bound holding over several label sets.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Config, make_result, ratio, time_side_by_side
from benchmarks.world import get_world

NAME = "labels"
TITLE = "labels at prediction time: cached label set, first call, encode_text, label-table memory"
TARGET = ("cached <= 5 % over image-only (b1, b8); first call <= 3C prompt passes and >= 3x faster than at the full "
          "context length; encode_text >= 3x PyTorch")
MAX_CACHED_OVERHEAD = 1.05
MIN_TEXT_SPEEDUP = 3.0
MIN_TRIM_SPEEDUP = 3.0
LABELS = 100


def measure(cfg: Config) -> dict[str, Any]:
    import time

    import torch
    import torch.nn.functional as F

    from diki_edge_runtime import Predictor

    model = cfg.reference_model
    w = get_world(cfg, model)
    folder = w.exported("fp32")
    predictor = Predictor(folder, provider=cfg.provider, threads=cfg.n_threads)
    labels = [f"object number {i}" for i in range(LABELS)]
    rows, notes = [], []

    # ---- cached label set vs image-only
    for b in cfg.batches:
        images = w.familiar[:b]
        predictor.predict(images, batch_size=b, labels=labels)  # builds the tables these images need
        t = time_side_by_side({"image-only": lambda: predictor.predict(images, batch_size=b),
                               "labels": lambda: predictor.predict(images, batch_size=b, labels=labels)},
                              cfg.warmup, cfg.repeats)
        r = ratio(t["labels"], t["image-only"])
        rows.append({"part": "cached label set", "case": f"b{b}, {LABELS} labels", "runtime": t["labels"].fmt(),
                     "baseline": f"image-only {t['image-only'].fmt()}", "result": f"{r['of_medians']:.3f}x",
                     "met": r["of_medians"] <= MAX_CACHED_OVERHEAD,
                     "data": {"labels": t["labels"].to_json(), "image_only": t["image-only"].to_json(), "ratio": r}})

    # ---- the first call for C labels on one selected task
    encoder = predictor.text_encoder()
    image = w.familiar[:1]
    passes, firsts, full_length, bytes_per_set = [], [], [], 0
    trims = encoder.dynamic_length
    for _ in range(max(1, cfg.slow_repeats)):
        for trimmed in (True, False):  # side by side: the same first call at the full context length
            encoder.dynamic_length = trims and trimmed  # the switch the encoder reads per batch of prompts
            predictor.load_bank(w.bank_path)  # drops the label tables
            before = encoder.prompts_encoded
            t0 = time.perf_counter()
            res = predictor.predict(image, labels=labels)[0]
            (firsts if trimmed else full_length).append(time.perf_counter() - t0)
            if trimmed:
                passes.append(encoder.prompts_encoded - before)
                bytes_per_set = predictor.label_tables.nbytes
    encoder.dynamic_length = trims
    t0 = time.perf_counter()
    predictor.predict(image)
    image_only = time.perf_counter() - t0
    first, full = sorted(firsts)[len(firsts) // 2], sorted(full_length)[len(full_length) // 2]
    rows.append({"part": "first call", "case": f"1 image (task {res.task}, M {res.weight:.3f}), C = {LABELS}",
                 "runtime": f"{first * 1e3:.0f} ms", "baseline": f"image-only {image_only * 1e3:.0f} ms",
                 "result": f"{max(passes)} prompt passes (3C = {3 * LABELS})", "met": max(passes) <= 3 * LABELS,
                 "data": {"seconds": firsts, "image_only_seconds": image_only, "passes": passes}})
    rows.append({"part": "first call", "case": "trimmed prompts vs the full context length",
                 "runtime": f"{first * 1e3:.0f} ms", "baseline": f"full length {full * 1e3:.0f} ms",
                 "result": f"{full / first:.2f}x faster" if trims else "text graph of fixed length: not trimmed",
                 "met": (full / first >= MIN_TRIM_SPEEDUP) if trims else None,
                 "data": {"trimmed_seconds": firsts, "full_length_seconds": full_length, "dynamic_length": trims}})

    # ---- encode_text vs open_clip's PyTorch text encoder
    prompts = [f"a photo of a {label}." for label in labels]
    clip, tokenizer = w.backbone.model, w.backbone.tokenizer
    torch.set_num_threads(cfg.n_threads)

    def torch_encode():
        with torch.inference_mode():
            return F.normalize(clip.encode_text(tokenizer(prompts)), dim=-1)

    t = time_side_by_side({"runtime": lambda: predictor.encode_text(prompts), "pytorch": torch_encode},
                          cfg.warmup, cfg.slow_repeats if not cfg.tiny else cfg.repeats)
    r = ratio(t["pytorch"], t["runtime"])
    rows.append({"part": "encode_text", "case": f"{LABELS} prompts, {cfg.n_threads} threads",
                 "runtime": f"{LABELS / t['runtime'].median:.0f} prompts/s",
                 "baseline": f"open_clip PyTorch {LABELS / t['pytorch'].median:.0f} prompts/s",
                 "result": f"{r['of_medians']:.2f}x", "met": r["of_medians"] >= MIN_TEXT_SPEEDUP,
                 "data": {"runtime": t["runtime"].to_json(), "pytorch": t["pytorch"].to_json(), "ratio": r}})

    # ---- label-table memory, and the bound
    per_1000 = bytes_per_set / LABELS * 1000
    bound = int(bytes_per_set * 2.5)
    bounded = Predictor(folder, provider=cfg.provider, threads=cfg.n_threads, label_cache_bytes=bound)
    peak = 0
    for k in range(4):
        bounded.predict(image, labels=[f"{label} {k}" for label in labels])
        peak = max(peak, bounded.label_tables.nbytes)
    rows.append({"part": "label-table memory", "case": "one task, the 2 levels of one image",
                 "runtime": f"{per_1000 / 2**20:.2f} MiB per 1,000 labels",
                 "baseline": f"bound {bound / 2**20:.2f} MiB (label_cache_bytes)",
                 "result": f"4 label sets: peak {peak / 2**20:.2f} MiB, {len(bounded.label_tables)} kept",
                 "met": peak <= bound,
                 "data": {"bytes_per_set": bytes_per_set, "per_1000_labels": per_1000, "bound": bound,
                          "peak": peak, "embed_dim": w.layout.embed_dim}})
    notes.append(f"labels: {LABELS} prompts 'a photo of a object number i.' (tokenisation included on both sides "
                 "of encode_text); cached-set rows reuse the tables built by a first call on the same images")
    notes.append("memory: tokens + one [C, D] float32 table per (task, level) actually needed (level M = 0 shared "
                 "by all tasks); an image needs at most 2 levels, so C labels cost <= (2T + 1) C D 4 bytes + tokens")
    cols = ["part", "case", "runtime", "baseline", "result"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"model": model})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
