"""The model folder's contract, declared once: graph tensors, file names, versions, the typed manifest.

The exporter (``export/diki_edge_export/exporter.py``) writes a model folder through this module and the
runtime's :class:`~diki_edge_runtime.predictor.Predictor` reads it through this module; neither re-declares a
name. Shapes name their dimensions; the dynamic ones (``batch``, ``tasks``, ``classes``, ``levels``) stay symbolic
in the ONNX file and in ``manifest.json``, the others are fixed by the backbone and the bank layout and are
written as integers (see :func:`resolved_io`).

The familiarity of an image, ``M = sigmoid(slope_t S_t + bias_t)`` (the paper's ``sigmoid(S / D - 1)`` is
``slope = 1/D, bias = -1``; :mod:`diki_edge_runtime.calibration`), is called ``weight`` everywhere: graph
output, Python attribute, JSON key. "weight" says what it does (it weights the residual branch) and the graph
output has carried that name since the first export; ``M`` appears only in formulas and table headers.

Two graphs: the calibrated image graph (``model.onnx``, :data:`GRAPH_INPUTS` -> :data:`GRAPH_OUTPUTS`) and the
text encoder (``text.onnx``, :data:`TEXT_GRAPH_INPUTS` -> :data:`TEXT_GRAPH_OUTPUTS`) whose inputs include the text
side of the bank, the task and ``M`` of every prompt, so labels given at prediction time are encoded under any
bank's text adapters without re-export. Folders exported before the text graph existed have no ``text`` section
in their manifest and no ``frozen_embeds`` output: they keep working for image-only prediction.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.reading import METADATA_MAX_BYTES, name_problem, read_limited_text

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
TEXT_MODEL_FILE = "text.onnx"  # the text encoder graph (TEXT_GRAPH_INPUTS -> TEXT_GRAPH_OUTPUTS)
TOKENIZER_FILE = "tokenizer.json"  # the backbone's BPE as a Hugging Face tokenizers file (runtime tokenizer.py)

# Dimensions that stay symbolic in the graph: a bank with more or fewer tasks/classes runs on the same file.
DYNAMIC_DIMS = ("batch", "tasks", "classes", "levels", "prompts", "text_length")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str | int, ...]
    dtype: str  # "float32" | "int64" (fp16 graphs keep float32 inputs/outputs; the cast is inside the graph)
    doc: str = ""
    required: bool = True  # False: added later; folders exported before it lack it and still load


# The bank's arrays, declared once (llama.cpp's gguf-py does the same for tensor names): the bank
# (``diki_edge_runtime.bank``), its shapes (``BankLayout.shapes``), the graph inputs below and the training
# shapes all derive from this table. ``role``: "task" arrays have a leading task axis, "class" arrays a class axis
# (``class_embeds`` a leading levels axis, then classes). ``consumer``: "graph" arrays are inputs of the image
# graph, "text_graph" ones of the text graph, "training" ones are kept only to re-finalise or merge tasks.
BANK_K = "bank_k"
BANK_V = "bank_v"
TEXT_K = "text_k"
TEXT_V = "text_v"
GAUSS_MEAN = "gauss_mean"
GAUSS_WHITEN = "gauss_whiten"
GAUSS_CONST = "gauss_const"
STATS_COUNT = "stats_count"
STATS_SUM = "stats_sum"
STATS_OUTER = "stats_outer"
CLASS_EMBEDS = "class_embeds"
CLASS_TASK = "class_task"
CALIB_SLOPE = "calib_slope"
CALIB_BIAS = "calib_bias"


@dataclass(frozen=True)
class BankArraySpec:
    name: str
    role: str  # "task" | "class"
    dims: tuple[str, ...]  # symbolic: DYNAMIC_DIMS or a BankLayout field name
    dtype: str  # numpy dtype name: "float32" | "float64" | "int64"
    consumer: str  # "graph" | "text_graph" | "training"
    doc: str = ""
    required: bool = True  # False: added in a later format; older banks and graphs lack it (see bank.load)


_IMAGE_ADAPTER = ("tasks", "image_layers", "residual_length", "image_width")
_TEXT_ADAPTER = ("tasks", "text_layers", "residual_length", "text_width")
BANK_ARRAYS: tuple[BankArraySpec, ...] = (
    BankArraySpec(BANK_K, "task", _IMAGE_ADAPTER, "float32", "graph", "image-encoder residual keys"),
    BankArraySpec(BANK_V, "task", _IMAGE_ADAPTER, "float32", "graph", "image-encoder residual values"),
    BankArraySpec(TEXT_K, "task", _TEXT_ADAPTER, "float32", "text_graph",
                  "text-encoder residual keys of every task (the bank's text_k)"),
    BankArraySpec(TEXT_V, "task", _TEXT_ADAPTER, "float32", "text_graph",
                  "text-encoder residual values of every task (the bank's text_v)"),
    BankArraySpec(GAUSS_MEAN, "task", ("tasks", "embed_dim"), "float32", "graph", "task means"),
    BankArraySpec(GAUSS_WHITEN, "task", ("tasks", "embed_dim", "embed_dim"), "float32", "graph",
                  "W with W Sigma W^T = I (computed offline in float64)"),
    BankArraySpec(GAUSS_CONST, "task", ("tasks",), "float32", "graph", "-0.5 (D log 2pi + log|Sigma|)"),
    BankArraySpec(STATS_COUNT, "task", ("tasks",), "int64", "training", "images the task's Gaussian was fitted on"),
    BankArraySpec(STATS_SUM, "task", ("tasks", "embed_dim"), "float64", "training", "sum of the embeddings"),
    BankArraySpec(STATS_OUTER, "task", ("tasks", "embed_dim", "embed_dim"), "float64", "training",
                  "sum of the embeddings' outer products"),
    BankArraySpec(CLASS_EMBEDS, "class", ("levels", "classes", "embed_dim"), "float32", "graph",
                  "class text embeddings at the calibration levels of M"),
    BankArraySpec(CLASS_TASK, "class", ("classes",), "int64", "graph", "task index of each class"),
    # M = sigmoid(calib_slope[t] * S_t + calib_bias[t]) (diki_edge_runtime.calibration); banks of format 1 and
    # graphs exported before them lack these and mean the paper's mapping (slope 1/D, bias -1).
    BankArraySpec(CALIB_SLOPE, "task", ("tasks",), "float32", "graph",
                  "calibration slope per task (> 0): M = sigmoid(calib_slope * S + calib_bias)", required=False),
    BankArraySpec(CALIB_BIAS, "task", ("tasks",), "float32", "graph", "calibration bias per task",
                  required=False),
)
BANK_ARRAY_NAMES: tuple[str, ...] = tuple(s.name for s in BANK_ARRAYS)


def _bank_inputs(consumer: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.name, s.dims, s.dtype, s.doc, s.required) for s in BANK_ARRAYS
                 if s.consumer == consumer)


GRAPH_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("pixel_values", ("batch", 3, "pixel_height", "pixel_width"), "float32",
               "preprocessed images (preprocess.json)"),
) + _bank_inputs("graph")

GRAPH_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("logits", ("batch", "classes"), "float32", "class scores; -inf for classes of other tasks"),
    TensorSpec("task", ("batch",), "int64", "selected task per image"),
    TensorSpec("weight", ("batch",), "float32", "calibrated familiarity weight M per image"),
    TensorSpec("task_scores", ("batch", "tasks"), "float32", "Gaussian log-density per task"),
    TensorSpec("image_embeds", ("batch", "embed_dim"), "float32", "final L2-normalised image embedding"),
    TensorSpec("frozen_embeds", ("batch", "embed_dim"), "float32",
               "pass-1 (frozen encoder) L2-normalised image embedding: what the Gaussians score", required=False),
)

INPUT_NAMES: tuple[str, ...] = tuple(s.name for s in GRAPH_INPUTS)
OUTPUT_NAMES: tuple[str, ...] = tuple(s.name for s in GRAPH_OUTPUTS)
REQUIRED_OUTPUT_NAMES: tuple[str, ...] = tuple(s.name for s in GRAPH_OUTPUTS if s.required)

TEXT_GRAPH_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_tokens", ("prompts", "text_length"), "int64",
               "token ids (tokenizer.json, zero-padded), cut to any length up to the context length that keeps "
               "every prompt's end-of-text token (diki_edge_runtime.text.trimmed_length)"),
) + _bank_inputs("text_graph") + (
    TensorSpec("prompt_task", ("prompts",), "int64", "task whose text adapter encodes each prompt"),
    TensorSpec("prompt_weight", ("prompts",), "float32", "M of each prompt (0: the frozen text encoder)"),
)
TEXT_GRAPH_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_embeds", ("prompts", "embed_dim"), "float32", "L2-normalised text embedding per prompt"),
)
TEXT_INPUT_NAMES: tuple[str, ...] = tuple(s.name for s in TEXT_GRAPH_INPUTS)
TEXT_OUTPUT_NAMES: tuple[str, ...] = tuple(s.name for s in TEXT_GRAPH_OUTPUTS)


def dynamic_axes(specs: tuple[TensorSpec, ...] = GRAPH_INPUTS + GRAPH_OUTPUTS) -> dict[str, dict[int, str]]:
    """``torch.onnx.export(dynamic_axes=...)`` for every input and output of ``specs`` (default: the image graph)."""
    out: dict[str, dict[int, str]] = {}
    for spec in specs:
        axes = {i: d for i, d in enumerate(spec.dims) if isinstance(d, str) and d in DYNAMIC_DIMS}
        if axes:
            out[spec.name] = axes
    return out


def fixed_dims(layout: Any, image_size: tuple[int, int], context_length: int | None = None) -> dict[str, int]:
    """Values of the non-dynamic dimensions for a bank layout (``BankLayout``), the backbone's image size and
    (for the text graph) the tokenizer's context length."""
    dims = {
        "pixel_height": int(image_size[0]),
        "pixel_width": int(image_size[1]),
        "image_layers": int(layout.image_layers),
        "text_layers": int(layout.text_layers),
        "residual_length": int(layout.residual_length),
        "image_width": int(layout.image_width),
        "text_width": int(layout.text_width),
        "embed_dim": int(layout.embed_dim),
    }
    if context_length is not None:
        dims["context_length"] = int(context_length)
    return dims


def resolved_io(layout: Any, image_size: tuple[int, int], context_length: int | None = None,
                inputs: tuple[TensorSpec, ...] = GRAPH_INPUTS, outputs: tuple[TensorSpec, ...] = GRAPH_OUTPUTS
                ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"inputs": {name: {"shape", "dtype"}}, "outputs": {...}}`` as written to ``manifest.json`` (default: the
    image graph; pass the TEXT_GRAPH_* specs and the context length for the text graph)."""
    fixed = fixed_dims(layout, image_size, context_length)

    def one(spec: TensorSpec) -> dict[str, Any]:
        shape = [d if isinstance(d, int) or d in DYNAMIC_DIMS else fixed[d] for d in spec.dims]
        return {"shape": shape, "dtype": spec.dtype}

    return {"inputs": {s.name: one(s) for s in inputs}, "outputs": {s.name: one(s) for s in outputs}}


def check_tensors(declared_io: dict[str, Any], specs: tuple[TensorSpec, ...], kind: str, source: str) -> None:
    """Every required tensor of ``specs`` declared with the contract's dtype and rank (a RuntimeSetupError if not)."""
    missing = [s.name for s in specs if s.required and s.name not in declared_io]
    if missing:
        raise RuntimeSetupError(f"{source}: manifest {kind} lack graph tensors {missing}")
    for spec in specs:
        if spec.name not in declared_io:
            continue
        entry = declared_io[spec.name]
        if not isinstance(entry, dict) or entry.get("dtype") != spec.dtype or \
                not isinstance(entry.get("shape"), list) or len(entry["shape"]) != len(spec.dims):
            raise RuntimeSetupError(f"{source}: manifest {kind}.{spec.name} must be "
                                    f"{{'shape': [{len(spec.dims)} dims], 'dtype': {spec.dtype!r}}}, not {entry!r}")


@dataclass(frozen=True)
class TextSection:
    """The ``text`` section of ``manifest.json``: the text graph, the tokenizer, how they were validated."""

    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    files: dict[str, str]  # "model" -> text.onnx, "tokenizer" -> tokenizer.json
    tokenizer: dict[str, Any]  # diki_edge_runtime.tokenizer.TokenizerSpec.to_json()
    validation: dict[str, Any]  # variant -> figures (diki_edge_export.text)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Any, source: str) -> TextSection:
        if not isinstance(data, dict):
            raise RuntimeSetupError(f"{source}: manifest field 'text' must be an object, not {type(data).__name__}")
        for name in ("inputs", "outputs", "files", "tokenizer", "validation"):
            if not isinstance(data.get(name), dict):
                raise RuntimeSetupError(f"{source}: manifest field text.{name} is missing or not an object")
        for role in ("model", "tokenizer"):
            if not isinstance(data["files"].get(role), str):
                raise RuntimeSetupError(f"{source}: manifest field text.files.{role} is missing")
        check_file_names(data["files"], "text.files", source)
        check_tensors(data["inputs"], TEXT_GRAPH_INPUTS, "text.inputs", source)
        check_tensors(data["outputs"], TEXT_GRAPH_OUTPUTS, "text.outputs", source)
        return cls(data["inputs"], data["outputs"], data["files"], data["tokenizer"], data["validation"])


def read_json_file(path: str | os.PathLike, what: str, missing_hint: str = "") -> Any:
    """Parse a JSON file (the manifest, ``preprocess.json``, a provider-options file): a missing, unreadable,
    oversized or non-regular file (:mod:`diki_edge_runtime.reading`) is a :class:`RuntimeSetupError` naming ``path``
    and ``what`` it should have been. Callers check the value's type."""
    path = Path(path)
    text = read_limited_text(path, what, METADATA_MAX_BYTES, missing_hint)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RuntimeSetupError(f"{path}: cannot read the {what}: {exc}") from None


def check_file_names(files: dict[str, Any], field: str, source: str) -> None:
    """Every file name of a manifest ``files`` object stays inside the model folder (no absolute path, no '..')."""
    for role, name in files.items():
        problem = name_problem(name)
        if problem:
            raise RuntimeSetupError(f"{source}: manifest field {field}.{role}: file name {problem}")


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
    text: TextSection | None = None  # the text graph; None in folders exported before it existed (image-only)
    format_version: int = MANIFEST_FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["not_validated"] is None:
            del out["not_validated"]
        if out["text"] is None:
            del out["text"]
        else:
            out["text"] = self.text.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST_FILE) -> Manifest:
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
            "not_validated": (str, type(None)), "text": (dict,),
        }
        kwargs: dict[str, Any] = {"format_version": version}
        for name, types in expected.items():
            if name not in data:
                if name in ("not_validated", "text"):
                    continue
                raise RuntimeSetupError(f"{source}: manifest field {name!r} is missing")
            value = data[name]
            if not isinstance(value, types) or isinstance(value, bool):
                want = " or ".join(t.__name__ for t in types)
                raise RuntimeSetupError(f"{source}: manifest field {name!r} must be {want}, "
                                        f"not {type(value).__name__}")
            kwargs[name] = value
        if "text" in kwargs:
            kwargs["text"] = TextSection.from_json(kwargs["text"], source)
        manifest = cls(**kwargs)
        manifest._check_tensors(source)
        check_file_names(manifest.files, "files", source)
        if manifest.precision not in PRECISIONS:
            raise RuntimeSetupError(f"{source}: manifest field 'precision' is {manifest.precision!r}, expected one "
                                    f"of {', '.join(PRECISIONS)}")
        if not (math.isfinite(manifest.skip_below) and manifest.skip_below >= 0):
            raise RuntimeSetupError(f"{source}: manifest field 'skip_below' must be a finite number >= 0, "
                                    f"not {manifest.skip_below!r}")
        return manifest

    def _check_tensors(self, source: str) -> None:
        check_tensors(self.inputs, GRAPH_INPUTS, "inputs", source)
        check_tensors(self.outputs, GRAPH_OUTPUTS, "outputs", source)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        path = Path(folder) / MANIFEST_FILE
        data = read_json_file(path, "manifest", f" (is {path.parent} an exported diki-edge model folder? create one "
                                                "with `diki-edge export`)")
        return cls.from_json(data, str(path))
