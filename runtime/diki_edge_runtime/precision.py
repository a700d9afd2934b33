"""Which arithmetic precision runs the image graph: what the user asked (``fp32``, ``bf16``, ``auto``), what the CPU's
matrix units offer (cpu_features.py) and what is installed.

* ``fp32`` (the default): ONNX Runtime on the chosen provider, as exported.
* ``bf16``: OpenVINO's runtime on the CPU with bf16 inference (ov_session.py). Needs a CPU with ``amx_bf16`` or
  ``avx512_bf16`` and the ``openvino`` package; either missing is a :class:`RuntimeSetupError` naming it. Only with
  the ``cpu`` provider: a GPU provider was asked for something else.
* ``auto``: bf16 where both are there, else fp32; the Predictor then checks the bf16 outputs against an fp32 run
  of the same graph on a probe batch (same task, same top-1, embedding cosine within
  :func:`diki_edge_runtime.tolerances.bf16_min_cosine`) and keeps fp32, with a note, when they disagree. ``auto`` is
  never the default: what runs is what the user asked for.

An int8 model folder (``export --int8``) runs its int8 graph at any setting: the precision of the arithmetic is
then the graph's own (``MatMulInteger`` on VNNI / AMX), reported as the manifest's precision.
"""

from __future__ import annotations

from diki_edge_runtime.cpu_features import BF16_FLAGS, CpuFeatures, read_cpu_features
from diki_edge_runtime.errors import RuntimeSetupError

PRECISIONS = ("fp32", "bf16", "auto")


def check_precision(precision: str) -> str:
    p = str(precision).strip().lower()
    if p not in PRECISIONS:
        raise RuntimeSetupError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return p


def bf16_unavailable_reason(cpu: CpuFeatures | None = None) -> str | None:
    """Why bf16 cannot run here (CPU flags or the missing package), or None when it can."""
    from diki_edge_runtime.ov_session import openvino_missing_reason

    cpu = read_cpu_features() if cpu is None else cpu
    if not cpu.has_bf16:
        return (f"this CPU ({cpu.model_name or 'unknown model'}) has no bf16 matrix unit (none of the CPU flags "
                f"{', '.join(BF16_FLAGS)})")
    return openvino_missing_reason()


def resolve_precision(precision: str, provider: str | tuple[str, ...], cpu: CpuFeatures | None = None) -> str:
    """The concrete precision (``fp32`` or ``bf16``) for what was asked; raises when ``bf16`` cannot run."""
    p = check_precision(precision)
    if p == "fp32":
        return p
    on_cpu = (provider if isinstance(provider, str) else ",".join(provider)).strip().lower() == "cpu"
    if p == "auto":
        return "bf16" if on_cpu and bf16_unavailable_reason(cpu) is None else "fp32"
    if not on_cpu:
        raise RuntimeSetupError(f"precision bf16 runs on the CPU through OpenVINO; it cannot be combined with the "
                                f"provider {provider!r} (use --provider cpu)")
    reason = bf16_unavailable_reason(cpu)
    if reason:
        raise RuntimeSetupError(f"precision bf16 is not available: {reason}. Nothing was run at another precision.")
    return p


def disagreements(reference: dict, candidate: dict, min_cosine: float) -> list[str]:
    """What differs between an fp32 run (``reference``) and a reduced-precision run of the same graph on the same
    inputs: the export validation's checks (task choice, top-1 class, image-embedding cosine). Empty: they agree."""
    import numpy as np

    problems = []
    if not np.array_equal(reference["task"], candidate["task"]):
        problems.append(f"task choice differs on {int(np.sum(reference['task'] != candidate['task']))} of "
                        f"{len(reference['task'])} probe images")
    top_ref, top_got = np.argmax(reference["logits"], axis=1), np.argmax(candidate["logits"], axis=1)
    if not np.array_equal(top_ref, top_got):
        problems.append(f"top-1 class differs on {int(np.sum(top_ref != top_got))} of {len(top_ref)} probe images")
    a, b = (np.asarray(x["image_embeds"], np.float64) for x in (reference, candidate))
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    if not np.all(np.isfinite(cos)) or float(cos.min()) < min_cosine:
        problems.append(f"image-embedding cosine with fp32 {float(np.nanmin(cos)):.5f} < {min_cosine}")
    return problems
