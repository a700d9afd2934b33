"""The exported graph's interface, declared once: input/output names, symbolic shapes, dtypes, dynamic axes.

torch-free (the runtime may import it). Shapes name their dimensions; the dynamic ones (``batch``, ``tasks``,
``classes``, ``levels``) stay symbolic in the ONNX file and in ``manifest.json``, the others are fixed by the
backbone and the bank layout and are written as integers (see :func:`resolved_io`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MANIFEST_FORMAT_VERSION = 1

# The files of an exported model folder (written by the exporter, read by diki_edge_runtime).
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"  # only for graphs over protobuf's 2 GB limit
BANK_FILE = "bank.safetensors"
PREPROCESS_FILE = "preprocess.json"
MANIFEST_FILE = "manifest.json"

# Dimensions that stay symbolic in the graph: a bank with more or fewer tasks/classes runs on the same file.
DYNAMIC_DIMS = ("batch", "tasks", "classes", "levels")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str | int, ...]
    dtype: str  # "float32" | "int64" (fp16 graphs keep float32 inputs/outputs; the cast is inside the graph)
    doc: str = ""


GRAPH_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("pixel_values", ("batch", 3, "pixel_height", "pixel_width"), "float32",
               "preprocessed images (preprocess.json)"),
    TensorSpec("bank_k", ("tasks", "image_layers", "residual_length", "image_width"), "float32",
               "image-encoder residual keys"),
    TensorSpec("bank_v", ("tasks", "image_layers", "residual_length", "image_width"), "float32",
               "image-encoder residual values"),
    TensorSpec("gauss_mean", ("tasks", "embed_dim"), "float32", "task means"),
    TensorSpec("gauss_whiten", ("tasks", "embed_dim", "embed_dim"), "float32",
               "W with W Sigma W^T = I (computed offline in float64)"),
    TensorSpec("gauss_const", ("tasks",), "float32", "-0.5 (D log 2pi + log|Sigma|)"),
    TensorSpec("class_embeds", ("levels", "classes", "embed_dim"), "float32",
               "class text embeddings at the calibration levels of M"),
    TensorSpec("class_task", ("classes",), "int64", "task index of each class"),
)

GRAPH_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("logits", ("batch", "classes"), "float32", "class scores; -inf for classes of other tasks"),
    TensorSpec("task", ("batch",), "int64", "selected task per image"),
    TensorSpec("weight", ("batch",), "float32", "calibrated familiarity weight M per image"),
    TensorSpec("task_scores", ("batch", "tasks"), "float32", "Gaussian log-density per task"),
    TensorSpec("image_embeds", ("batch", "embed_dim"), "float32", "final L2-normalised image embedding"),
)

INPUT_NAMES: tuple[str, ...] = tuple(s.name for s in GRAPH_INPUTS)
OUTPUT_NAMES: tuple[str, ...] = tuple(s.name for s in GRAPH_OUTPUTS)


def dynamic_axes() -> dict[str, dict[int, str]]:
    """``torch.onnx.export(dynamic_axes=...)`` for every input and output, derived from the specs above."""
    out: dict[str, dict[int, str]] = {}
    for spec in GRAPH_INPUTS + GRAPH_OUTPUTS:
        axes = {i: d for i, d in enumerate(spec.dims) if isinstance(d, str) and d in DYNAMIC_DIMS}
        if axes:
            out[spec.name] = axes
    return out


def fixed_dims(layout: Any, image_size: tuple[int, int]) -> dict[str, int]:
    """Values of the non-dynamic dimensions for a bank layout (``BankLayout``) and the backbone's image size."""
    return {
        "pixel_height": int(image_size[0]),
        "pixel_width": int(image_size[1]),
        "image_layers": int(layout.image_layers),
        "residual_length": int(layout.residual_length),
        "image_width": int(layout.image_width),
        "embed_dim": int(layout.embed_dim),
    }


def resolved_io(layout: Any, image_size: tuple[int, int]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"inputs": {name: {"shape", "dtype"}}, "outputs": {...}}`` as written to ``manifest.json``."""
    fixed = fixed_dims(layout, image_size)

    def one(spec: TensorSpec) -> dict[str, Any]:
        shape = [d if isinstance(d, int) or d in DYNAMIC_DIMS else fixed[d] for d in spec.dims]
        return {"shape": shape, "dtype": spec.dtype}

    return {"inputs": {s.name: one(s) for s in GRAPH_INPUTS}, "outputs": {s.name: one(s) for s in GRAPH_OUTPUTS}}
