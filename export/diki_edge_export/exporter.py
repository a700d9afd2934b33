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
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from diki_edge_runtime.contract import (
    BANK_FILE,
    MANIFEST_FILE,
    DEFAULT_OPSET,
    DEFAULT_SKIP_BELOW,
    EXTERNAL_DATA_FILE,
    INPUT_NAMES,
    MODEL_FILE,
    OUTPUT_NAMES,
    PRECISIONS,
    PREPROCESS_FILE,
    TEXT_GRAPH_INPUTS,
    TEXT_GRAPH_OUTPUTS,
    TEXT_INPUT_NAMES,
    TEXT_MODEL_FILE,
    TEXT_OUTPUT_NAMES,
    TOKENIZER_FILE,
    Manifest,
    TextSection,
    dynamic_axes,
    resolved_io,
)
from diki_edge_runtime.errors import DikiEdgeError
from diki_edge_runtime.files import check_writable, replace_dir, staging_dir

from diki_edge_export.errors import ExportError

DEFAULT_DYNAMO = False
EXTERNAL_DATA_ABOVE = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom for the graph itself


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


def _export_onnx(graph, example: tuple, path: Path, opset: int, dynamo: bool, text: bool = False) -> None:
    """``torch.onnx.export`` of the image graph (or, with ``text``, the text graph) with the contract's names."""
    import torch

    from diki_edge.model import _text_transformer
    from diki_edge_export.graph import frozen_attention_rewritten, mha_fastpath_disabled, static_reshapes

    if text:
        names, specs = (TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES), TEXT_GRAPH_INPUTS + TEXT_GRAPH_OUTPUTS
        rewrite = frozen_attention_rewritten(_text_transformer(graph.diki.clip).resblocks)
    else:
        names, specs = (INPUT_NAMES, OUTPUT_NAMES), None
        rewrite = static_reshapes(graph.diki.clip.visual)
    kwargs: dict[str, Any] = dict(input_names=list(names[0]), output_names=list(names[1]),
                                  dynamic_axes=dynamic_axes(specs) if specs else dynamic_axes(),
                                  opset_version=opset, dynamo=dynamo)
    if dynamo:
        kwargs.update(external_data=True, optimize=True)
    else:
        kwargs.update(do_constant_folding=True)
    try:
        with torch.no_grad(), mha_fastpath_disabled(), rewrite, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, example, str(path), **kwargs)
    except DikiEdgeError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (try dynamo=False, the default exporter)" if dynamo else ""
        raise ExportError(f"torch.onnx.export ({'dynamo' if dynamo else 'torchscript'}) failed: "
                          f"{type(exc).__name__}: {first[:500]}{hint}") from exc


def _finalize_onnx(scratch: Path, dest_dir: Path) -> Path:
    """Move the exported graph into ``dest_dir/model.onnx`` (external data when > 2 GB) and run the checker."""
    import onnx

    src = scratch / MODEL_FILE
    total = sum(p.stat().st_size for p in scratch.iterdir() if p.is_file())
    dest = dest_dir / MODEL_FILE
    if total > EXTERNAL_DATA_ABOVE or any(p.name != MODEL_FILE for p in scratch.iterdir()):
        proto = onnx.load(str(src), load_external_data=True)
        onnx.save_model(proto, str(dest), save_as_external_data=total > EXTERNAL_DATA_ABOVE,
                        all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE, size_threshold=1024)
        del proto
    else:
        shutil.move(str(src), str(dest))
    onnx_check(dest)
    return dest


def _inline_weight_identities(src: Path, dest: Path) -> None:
    """Point every consumer of ``Identity(initializer)`` at the initializer itself and drop the Identity.

    The tracing exporter de-duplicates the weights that pass 1 and pass 2 share through Identity nodes; the
    quantiser only quantises MatMuls whose B input *is* an initializer, so without this pass 2 would stay float32
    and the float32 weights would be kept next to the int8 ones.
    """
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    onnx.save(model, str(dest))


def _quantize_int8(src: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = dest.with_name("_prepared.onnx")
    _inline_weight_identities(src, prepared)
    src = prepared

    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint through the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)


def _session(path: Path, provider: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])


def _fp16_providers() -> list[str]:
    """Execution providers available here that have float16 kernels for the encoder (not the CPU EP)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider",
                        "CoreMLExecutionProvider") if p in available]


def validation_table(validations: dict[str, Any]):
    """A rich Table of the validation figures (one row per variant and case)."""
    from rich.table import Table

    providers = ", ".join(sorted({f"{n} on {v.provider.replace('ExecutionProvider', '')}"
                                  for n, v in validations.items()}))
    table = Table(title=f"validation: ONNX Runtime ({providers}) vs PyTorch CalibratedDiki", title_justify="left")
    for col in ("graph", "case", "n", "p2", "embeds", "scores", "M", "task", "top1"):
        table.add_column(col, justify="left" if col in ("graph", "case") else "right", no_wrap=True)
    for name, v in validations.items():
        mark = "[green]✓[/green]" if v.passed else "[red]✗[/red]"
        label = f"{mark} {name}"
        for c in v.cases:
            n = c["batch"]
            if name == "fp32":
                table.add_row(label, c["name"], str(n), str(c["pass2_rows"]), f"{c['embeds_max_abs']:.1e}",
                              f"{c['scores_max_rel']:.1e}", f"{c['weight_max_abs']:.0e}",
                              f"{n - c['task_mismatches']}/{n}", f"{n - c['top1_mismatches']}/{n}")
            else:
                table.add_row(label, c["name"], str(n), "", f"{c['cosine_min']:.5f}", "",
                              f"{c['weight_max_abs']:.0e}", f"{c['task_agree']}/{n}", f"{c['top1_agree']}/{n}")
    table.caption = ("p2: images that ran pass 2; embeds: max |Δ| (fp32) or min cosine (fp16/int8).  fp32: embeds ≤ 1e-4, scores rel ≤ 1e-5, M ≤ 1e-5, same task/top-1.  "
                     f"fp16: cos ≥ {_v().FP16_MIN_COSINE}.  int8: cos ≥ {_v().INT8_MIN_COSINE}, "
                     f"top-1 ≥ {_v().INT8_MIN_TOP1_AGREEMENT:.0%}")
    table.caption_justify = "left"
    return table


def _v():
    from diki_edge_export import validate

    return validate


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


@dataclass
class Validated:
    """What :func:`validate_graph` established: per-variant figures, the providers that passed, the final graph."""

    model_path: Path
    validations: dict[str, Any]
    providers: list[str]
    not_validated: str | None
    text_validations: dict[str, Any] = field(default_factory=dict)  # variant -> Validation of text.onnx


def export_model(bank_path: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None = None,
                 pretrained: str | None = None, backbone=None, precision: str = "fp32", force: bool = False,
                 opset: int = DEFAULT_OPSET, dynamo: bool = DEFAULT_DYNAMO, skip_below: float = DEFAULT_SKIP_BELOW,
                 quiet: bool = False) -> ExportResult:
    """Export ``bank_path``'s backbone + calibrated inference to ``out_dir`` and validate it (see module doc).

    ``model``/``pretrained`` default to the backbone named in the bank; ``backbone`` (a loaded
    :class:`~diki_edge.backbone.Backbone`) skips loading. Raises :class:`ExportError` (or ``BankError`` /
    ``BackboneError``) with a readable message; on any failure ``out_dir`` is left untouched.

    Steps: :func:`check_export` (everything that can fail before the long work, the tokenizer included),
    :func:`build_graph`, :func:`validate_graph` (against the PyTorch reference; raises when outside the bounds),
    :func:`build_text_graph`, :func:`validate_text_graph` and :func:`write_model_folder`; the folder is staged
    beside ``out_dir`` and renamed into place at the end.
    """
    t_start = time.perf_counter()
    steps = _Steps(quiet)
    plan = check_export(bank_path, out_dir, model=model, pretrained=pretrained, backbone=backbone,
                        precision=precision, force=force, opset=opset, dynamo=dynamo, skip_below=skip_below,
                        steps=steps)
    with staging_dir(plan.out_dir) as tmp:  # removed again on any failure
        base_path = build_graph(plan, tmp, steps)
        validated = validate_graph(plan, base_path, tmp, steps)
        text_base = build_text_graph(plan, tmp, steps)
        validated.text_validations = validate_text_graph(plan, text_base, tmp, steps)[1]
        manifest = write_model_folder(plan, tmp, validated)
        _check_out_dir(plan.out_dir, force)  # again: something may have appeared there while exporting
        replace_dir(tmp, plan.out_dir)
    seconds = time.perf_counter() - t_start
    result = ExportResult(plan.out_dir, plan.out_dir / MODEL_FILE, manifest, seconds, dict(steps.timings))
    steps.console.print(f"[bold green]exported[/bold green] {plan.out_dir} ({precision}, "
                        f"{result.model_bytes / 1e6:.1f} MB graph, {seconds:.1f} s)")
    return result


def check_export(bank_path: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None,
                 pretrained: str | None, backbone, precision: str, force: bool, opset: int, dynamo: bool,
                 skip_below: float, steps: "_Steps") -> ExportPlan:
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

    from diki_edge_runtime.bank import TaskBank

    from diki_edge.calibrated import CalibratedDiki
    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge_export.graph import check_visual

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


def build_graph(plan: ExportPlan, tmp: Path, steps: "_Steps") -> Path:
    """Trace the calibrated graph (encoders in float16 for fp16) and run the checker; returns the fp32/fp16 graph
    (in ``tmp`` itself, or in ``tmp/_fp32`` when int8 will be derived from it)."""
    import torch

    from diki_edge_export.graph import ExportGraph

    scratch = tmp / "_scratch"
    scratch.mkdir()
    inputs = plan.bank.graph_inputs()
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 3, *plan.image_size, generator=g),) + tuple(
        torch.from_numpy(inputs[k].copy()) for k in INPUT_NAMES[1:])
    encoder_dtype = torch.float16 if plan.precision == "fp16" else torch.float32
    graph = ExportGraph(plan.calibrated, encoder_dtype=encoder_dtype).eval()
    steps.run(f"exporting {plan.precision} graph ({plan.exporter}, opset {plan.opset})", _export_onnx, graph,
              example, scratch / MODEL_FILE, plan.opset, plan.dynamo)
    del graph
    base_dir = tmp if plan.precision != "int8" else tmp / "_fp32"
    base_dir.mkdir(exist_ok=True)
    base_path = steps.run("onnx.checker", _finalize_onnx, scratch, base_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return base_path


def build_text_graph(plan: ExportPlan, tmp: Path, steps: "_Steps") -> Path:
    """Trace the text graph (encoder in float16 for fp16) and run the checker; returns the fp32/fp16 text graph
    (in ``tmp``, or in ``tmp/_fp32`` when int8 will be derived from it)."""
    import torch

    from diki_edge_export.text import TextGraph

    scratch = tmp / "_text_scratch"
    scratch.mkdir()
    ctx = plan.tokenizer_spec.context_length
    text_k = torch.from_numpy(np.ascontiguousarray(plan.bank.arrays["text_k"], np.float32))
    text_v = torch.from_numpy(np.ascontiguousarray(plan.bank.arrays["text_v"], np.float32))
    example = (torch.ones(2, ctx, dtype=torch.int64), text_k, text_v, torch.zeros(2, dtype=torch.int64),
               torch.full((2,), 0.5))
    encoder_dtype = torch.float16 if plan.precision == "fp16" else torch.float32
    graph = TextGraph(plan.diki, encoder_dtype).eval()
    path = scratch / TEXT_MODEL_FILE
    steps.run(f"exporting {plan.precision} text graph", _export_onnx, graph, example, path, plan.opset, plan.dynamo,
              text=True)
    del graph
    base_dir = tmp if plan.precision != "int8" else tmp / "_fp32"
    base_dir.mkdir(exist_ok=True)
    dest = base_dir / TEXT_MODEL_FILE
    if any(p.name != TEXT_MODEL_FILE for p in scratch.iterdir()):  # dynamo writes weights beside the graph
        import onnx

        onnx.save_model(onnx.load(str(path), load_external_data=True), str(dest))
    else:
        shutil.move(str(path), str(dest))
    shutil.rmtree(scratch, ignore_errors=True)
    steps.run("onnx.checker (text)", onnx_check, dest)
    return dest


def validate_text_graph(plan: ExportPlan, base_path: Path, tmp: Path, steps: "_Steps") -> tuple[Path, dict]:
    """The text graph against ``DikiCLIP.encode_text`` (fp32) and, for fp16/int8, against fp32 (bounds of the
    image graph); returns the final text graph and ``{variant: Validation}``. Raises :class:`ExportError`."""
    from diki_edge_export import text as T
    from diki_edge_export import validate as V
    from diki_edge_runtime.tokenizer import ClipTokenizer

    cases = T.text_cases(plan.bank, ClipTokenizer(plan.tokenizer_text, plan.tokenizer_spec))
    refs = steps.run("PyTorch reference (DikiCLIP.encode_text)",
                     lambda: {c.name: T.text_reference(plan.diki, c) for c in cases})
    cpu = "CPUExecutionProvider"
    validations: dict[str, Any] = {}
    path = base_path
    if plan.precision in ("fp32", "int8"):
        run = T.text_runner(_session(base_path, cpu))
        validations["fp32"] = steps.run("validating the fp32 text graph", T.validate_text_fp32, run, cases, refs,
                                        cpu)
    if plan.precision == "int8" and validations["fp32"].passed:
        path = tmp / TEXT_MODEL_FILE
        steps.run("dynamic int8 quantisation (text)", _quantize_int8, base_path, path)
        steps.run("onnx.checker (text int8)", onnx_check, path)
        validations["int8"] = steps.run("validating the int8 text graph", T.validate_text_variant, "int8",
                                        T.text_runner(_session(path, cpu)), cases, refs, cpu, V.INT8_MIN_COSINE,
                                        V.INT8_MIN_TOP1_AGREEMENT)
    if plan.precision == "fp16":
        for provider in _fp16_providers() + [cpu]:
            try:
                run = T.text_runner(_session(base_path, provider))
                run(cases[-1])
            except Exception:  # no fp16 kernels for some node on this provider (reported by the image graph)
                continue
            validations["fp16"] = steps.run(f"validating the fp16 text graph ({provider})", T.validate_text_variant,
                                            "fp16", run, cases, refs, provider, V.FP16_MIN_COSINE)
            break
    for v in validations.values():
        steps.console.print(f"{'[green]✓[/green]' if v.passed else '[red]✗[/red]'} {v.variant} on "
                            f"{v.provider.replace('ExecutionProvider', '')}: "
                            + ", ".join(f"{k} {x:.3g}" if isinstance(x, float) else f"{k} {x}"
                                        for k, x in v.summary.items()))
    failures = [f"{v.variant}: {msg}" for v in validations.values() for msg in v.failures]
    if failures:
        raise ExportError("text graph validation failed, nothing was written:\n  " + "\n  ".join(failures))
    return path, validations


def validate_graph(plan: ExportPlan, base_path: Path, tmp: Path, steps: "_Steps") -> Validated:
    """Run the graph in ONNX Runtime against the PyTorch reference (and derive + validate int8 from a validated
    fp32 graph); raises :class:`ExportError` listing every bound that failed."""
    from diki_edge_export import validate as V

    inputs = plan.bank.graph_inputs()
    cases = steps.run("preparing validation images (scikit-image) and probe bank", V.validation_cases,
                      inputs, plan.diki, plan.backbone.preprocess_cfg, plan.image_size)
    refs = steps.run("PyTorch reference (CalibratedDiki)", V.reference_outputs, plan.calibrated, cases)
    validations: dict[str, Any] = {}
    providers: list[str] = []
    not_validated: str | None = None
    model_path = base_path
    cpu = "CPUExecutionProvider"
    if plan.precision in ("fp32", "int8"):
        sess = steps.run("ONNX Runtime session (fp32, CPU)", _session, base_path, cpu)
        validations["fp32"] = steps.run("validating fp32 against PyTorch", V.validate_fp32, plan.calibrated,
                                        V.onnx_runner(sess), cases, cpu, refs)
        del sess
        if validations["fp32"].passed:
            providers.append(cpu)
    if plan.precision == "int8" and validations["fp32"].passed:
        model_path = tmp / MODEL_FILE
        steps.run("dynamic int8 quantisation (onnxruntime.quantization)", _quantize_int8, base_path, model_path)
        steps.run("onnx.checker (int8)", onnx_check, model_path)
        sess = steps.run("ONNX Runtime session (int8, CPU)", _session, model_path, cpu)
        validations["int8"] = steps.run("validating int8 against fp32", V.validate_variant, "int8",
                                        V.onnx_runner(sess), cases, cpu, refs, V.INT8_MIN_COSINE,
                                        V.INT8_MIN_TOP1_AGREEMENT)
        del sess
    if plan.precision == "fp16":
        reasons = []
        for provider in _fp16_providers() + [cpu]:
            try:
                sess = _session(base_path, provider)
                run = V.onnx_runner(sess)
                run(cases[0].pixels[:1], cases[0].inputs)
            except Exception as exc:  # no fp16 kernels for some node on this provider
                reasons.append(f"{provider}: {str(exc).strip().splitlines()[0][:200]}")
                continue
            validations["fp16"] = steps.run(f"validating fp16 against fp32 ({provider})", V.validate_variant,
                                            "fp16", run, cases, provider, refs, V.FP16_MIN_COSINE)
            break
        if "fp16" not in validations:
            not_validated = ("fp16 graph not validated: no execution provider available here can run it ("
                             + "; ".join(reasons) + "); validate on a CUDA machine")
        elif validations["fp16"].provider == cpu:
            not_validated = "fp16 validated on the CPU provider only; the CUDA provider it targets was not available here"
        if validations.get("fp16") is not None and validations["fp16"].passed:
            providers.append(validations["fp16"].provider)

    if validations:
        steps.console.print(validation_table(validations))
    failures = [f"{name}: {msg}" for name, v in validations.items() for msg in v.failures]
    if failures:
        raise ExportError("export validation failed, nothing was written:\n  " + "\n  ".join(failures))
    if not_validated:
        steps.console.print(f"[yellow]note:[/yellow] {not_validated}")
    return Validated(model_path, validations, providers, not_validated)


def write_model_folder(plan: ExportPlan, tmp: Path, validated: Validated) -> Manifest:
    """Complete the staged folder: the bank, ``preprocess.json`` and ``manifest.json`` beside the graph."""
    shutil.rmtree(tmp / "_fp32", ignore_errors=True)
    shutil.copyfile(plan.bank_path, tmp / BANK_FILE)
    (tmp / PREPROCESS_FILE).write_text(json.dumps(plan.preprocess, indent=2) + "\n")
    (tmp / TOKENIZER_FILE).write_text(plan.tokenizer_text, encoding="utf-8")
    manifest = _manifest(plan, validated, tmp)
    manifest.save(tmp)
    return manifest


def onnx_check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected {path.name}: {exc}") from exc


def _manifest(plan: ExportPlan, validated: Validated, folder: Path) -> Manifest:
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
            validation={name: v.to_json() for name, v in validated.text_validations.items()},
        ),
    )
