"""Export-time validation of an ONNX graph against the PyTorch reference (:class:`CalibratedDiki`).

Validation set (built from the backbone and the bank only, nothing downloaded):

* real images: photographs bundled with scikit-image (``skimage.data``), preprocessed with open_clip's own
  eval transform for the backbone's ``preprocess_cfg``;
* random inputs: Gaussian noise in the normalised pixel space (seeded).

Cases: the bank as given on real images and on random inputs (usually every image is unfamiliar -> the
zero-row pass-2 path), and a *probe* bank — the same adapters and class table, with Gaussians refitted to
groups of the real images (ridge ``PROBE_RIDGE``) — so that images are familiar, pass 2 runs with every task's
``K_r/V_r`` and ``M`` is away from 0 and 1. A mixed batch (familiar + random) and a single image complete it.

fp32 bounds (derived in :mod:`diki_edge_runtime.tolerances`, shared with the tests): image embeddings (final and
pass-1) max abs diff <= ``EMBED_MAX_ABS`` (1e-4), each task score and ``M`` within its float32 error bound given the
observed pass-1 embedding difference (figures ``*_error_ratio``: measured / bound, must be <= 1), the same task
unless two tasks tie within that bound, identical top-1 classes. Reduced-precision variants are compared with the
fp32 reference by embedding cosine and top-1 / task agreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from diki_edge_runtime import calibration as calib
from diki_edge_runtime import tolerances
from diki_edge_runtime.contract import INPUT_NAMES, OUTPUT_NAMES
from diki_edge_runtime.gaussian import GaussianStats

FP32_BOUNDS = {"embeds_max_abs": tolerances.EMBED_MAX_ABS, "scores_error_ratio": 1.0, "weight_error_ratio": 1.0}
# fp16: every image's embedding within cosine 0.999 of fp32.
FP16_MIN_COSINE = 0.999
# int8 dynamic quantisation: see README/exporter docstring for the justification of these bounds.
INT8_MIN_COSINE = 0.98
INT8_MIN_TOP1_AGREEMENT = 0.90
PROBE_RIDGE = 1e-3

REAL_IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "camera", "rocket", "immunohistochemistry",
                    "hubble_deep_field", "colorwheel", "coins", "clock", "brick", "grass")


def real_images(preprocess_cfg: dict[str, Any], count: int = 8) -> torch.Tensor:
    """``[count, 3, H, W]`` scikit-image photographs through open_clip's own eval transform."""
    import skimage.data
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    out = []
    for name in REAL_IMAGE_NAMES[:count]:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr).convert("RGB")
        out.append(transform(img))
    return torch.stack(out)


def random_inputs(image_size: tuple[int, int], count: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, *image_size, generator=g)


@torch.no_grad()
def probe_inputs(bank_inputs: dict[str, np.ndarray], diki, images: torch.Tensor,
                 ridge: float = PROBE_RIDGE) -> dict[str, np.ndarray]:
    """The bank's graph inputs with Gaussians refitted to groups of ``images`` (so those images are familiar)."""
    t = bank_inputs["gauss_mean"].shape[0]
    groups = max(1, min(t, images.shape[0] // 2))
    f = diki.encode_image(images).double().numpy()
    mean, whiten, const, slope, bias = (bank_inputs[k].copy() for k in ("gauss_mean", "gauss_whiten", "gauss_const",
                                                                         "calib_slope", "calib_bias"))
    for i in range(groups):
        stats = GaussianStats.empty(f.shape[1]).update(f[i::groups])
        scoring = stats.finalize(ridge)
        mean[i], whiten[i], const[i] = scoring.mean, scoring.whiten, scoring.const
        # a few images per group: the paper's mapping (a held-out fit needs D + 5), as a bank would store it
        slope[i], bias[i] = calib.paper().affine(scoring.const, f.shape[1])
    return {**bank_inputs, "gauss_mean": mean, "gauss_whiten": whiten, "gauss_const": const, "calib_slope": slope,
            "calib_bias": bias}


@dataclass
class Case:
    name: str
    pixels: torch.Tensor
    inputs: dict[str, np.ndarray]


def validation_cases(bank_inputs: dict[str, np.ndarray], diki, preprocess_cfg: dict[str, Any],
                     image_size: tuple[int, int], n_real: int = 8, n_random: int = 4) -> list[Case]:
    real = real_images(preprocess_cfg, n_real)
    rand = random_inputs(image_size, n_random)
    probe = probe_inputs(bank_inputs, diki, real)
    mixed = torch.cat([real[: n_real // 2], rand[: n_random // 2], real[n_real // 2:], rand[n_random // 2:]])
    return [
        Case("bank/real", real, bank_inputs),
        Case("bank/random", rand, bank_inputs),
        Case("probe/real", real, probe),
        Case("probe/mixed", mixed, probe),
        Case("probe/single", real[:1], probe),
    ]


def _ref_outputs(calibrated, pixels: torch.Tensor, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = calibrated(pixels, **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, out)}


def onnx_runner(session) -> Callable[[torch.Tensor, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(pixels: torch.Tensor, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(inputs[k]) for k in INPUT_NAMES[1:]}
        feeds["pixel_values"] = pixels.numpy().astype(np.float32)
        return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feeds)))

    return run


def _top1(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=1)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def score_rel_error(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per image: ``max_t |dS_t| / max(max_t |S_t|, 1)`` — score error relative to that image's score scale.

    Not element-wise on purpose: ``dS/df = -W^T W (f - mu)`` with ``W ~ 1/sqrt(eigenvalue)``, so float32 noise of
    1e-7 in the embedding (different GEMM summation orders in ORT and PyTorch) moves a score near zero by far
    more than 1e-5 of itself while leaving the image's selection and ``M`` unchanged (those are checked exactly
    / to 1e-5 separately).
    """
    if ref.size == 0:
        return np.zeros(ref.shape[0])
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64)).max(axis=1)
    return diff / np.maximum(np.abs(ref.astype(np.float64)).max(axis=1), 1.0)


def error_ratios(ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                 inputs: dict[str, np.ndarray]) -> tuple[float, float, int]:
    """Scores' and ``M``'s largest error as a fraction of its :mod:`~diki_edge_runtime.tolerances` bound, and the
    number of images whose task differs without a tie inside that bound."""
    gauss = [inputs[k] for k in ("gauss_mean", "gauss_whiten", "gauss_const")]
    ref_f0 = ref.get("frozen_embeds", ref["image_embeds"])
    bound = tolerances.score_error_bound(ref_f0, got.get("frozen_embeds", ref_f0), *gauss)
    rows = np.arange(ref["task"].shape[0])
    ref_scores = ref["task_scores"].astype(np.float64)
    weight_bound = tolerances.weight_error_bound(bound[rows, ref["task"]], ref_scores[rows, ref["task"]],
                                                 inputs["calib_slope"][ref["task"]], inputs["calib_bias"][ref["task"]])
    scores = np.abs(got["task_scores"] - ref_scores) / bound
    weight = np.abs(got["weight"] - ref["weight"].astype(np.float64)) / weight_bound
    disagree = ~tolerances.tasks_agree(got["task"], ref_scores, ref["task"], bound)
    return float(np.max(scores, initial=0.0)), float(np.max(weight, initial=0.0)), int(np.sum(disagree))


def parity_figures(ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                   inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """fp32 parity figures of one case (``inputs``: the bank arrays both sides were fed)."""
    scores_rel = score_rel_error(got["task_scores"], ref["task_scores"])
    scores_ratio, weight_ratio, task_disagreements = error_ratios(ref, got, inputs)
    return {
        "scores_error_ratio": scores_ratio,
        "weight_error_ratio": weight_ratio,
        "task_disagreements": task_disagreements,
        "embeds_max_abs": max(float(np.max(np.abs(got[k] - ref[k]), initial=0.0))
                              for k in ("image_embeds", "frozen_embeds")),
        "scores_max_rel": float(np.max(scores_rel, initial=0.0)),
        "weight_max_abs": float(np.max(np.abs(got["weight"] - ref["weight"]), initial=0.0)),
        "task_mismatches": int(np.sum(got["task"] != ref["task"])),
        "top1_mismatches": int(np.sum(_top1(got["logits"]) != _top1(ref["logits"]))),
    }


def agreement_figures(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    """Reduced-precision figures of one case against fp32."""
    cos = row_cosine(got["image_embeds"], ref["image_embeds"])
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "top1_agree": int(np.sum(_top1(got["logits"]) == _top1(ref["logits"]))),
        "task_agree": int(np.sum(got["task"] == ref["task"])),
        "weight_max_abs": float(np.max(np.abs(got["weight"] - ref["weight"]), initial=0.0)),
    }


@dataclass
class Validation:
    """Per-case figures plus the verdict of one variant (``fp32`` / ``fp16`` / ``int8``)."""

    variant: str
    provider: str
    cases: list[dict[str, Any]] = field(default_factory=list)
    bounds: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def validate_fp32(calibrated, run: Callable, cases: list[Case], provider: str,
                  references: dict[str, dict[str, np.ndarray]] | None = None) -> Validation:
    v = Validation("fp32", provider, bounds=dict(FP32_BOUNDS))
    for case in cases:
        ref = references[case.name] if references else _ref_outputs(calibrated, case.pixels, case.inputs)
        fig = parity_figures(ref, run(case.pixels, case.inputs), case.inputs)
        fig.update(name=case.name, batch=int(case.pixels.shape[0]),
                   pass2_rows=int(np.sum(ref["weight"] >= calibrated.skip_below)))
        v.cases.append(fig)
        for key, bound in FP32_BOUNDS.items():
            if not fig[key] <= bound:
                v.failures.append(f"{case.name}: {key} = {fig[key]:.3g} > {bound:g}")
        for key in ("task_disagreements", "top1_mismatches"):
            if fig[key]:
                v.failures.append(f"{case.name}: {fig[key]} of {fig['batch']} images differ ({key})")
    v.passed = not v.failures
    v.summary = {k: max(c[k] for c in v.cases) for k in FP32_BOUNDS}
    v.summary.update(images=sum(c["batch"] for c in v.cases),
                     task_mismatches=sum(c["task_mismatches"] for c in v.cases),
                     top1_mismatches=sum(c["top1_mismatches"] for c in v.cases))
    return v


def validate_variant(variant: str, run: Callable, cases: list[Case], provider: str,
                     references: dict[str, dict[str, np.ndarray]], min_cosine: float,
                     min_top1: float | None = None) -> Validation:
    bounds = {"cosine_min": min_cosine}
    if min_top1 is not None:
        bounds["top1_agreement"] = min_top1
    v = Validation(variant, provider, bounds=bounds)
    for case in cases:
        fig = agreement_figures(references[case.name], run(case.pixels, case.inputs))
        fig.update(name=case.name, batch=int(case.pixels.shape[0]))
        v.cases.append(fig)
    images = sum(c["batch"] for c in v.cases)
    v.summary = {
        "images": images,
        "cosine_min": min(c["cosine_min"] for c in v.cases),
        "cosine_mean": float(sum(c["cosine_mean"] * c["batch"] for c in v.cases) / images),
        "top1_agreement": sum(c["top1_agree"] for c in v.cases) / images,
        "task_agreement": sum(c["task_agree"] for c in v.cases) / images,
        "weight_max_abs": max(c["weight_max_abs"] for c in v.cases),
    }
    if not v.summary["cosine_min"] >= min_cosine:
        v.failures.append(f"embedding cosine vs fp32 {v.summary['cosine_min']:.5f} < {min_cosine}")
    if min_top1 is not None and not v.summary["top1_agreement"] >= min_top1:
        v.failures.append(f"top-1 agreement with fp32 {v.summary['top1_agreement']:.3f} < {min_top1}")
    v.passed = not v.failures
    return v


def reference_outputs(calibrated, cases: list[Case]) -> dict[str, dict[str, np.ndarray]]:
    return {c.name: _ref_outputs(calibrated, c.pixels, c.inputs) for c in cases}
