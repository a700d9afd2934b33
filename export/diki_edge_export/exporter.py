"""``export_model``: bank + backbone -> a validated, self-contained model folder (what
diki_edge_runtime/predictor.py reads).

Folder layout (written into a temporary sibling folder, swapped into place only after validation passed, see
:mod:`diki_edge_runtime.files`: at every instant the old or the new complete folder is at the path; staging
folders of killed exports to the same path are removed by the next export)::

    model.onnx            the graph (model.onnx.data alongside when the graph exceeds 2 GB)
    bank.safetensors      a copy of the bank; TaskBank.load(...).graph_inputs() are the graph's bank inputs
    preprocess.json       size, mode, mean, std, interpolation, resize_mode, fill_color (open_clip's eval transform)
    manifest.json         format version, inputs/outputs, backbone + hash, bank layout, opset, exporter,
                          precision, skip threshold, validation figures, validated providers, and the
                          ``text`` section (text graph inputs/outputs, tokenizer, its validation figures)
    text.onnx             the text encoder with the bank's text adapters as inputs (diki_edge_export.text)
    tokenizer.json        the backbone's BPE for the runtime's torch-free tokenizer

Decisions (also in the README's architecture section):

* **Exporter**: the TorchScript-based exporter (``dynamo=False``) is the default. The graph needs a
  data-dependent sub-batch (``nonzero`` -> ``index_select`` -> encoder -> ``index_put``) with dynamic ``B``,
  ``T``, ``C``; the tracing exporter turns that into plain ONNX ops that were measured to match PyTorch to ~1e-7
  (``diki_edge_export.validate``) and exports ViT-B in seconds. ``dynamo=True`` (torch.export) is accepted and
  validated the same way, but has to reason about unbacked sizes through open_clip and is slower to export.
* **Zero-row sub-batches** (a batch where every image is unfamiliar) are handled by making every reshape in
  the image tower batch-leading with no ``-1`` (:mod:`diki_edge_export.graph`), so no ``If`` is needed.
* **Skip threshold**: ``skip_below = 1e-6`` (``CalibratedDiki``'s default). The branch enters each adapted
  layer as ``M * softmax(.) V_r``, so below ``M = 1e-6`` its effect on the embedding is of order
  ``1e-6 * |V_r|``, two orders under the 1e-4 parity bound; unfamiliar images have ``M`` of 1e-10 .. 0 anyway
  (``sigmoid(S/D - 1)`` of very negative log-densities).
* **int8**: ONNX Runtime dynamic quantisation (int8 weights per output channel, uint8 activations quantised
  per call) of the encoder's MatMul/Gemm nodes. The Gaussian scoring, selection and class table read graph
  inputs and stay float32. Bound: embedding cosine with fp32 >= 0.98 for every image and top-1 agreement >= 90 %
  over the validation set — see ``validate.INT8_MIN_COSINE`` for the justification.
* **--force** replaces only a diki-edge model folder (one holding ``manifest.json``); anything else at the path
  (a file, a symlink, a folder of photos) is refused with a message naming what is there. Whether the output can
  be written, with room for about the backbone's weights plus the bank, is checked before the export starts.
* **fp16**: both encoder passes in float16 inside an otherwise float32 graph (the Gaussian log-densities reach
  1e5..1e6 and would overflow float16); inputs and outputs stay float32 so the runtime feeds the same arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diki_edge_export.errors import ExportError
from diki_edge_export.targets import TargetResult, build_target, graph_targets, validate_target
from diki_edge_runtime.contract import (
    BANK_FILE,
    DEFAULT_OPSET,
    DEFAULT_SKIP_BELOW,
    EXTERNAL_DATA_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    PRECISIONS,
    PREPROCESS_FILE,
    TEXT_GRAPH_INPUTS,
    TEXT_GRAPH_OUTPUTS,
    TEXT_MODEL_FILE,
    TOKENIZER_FILE,
    Manifest,
    TextSection,
    resolved_io,
)
from diki_edge_runtime.files import check_writable, replace_dir, staging_dir

DEFAULT_DYNAMO = False


@dataclass
class ExportResult:
    out_dir: Path
    model_path: Path
    manifest: Manifest
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def model_bytes(self) -> int:
        total = self.model_path.stat().st_size
        data = self.model_path.with_name(EXTERNAL_DATA_FILE)
        return total + (data.stat().st_size if data.exists() else 0)

    @property
    def validation(self) -> dict[str, Any]:
        return self.manifest.validation


class _Steps:
    """Rich progress lines: a spinner while a step runs, a tick with its duration when it ends."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.console = Console(quiet=quiet, highlight=False)
        self.timings: dict[str, float] = {}

    def run(self, label: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        with self.console.status(f"{label} …"):
            result = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.timings[label] = dt
        self.console.print(f"[green]✓[/green] {label} [dim]({dt:.1f} s)[/dim]")
        return result


def preprocess_json(cfg: dict[str, Any]) -> dict[str, Any]:
    """The backbone's open_clip ``preprocess_cfg`` with every field explicit (``size`` as ``[H, W]``)."""
    from open_clip.transform import PreprocessCfg

    full = {**PreprocessCfg().__dict__, **(cfg or {})}
    size = full["size"]
    size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    return {
        "size": size,
        "mode": str(full["mode"]),
        "mean": [float(x) for x in full["mean"]],
        "std": [float(x) for x in full["std"]],
        "interpolation": str(full["interpolation"]),
        "resize_mode": str(full["resize_mode"]),
        "fill_color": int(full["fill_color"]),
    }


def _load_backbone(bank, model: str | None, pretrained: str | None, backbone):
    from diki_edge.backbone import (
        Backbone,
        backbone_from_spec,
        load_backbone,
        weights_hash,
    )

    spec = bank.layout.backbone
    if backbone is None:
        if model is None and not spec.get("model"):
            raise ExportError("the bank does not name its backbone; pass --model (and --pretrained)")
        if model is None and pretrained is None:
            backbone = backbone_from_spec(spec)
        else:
            backbone = load_backbone(model or spec["model"], pretrained)
    elif not isinstance(backbone, Backbone):
        raise ExportError(f"backbone must be a diki_edge.backbone.Backbone, got {type(backbone).__name__}")
    from diki_edge.model import unwrapped_copy
    clip = unwrapped_copy(backbone.model).eval()
    digest = weights_hash(clip)
    if digest != bank.layout.backbone_hash:
        raise ExportError(
            f"the bank was made for backbone {spec.get('model')!r} (pretrained {spec.get('pretrained')!r}, weights "
            f"sha256 {bank.layout.backbone_hash[:12]}), but the backbone being exported "
            f"({backbone.spec.get('model')!r}, pretrained {backbone.spec.get('pretrained')!r}) has weights "
            f"{digest[:12]}; export with the backbone the bank was trained on (--model/--pretrained)")
    return backbone, clip, digest


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an output path that holds something ``--force`` must not replace (see the module docstring)."""
    if not os.path.lexists(out_dir):
        return
    if not force:
        raise ExportError(f"{out_dir} already exists; choose another --out or pass --force to replace it")
    if out_dir.is_symlink():
        raise ExportError(f"{out_dir} is a symlink (to {os.readlink(out_dir)}); --force replaces only a diki-edge "
                          "model folder: pass the folder itself as --out")
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a diki-edge model folder; --force replaces only a model "
                          "folder (one holding manifest.json)")
    if not (out_dir / MANIFEST_FILE).is_file():
        names = sorted(os.listdir(out_dir))
        entries = "entry" if len(names) == 1 else "entries"
        held = (f"holds {len(names)} {entries} ({', '.join(names[:5])}{', …' if len(names) > 5 else ''})" if names
                else "is empty")
        raise ExportError(f"{out_dir} {held} and no {MANIFEST_FILE}: not a diki-edge model folder; --force "
                          "replaces only a model folder, so nothing else is ever deleted (remove it yourself or "
                          "choose another --out)")


def _expected_bytes(clip, bank_path: Path, precision: str) -> int:
    """About the size of the model folder: the weights in the graph's precision (plus the float32 graph int8 is
    derived from, which sits beside it while quantising) and the bank."""
    params = sum(p.numel() for p in clip.parameters())
    per_param = {"fp32": 4, "fp16": 2, "int8": 5}[precision]
    return int(params * per_param + bank_path.stat().st_size)


@dataclass
class ExportPlan:
    """Everything :func:`check_export` verified before the long work: options, bank, backbone, output place."""

    bank_path: Path
    out_dir: Path
    bank: Any  # TaskBank
    backbone: Any  # diki_edge.backbone.Backbone
    digest: str  # weights SHA-256 of the unwrapped backbone
    diki: Any  # DikiCLIP around an unwrapped copy of the backbone
    calibrated: Any  # CalibratedDiki, the PyTorch reference of the graph
    preprocess: dict[str, Any]
    precision: str
    opset: int
    dynamo: bool
    skip_below: float
    force: bool
    tokenizer_spec: Any = None  # diki_edge_runtime.tokenizer.TokenizerSpec
    tokenizer_text: str = ""  # tokenizer.json, verified against the backbone's open_clip tokenizer

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.preprocess["size"][0]), int(self.preprocess["size"][1])

    @property
    def exporter(self) -> str:
        return "dynamo" if self.dynamo else "torchscript"


def check_export(bank_path: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None,
                 pretrained: str | None, backbone, precision: str, force: bool, opset: int, dynamo: bool,
                 skip_below: float, steps: _Steps) -> ExportPlan:
    """Options, output place, bank and backbone: every check that needs no export, done before the export."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if int(opset) < DEFAULT_OPSET:
        raise ExportError(f"opset {opset} is too old; diki-edge exports with opset >= {DEFAULT_OPSET}")
    if not skip_below >= 0.0:
        raise ExportError(f"skip_below must be >= 0 (got {skip_below})")
    out_dir = Path(out_dir)
    bank_path = Path(bank_path)
    _check_out_dir(out_dir, force)
    check_writable(out_dir, what="model folder", is_dir=True)  # folder and permissions, before any loading

    from diki_edge.calibrated import CalibratedDiki
    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge_export.graph import check_visual
    from diki_edge_runtime.bank import TaskBank

    bank = steps.run(f"loading bank {bank_path}", TaskBank.load, bank_path)
    if bank.num_tasks == 0:
        raise ExportError(f"{bank_path}: the bank has no tasks; add at least one task before exporting")
    if not bank.class_names:
        raise ExportError(f"{bank_path}: the bank's tasks have no classes")
    backbone, clip, digest = steps.run("loading backbone and checking its weights hash", _load_backbone,
                                       bank, model, pretrained, backbone)
    check_writable(out_dir, _expected_bytes(clip, bank_path, precision), what="model folder", is_dir=True)
    lay = bank.layout
    check_visual(clip.visual)
    try:
        diki = DikiCLIP(clip, residual_length=lay.residual_length, image_layers=lay.image_layers,
                        text_layers=lay.text_layers).eval()
    except (ValueError, TypeError) as exc:
        raise ExportError(f"the bank's adapter layout does not fit this backbone: {exc}") from None
    expected = layout_for(backbone, diki, levels=lay.calibration_levels, ridge=lay.ridge)
    expected.backbone = {**expected.backbone, "weights_sha256": digest}
    problem = expected.compatibility_problem(lay)
    if problem:
        raise ExportError(f"{bank_path}: bank does not fit this backbone: {problem}")
    calibrated = CalibratedDiki(diki, skip_below=skip_below).eval()
    from diki_edge_export.text import export_tokenizer

    prompts = sorted({t.template.format(c) for t in bank.tasks for c in t.classes} | {t.template for t in bank.tasks})
    tok_spec, tok_text = steps.run("checking the tokenizer against open_clip's", export_tokenizer,
                                   backbone.tokenizer, prompts)
    return ExportPlan(bank_path, out_dir, bank, backbone, digest, diki, calibrated,
                      preprocess_json(backbone.preprocess_cfg), precision, int(opset), bool(dynamo),
                      float(skip_below), force, tok_spec, tok_text)


def export_model(bank_path: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None = None,
                 pretrained: str | None = None, backbone=None, precision: str = "fp32", force: bool = False,
                 opset: int = DEFAULT_OPSET, dynamo: bool = DEFAULT_DYNAMO, skip_below: float = DEFAULT_SKIP_BELOW,
                 quiet: bool = False) -> ExportResult:
    """Export ``bank_path``'s backbone + calibrated inference to ``out_dir`` and validate it (see module doc).

    ``model``/``pretrained`` default to the backbone named in the bank; ``backbone`` (a loaded
    :class:`~diki_edge.backbone.Backbone`) skips loading. Raises :class:`ExportError` (or ``BankError`` /
    ``BackboneError``) with a readable message; on any failure ``out_dir`` is left untouched.

    Steps: :func:`check_export` (everything that can fail before the long work, the tokenizer included),
    then for every :func:`graph_targets` entry (the image graph, then the text graph) :func:`build_target` and
    :func:`validate_target` (against the PyTorch reference; raises when outside the bounds), and
    :func:`write_model_folder`; the folder is staged
    beside ``out_dir`` and renamed into place at the end.
    """
    t_start = time.perf_counter()
    steps = _Steps(quiet)
    plan = check_export(bank_path, out_dir, model=model, pretrained=pretrained, backbone=backbone,
                        precision=precision, force=force, opset=opset, dynamo=dynamo, skip_below=skip_below,
                        steps=steps)
    with staging_dir(plan.out_dir) as tmp:  # removed again on any failure
        results = {}
        for target in graph_targets(plan):
            results[target.file] = validate_target(plan, target, build_target(plan, target, tmp, steps), tmp, steps)
        manifest = write_model_folder(plan, tmp, results)
        _check_out_dir(plan.out_dir, force)  # again: something may have appeared there while exporting
        replace_dir(tmp, plan.out_dir)
    seconds = time.perf_counter() - t_start
    result = ExportResult(plan.out_dir, plan.out_dir / MODEL_FILE, manifest, seconds, dict(steps.timings))
    steps.console.print(f"[bold green]exported[/bold green] {plan.out_dir} ({precision}, "
                        f"{result.model_bytes / 1e6:.1f} MB graph, {seconds:.1f} s)")
    return result


def write_model_folder(plan: ExportPlan, tmp: Path, results: dict[str, TargetResult]) -> Manifest:
    """Complete the staged folder: the bank, ``preprocess.json`` and ``manifest.json`` beside the graph."""
    shutil.rmtree(tmp / "_fp32", ignore_errors=True)
    shutil.copyfile(plan.bank_path, tmp / BANK_FILE)
    (tmp / PREPROCESS_FILE).write_text(json.dumps(plan.preprocess, indent=2) + "\n")
    (tmp / TOKENIZER_FILE).write_text(plan.tokenizer_text, encoding="utf-8")
    manifest = _manifest(plan, results[MODEL_FILE], results[TEXT_MODEL_FILE], tmp)
    manifest.save(tmp)
    return manifest


def _manifest(plan: ExportPlan, validated: TargetResult, text: TargetResult, folder: Path) -> Manifest:
    import onnx
    import onnxruntime
    import torch

    import diki_edge

    io = resolved_io(plan.bank.layout, plan.image_size)
    return Manifest(
        inputs=io["inputs"],
        outputs=io["outputs"],
        files={"model": MODEL_FILE,
               **({"model_data": EXTERNAL_DATA_FILE} if (folder / EXTERNAL_DATA_FILE).exists() else {}),
               "bank": BANK_FILE, "preprocess": PREPROCESS_FILE},
        backbone={**plan.backbone.spec, "weights_sha256": plan.digest, "preprocess": plan.preprocess},
        bank_layout=plan.bank.layout.to_json(),
        bank={"tasks": plan.bank.task_names, "classes": len(plan.bank.class_names)},
        opset=plan.opset,
        exporter=plan.exporter,
        precision=plan.precision,
        skip_below=plan.skip_below,
        validation={name: v.to_json() for name, v in validated.validations.items()},
        validated_providers=validated.providers,
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                  "diki_edge": diki_edge.__version__},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        not_validated=validated.not_validated,
        text=TextSection(
            **resolved_io(plan.bank.layout, plan.image_size, plan.tokenizer_spec.context_length,
                          TEXT_GRAPH_INPUTS, TEXT_GRAPH_OUTPUTS),
            files={"model": TEXT_MODEL_FILE, "tokenizer": TOKENIZER_FILE},
            tokenizer=plan.tokenizer_spec.to_json(),
            validation={name: v.to_json() for name, v in text.validations.items()},
        ),
    )
