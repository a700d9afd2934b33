"""The exporter's pipeline over graph targets: one :class:`GraphTarget` record per graph of the model folder
(``model.onnx``, ``text.onnx``) and the steps every target runs through, so that each is written once.

* :func:`graph_targets` — the targets of an :class:`~diki_edge_export.exporter.ExportPlan`: file, contract
  names and dynamic axes, module factory, example inputs, the module rewrite of the trace, validation cases,
  PyTorch reference, runner, validators and their bounds (:mod:`diki_edge_export.validate`).
* :func:`build_target` — ``torch.onnx.export`` (encoders in float16 for fp16) and ``onnx.checker``.
* :func:`validate_target` — the precision handling: fp32 against PyTorch; int8 derived from a validated fp32
  graph by ONNX Runtime dynamic quantisation and validated against fp32; fp16 on the first provider that has its
  kernels (GPU providers first). A failed bound raises :class:`~diki_edge_export.errors.ExportError`.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diki_edge_export.errors import ExportError
from diki_edge_runtime.contract import (
    EXTERNAL_DATA_FILE,
    INPUT_NAMES,
    MODEL_FILE,
    OUTPUT_NAMES,
    TEXT_GRAPH_INPUTS,
    TEXT_GRAPH_OUTPUTS,
    TEXT_INPUT_NAMES,
    TEXT_MODEL_FILE,
    TEXT_OUTPUT_NAMES,
    dynamic_axes,
)
from diki_edge_runtime.errors import DikiEdgeError

EXTERNAL_DATA_ABOVE = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom for the graph itself
Plan = Any  # diki_edge_export.exporter.ExportPlan (which imports this module)
Steps = Any  # diki_edge_export.exporter's progress printer: .run(label, fn, *args) and .console


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
    table.caption = ("p2: images that ran pass 2; embeds: max |Δ| (fp32) or min cosine (fp16/int8).  "
                     "fp32: embeds ≤ 1e-4, scores rel ≤ 1e-5, M ≤ 1e-5, same task/top-1.  "
                     f"fp16: cos ≥ {_v().FP16_MIN_COSINE}.  int8: cos ≥ {_v().INT8_MIN_COSINE}, "
                     f"top-1 ≥ {_v().INT8_MIN_TOP1_AGREEMENT:.0%}")
    table.caption_justify = "left"
    return table


def _v():
    from diki_edge_export import validate

    return validate


@dataclass
class GraphTarget:
    """One graph of the model folder: everything the pipeline needs to trace, derive and validate it.

    :func:`export_model` runs every target through the same steps (:func:`build_target`, :func:`validate_target`),
    so precision handling (fp16 encoders, int8 derived from a validated fp32 graph, the providers tried for fp16)
    is written once. The callables close over the :class:`ExportPlan`.
    """

    name: str  # "graph" or "text graph": how progress lines and errors name it
    file: str  # its file name in the model folder
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    axes: dict[str, dict[int, str]]  # dynamic axes of torch.onnx.export
    module: Callable[[Any], Any]  # encoder dtype -> the traceable nn.Module
    example: Callable[[], tuple]  # example inputs of the trace
    rewrite: Callable[[Any], AbstractContextManager]  # traced module -> the rewrite the trace runs under (graph.py)
    cases: Callable[[Steps], list]  # validation cases
    reference: Callable[[Steps, list], dict]  # the PyTorch reference of the cases
    runner: Callable[[Any], Callable]  # ONNX Runtime session -> runner of one case
    probe: Callable[[Callable, list], Any]  # one small run: raises when a provider lacks kernels
    validate_fp32: Callable[..., Any]  # (run, cases, refs, provider) -> Validation against PyTorch
    validate_variant: Callable[..., Any]  # (variant, run, cases, refs, provider, min_cosine, min_top1)
    report: Callable[[Steps, dict], None]  # prints the validation figures
    failed: str  # start of the error message when a bound fails


@dataclass
class TargetResult:
    """What :func:`validate_target` established for one target."""

    path: Path  # the final graph in the staging folder
    validations: dict[str, Any]  # variant -> Validation
    providers: list[str]  # providers whose validation passed
    not_validated: str | None


def _example_image_inputs(plan: Plan) -> tuple:
    import torch

    inputs = plan.bank.graph_inputs()
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, *plan.image_size, generator=g),) + tuple(
        torch.from_numpy(inputs[k].copy()) for k in INPUT_NAMES[1:])


def _example_text_inputs(plan: Plan) -> tuple:
    import torch

    ctx = plan.tokenizer_spec.context_length
    text_k = torch.from_numpy(np.ascontiguousarray(plan.bank.arrays["text_k"], np.float32))
    text_v = torch.from_numpy(np.ascontiguousarray(plan.bank.arrays["text_v"], np.float32))
    return (torch.ones(2, ctx, dtype=torch.int64), text_k, text_v, torch.zeros(2, dtype=torch.int64),
            torch.full((2,), 0.5))


def image_target(plan: Plan) -> GraphTarget:
    """``model.onnx``: the calibrated graph (:class:`diki_edge_export.graph.ExportGraph`) against ``CalibratedDiki``."""
    from diki_edge_export import validate as V
    from diki_edge_export.graph import ExportGraph, static_reshapes

    def cases(steps: Steps) -> list:
        return steps.run("preparing validation images (scikit-image) and probe bank", V.validation_cases,
                         plan.bank.graph_inputs(), plan.diki, plan.backbone.preprocess_cfg, plan.image_size)

    def validate_fp32(run, cases, refs, provider):
        return V.validate_fp32(plan.calibrated, run, cases, provider, refs)

    def validate_variant(variant, run, cases, refs, provider, min_cosine, min_top1=None):
        extra = () if min_top1 is None else (min_top1,)
        return V.validate_variant(variant, run, cases, provider, refs, min_cosine, *extra)

    def report(steps: Steps, validations: dict) -> None:
        if validations:
            steps.console.print(validation_table(validations))

    return GraphTarget(
        "graph", MODEL_FILE, INPUT_NAMES, OUTPUT_NAMES, dynamic_axes(),
        module=lambda dtype: ExportGraph(plan.calibrated, encoder_dtype=dtype),
        example=lambda: _example_image_inputs(plan),
        rewrite=lambda graph: static_reshapes(graph.diki.clip.visual),
        cases=cases,
        reference=lambda steps, cs: steps.run("PyTorch reference (CalibratedDiki)", V.reference_outputs,
                                              plan.calibrated, cs),
        runner=V.onnx_runner,
        probe=lambda run, cs: run(cs[0].pixels[:1], cs[0].inputs),
        validate_fp32=validate_fp32, validate_variant=validate_variant, report=report,
        failed="export validation failed, nothing was written")


def text_target(plan: Plan) -> GraphTarget:
    """``text.onnx``: :class:`diki_edge_export.text.TextGraph` against ``DikiCLIP.encode_text``."""
    from diki_edge.model import text_transformer
    from diki_edge_export import text as T
    from diki_edge_export.graph import frozen_attention_rewritten
    from diki_edge_runtime.tokenizer import ClipTokenizer

    def reference(steps: Steps, cases: list) -> dict:
        return steps.run("PyTorch reference (DikiCLIP.encode_text)",
                         lambda: {c.name: T.text_reference(plan.diki, c) for c in cases})

    def report(steps: Steps, validations: dict) -> None:
        for v in validations.values():
            steps.console.print(f"{'[green]✓[/green]' if v.passed else '[red]✗[/red]'} {v.variant} on "
                                f"{v.provider.replace('ExecutionProvider', '')}: "
                                + ", ".join(f"{k} {x:.3g}" if isinstance(x, float) else f"{k} {x}"
                                            for k, x in v.summary.items()))

    return GraphTarget(
        "text graph", TEXT_MODEL_FILE, TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES,
        dynamic_axes(TEXT_GRAPH_INPUTS + TEXT_GRAPH_OUTPUTS),
        module=lambda dtype: T.TextGraph(plan.diki, dtype),
        example=lambda: _example_text_inputs(plan),
        rewrite=lambda graph: frozen_attention_rewritten(text_transformer(graph.diki.clip).resblocks),
        cases=lambda steps: T.text_cases(plan.bank, ClipTokenizer(plan.tokenizer_text, plan.tokenizer_spec)),
        reference=reference,
        runner=T.text_runner,
        probe=lambda run, cs: run(cs[-1]),
        validate_fp32=T.validate_text_fp32, validate_variant=T.validate_text_variant, report=report,
        failed="text graph validation failed, nothing was written")


def graph_targets(plan: Plan) -> list[GraphTarget]:
    """The graphs of a model folder, in export order."""
    return [image_target(plan), text_target(plan)]


def _export_onnx(target: GraphTarget, graph, path: Path, opset: int, dynamo: bool) -> None:
    """``torch.onnx.export`` of one target's module with the contract's names."""
    import torch

    from diki_edge_export.graph import mha_fastpath_disabled

    kwargs: dict[str, Any] = dict(input_names=list(target.input_names), output_names=list(target.output_names),
                                  dynamic_axes=target.axes, opset_version=opset, dynamo=dynamo)
    if dynamo:
        kwargs.update(external_data=True, optimize=True)
    else:
        kwargs.update(do_constant_folding=True)
    try:
        with torch.no_grad(), mha_fastpath_disabled(), target.rewrite(graph), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, target.example(), str(path), **kwargs)
    except DikiEdgeError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (try dynamo=False, the default exporter)" if dynamo else ""
        raise ExportError(f"torch.onnx.export ({'dynamo' if dynamo else 'torchscript'}) failed: "
                          f"{type(exc).__name__}: {first[:500]}{hint}") from exc


def _finalize_onnx(scratch: Path, dest_dir: Path, name: str) -> Path:
    """Move the exported graph into ``dest_dir/name`` (external data when > 2 GB) and run the checker."""
    import onnx

    src = scratch / name
    total = sum(p.stat().st_size for p in scratch.iterdir() if p.is_file())
    dest = dest_dir / name
    if total > EXTERNAL_DATA_ABOVE or any(p.name != name for p in scratch.iterdir()):
        proto = onnx.load(str(src), load_external_data=True)
        onnx.save_model(proto, str(dest), save_as_external_data=total > EXTERNAL_DATA_ABOVE,
                        all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE, size_threshold=1024)
        del proto
    else:
        shutil.move(str(src), str(dest))
    onnx_check(dest)
    return dest


def build_target(plan: Plan, target: GraphTarget, tmp: Path, steps: Steps) -> Path:
    """Trace one target (encoders in float16 for fp16) and run the checker; returns the fp32/fp16 graph (in
    ``tmp`` itself, or in ``tmp/_fp32`` when int8 will be derived from it)."""
    import torch

    scratch = tmp / f"_scratch_{Path(target.file).stem}"
    scratch.mkdir()
    graph = target.module(torch.float16 if plan.precision == "fp16" else torch.float32).eval()
    detail = f" ({plan.exporter}, opset {plan.opset})"
    steps.run(f"exporting {plan.precision} {target.name}{detail}", _export_onnx, target, graph,
              scratch / target.file, plan.opset, plan.dynamo)
    del graph
    base_dir = tmp if plan.precision != "int8" else tmp / "_fp32"
    base_dir.mkdir(exist_ok=True)
    path = steps.run(f"onnx.checker ({target.file})", _finalize_onnx, scratch, base_dir, target.file)
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def _validate_fp16(target: GraphTarget, base_path: Path, cases: list, refs: dict,
                   steps: Steps) -> tuple[Any, str | None]:
    """The fp16 graph on the first provider that has its kernels (the GPU ones first, then the CPU)."""
    from diki_edge_export import validate as V

    cpu, reasons = "CPUExecutionProvider", []
    for provider in _fp16_providers() + [cpu]:
        try:
            run = target.runner(_session(base_path, provider))
            target.probe(run, cases)
        except Exception as exc:  # no fp16 kernels for some node on this provider
            reasons.append(f"{provider}: {str(exc).strip().splitlines()[0][:200]}")
            continue
        validation = steps.run(f"validating the fp16 {target.name} against fp32 ({provider})",
                               target.validate_variant, "fp16", run, cases, refs, provider, V.FP16_MIN_COSINE)
        note = ("fp16 validated on the CPU provider only; the CUDA provider it targets was not available here"
                if provider == cpu else None)
        return validation, note
    return None, ("fp16 graph not validated: no execution provider available here can run it ("
                  + "; ".join(reasons) + "); validate on a CUDA machine")


def validate_target(plan: Plan, target: GraphTarget, base_path: Path, tmp: Path,
                    steps: Steps) -> TargetResult:
    """Run one target in ONNX Runtime against its PyTorch reference (int8 derived from a validated fp32 graph);
    raises :class:`ExportError` listing every bound that failed."""
    from diki_edge_export import validate as V

    cases = target.cases(steps)
    refs = target.reference(steps, cases)
    validations: dict[str, Any] = {}
    providers: list[str] = []
    not_validated: str | None = None
    path, cpu = base_path, "CPUExecutionProvider"
    if plan.precision in ("fp32", "int8"):
        run = target.runner(steps.run(f"ONNX Runtime session (fp32 {target.name}, CPU)", _session, base_path, cpu))
        validations["fp32"] = steps.run(f"validating the fp32 {target.name} against PyTorch", target.validate_fp32,
                                        run, cases, refs, cpu)
        if validations["fp32"].passed:
            providers.append(cpu)
    if plan.precision == "int8" and validations["fp32"].passed:
        path = tmp / target.file
        steps.run(f"dynamic int8 quantisation ({target.file})", _quantize_int8, base_path, path)
        steps.run(f"onnx.checker ({target.file}, int8)", onnx_check, path)
        run = target.runner(steps.run(f"ONNX Runtime session (int8 {target.name}, CPU)", _session, path, cpu))
        validations["int8"] = steps.run(f"validating the int8 {target.name} against fp32", target.validate_variant,
                                        "int8", run, cases, refs, cpu, V.INT8_MIN_COSINE, V.INT8_MIN_TOP1_AGREEMENT)
    if plan.precision == "fp16":
        fp16, not_validated = _validate_fp16(target, base_path, cases, refs, steps)
        if fp16 is not None:
            validations["fp16"] = fp16
            if fp16.passed:
                providers.append(fp16.provider)
    target.report(steps, validations)
    failures = [f"{v.variant}: {msg}" for v in validations.values() for msg in v.failures]
    if failures:
        raise ExportError(f"{target.failed}:\n  " + "\n  ".join(failures))
    if not_validated:
        steps.console.print(f"[yellow]note:[/yellow] {not_validated}")
    return TargetResult(path, validations, providers, not_validated)


def onnx_check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected {path.name}: {exc}") from exc


