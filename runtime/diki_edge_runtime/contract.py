"""The model folder's contract, declared once: graph tensors, file names, versions, the typed manifest.

The exporter (``export/diki_edge_export/exporter.py``) writes a model folder through this module and the
runtime's :class:`~diki_edge_runtime.predictor.Predictor` reads it through this module; neither re-declares a
name. Shapes name their dimensions; the dynamic ones (``batch``, ``tasks``, ``classes``, ``levels``) stay symbolic
in the ONNX file and in ``manifest.json``, the others are fixed by the backbone and the bank layout and are
written as integers (see :func:`resolved_io`).

The familiarity of an image, ``M = sigmoid(S / D - 1)`` in the paper, is called ``weight`` everywhere: graph
output, Python attribute, JSON key. "weight" says what it does (it weights the residual branch) and the graph
output has carried that name since the first export; ``M`` appears only in formulas and table headers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from diki_edge_runtime.errors import RuntimeSetupError

MANIFEST_FORMAT_VERSION = 1

# Graph behaviour and format defaults (the exporter's options default to these; the manifest records the values).
DEFAULT_OPSET = 18  # the lowest opset the graph is exported and validated with
DEFAULT_SKIP_BELOW = 1e-6  # images with weight below this skip pass 2 (the branch adds < the fp32 parity bound)
DEFAULT_TEMPLATE = "a photo of a {}."  # the class prompt template a task is trained with unless told otherwise
PRECISIONS = ("fp32", "fp16", "int8")

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


@dataclass
class Manifest:
    """``manifest.json`` of a model folder: what the graph takes and returns, what it was made from, how it was
    validated. Written by the exporter (:meth:`save`), read by the runtime (:meth:`load`)."""

    inputs: dict[str, dict[str, Any]]  # name -> {"shape": [int | dim name], "dtype": "float32" | "int64"}
    outputs: dict[str, dict[str, Any]]
    files: dict[str, str]  # role ("model", "bank", "preprocess", optionally "model_data") -> file name
    backbone: dict[str, Any]  # the backbone spec + "weights_sha256" + "preprocess"
    bank_layout: dict[str, Any]  # BankLayout.to_json() of the banks this graph accepts
    bank: dict[str, Any]  # {"tasks": [names], "classes": count} of the bundled bank
    opset: int
    exporter: str  # "torchscript" | "dynamo"
    precision: str  # one of PRECISIONS
    skip_below: float
    validation: dict[str, Any]  # variant -> figures (see diki_edge_export.validate)
    validated_providers: list[str]
    versions: dict[str, str]  # package -> version of the exporting environment
    created: str  # ISO 8601, UTC
    not_validated: str | None = None  # why a variant could not be validated here, if so
    format_version: int = MANIFEST_FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["not_validated"] is None:
            del out["not_validated"]
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST_FILE) -> "Manifest":
        """Parse and check a manifest; every problem is a :class:`RuntimeSetupError` naming ``source`` and the
        field."""
        if not isinstance(data, dict):
            raise RuntimeSetupError(f"{source}: the manifest must be a JSON object, not {type(data).__name__}")
        version = data.get("format_version")
        if version != MANIFEST_FORMAT_VERSION:
            raise RuntimeSetupError(f"{source}: model format version {version!r} is not supported (this diki-edge "
                                    f"reads version {MANIFEST_FORMAT_VERSION}); re-export the model with this "
                                    "version")
        expected: dict[str, tuple[type, ...]] = {
            "inputs": (dict,), "outputs": (dict,), "files": (dict,), "backbone": (dict,), "bank_layout": (dict,),
            "bank": (dict,), "opset": (int,), "exporter": (str,), "precision": (str,), "skip_below": (int, float),
            "validation": (dict,), "validated_providers": (list,), "versions": (dict,), "created": (str,),
            "not_validated": (str, type(None)),
        }
        kwargs: dict[str, Any] = {"format_version": version}
        for name, types in expected.items():
            if name not in data:
                if name == "not_validated":
                    continue
                raise RuntimeSetupError(f"{source}: manifest field {name!r} is missing")
            value = data[name]
            if not isinstance(value, types) or isinstance(value, bool):
                want = " or ".join(t.__name__ for t in types)
                raise RuntimeSetupError(f"{source}: manifest field {name!r} must be {want}, "
                                        f"not {type(value).__name__}")
            kwargs[name] = value
        manifest = cls(**kwargs)
        manifest._check_tensors(source)
        if manifest.precision not in PRECISIONS:
            raise RuntimeSetupError(f"{source}: manifest field 'precision' is {manifest.precision!r}, expected one "
                                    f"of {', '.join(PRECISIONS)}")
        if not (math.isfinite(manifest.skip_below) and manifest.skip_below >= 0):
            raise RuntimeSetupError(f"{source}: manifest field 'skip_below' must be a finite number >= 0, "
                                    f"not {manifest.skip_below!r}")
        return manifest

    def _check_tensors(self, source: str) -> None:
        for kind, specs, declared in (("inputs", GRAPH_INPUTS, self.inputs), ("outputs", GRAPH_OUTPUTS, self.outputs)):
            missing = [s.name for s in specs if s.name not in declared]
            if missing:
                raise RuntimeSetupError(f"{source}: manifest {kind} lack graph tensors {missing}")
            for spec in specs:
                entry = declared[spec.name]
                if not isinstance(entry, dict) or entry.get("dtype") != spec.dtype or \
                        not isinstance(entry.get("shape"), list) or len(entry["shape"]) != len(spec.dims):
                    raise RuntimeSetupError(f"{source}: manifest {kind}.{spec.name} must be "
                                            f"{{'shape': [{len(spec.dims)} dims], 'dtype': {spec.dtype!r}}}, "
                                            f"not {entry!r}")

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Manifest":
        path = Path(folder) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RuntimeSetupError(f"{path}: manifest not found (is {path.parent} an exported diki-edge model "
                                    "folder? create one with `diki-edge export`)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RuntimeSetupError(f"{path}: cannot read the manifest: {exc}") from None
        return cls.from_json(data, str(path))
