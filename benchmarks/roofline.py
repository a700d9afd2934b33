"""The roofline's two ends: how much work a graph does, and how fast this machine can do that kind of work.

* :func:`count_graph_flops` counts the floating-point operations of one run of an ONNX graph from the shapes its
  MatMul / Gemm / Conv nodes (and their quantised forms) actually ran with: ONNX Runtime's profiler records every
  node's input and output shapes, so data-dependent shapes — the calibrated graph's pass-2 sub-batch, empty for
  unfamiliar images — are counted as they happened, not guessed. The count runs with graph optimisations off so
  nodes keep their ONNX meaning. One multiply-add = 2 FLOP; element-wise work (softmax, LayerNorm, GELU, bias)
  is left out, as in the usual GFLOP figures of a ViT (ViT-B/16 at 224 px: ~35 GFLOP).
* :class:`PeakGemm` is one large GEMM through ONNX Runtime, in a session configured like the runtime's, on the
  same threads, timed in the same rounds as the graphs it bounds: float32 ``MatMul`` (MLAS SGEMM) and
  uint8 x int8 ``MatMulInteger`` (MLAS QGEMM, the kernel dynamic int8 quantisation runs; AVX512-VNNI / AVX-VNNI /
  AMX where the CPU has them). :class:`TorchPeakGemm` is the same GEMM through PyTorch (oneDNN / MKL): float32,
  and bfloat16 where the CPU has bf16 units (AMX-BF16 or AVX512-BF16; ONNX Runtime's CPU provider has no bf16
  arithmetic). A precision's peak is the fastest library's rate in the same round (:data:`PEAK_KINDS`).
"""

from __future__ import annotations

import math
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Timing, ort_session

# ops whose multiply-adds are counted; everything else is element-wise or data movement
MATMUL_OPS = {"MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul"}
GEMM_OPS = {"Gemm", "FusedGemm"}
CONV_OPS = {"Conv", "FusedConv", "ConvInteger"}
PEAK_SIZE = 4096  # M = N = K of the peak GEMM: 137 GFLOP, large enough for every kernel to reach steady state
ISA_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either gives the CPU bf16 dot-product units


def _shapes(records: list[dict[str, list[int]]]) -> list[list[int]]:
    """``[{"float": [1, 197, 768]}, ...]`` (the profiler's ``input_type_shape``) -> ``[[1, 197, 768], ...]``."""
    return [list(next(iter(r.values()))) for r in records]


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]], attrs: dict[str, Any]) -> int:
    """Multiply-add FLOP of one node run with these shapes (0 for ops that are not counted)."""
    if op in MATMUL_OPS:
        a, out = inputs[0], outputs[0]
        return 2 * math.prod(out) * (a[-1] if a else 1)
    if op in GEMM_OPS:
        a, out = inputs[0], outputs[0]
        k = a[0] if attrs.get("transA", 0) else a[1]
        return 2 * math.prod(out) * k
    if op in CONV_OPS:
        w, out = inputs[1], outputs[0]
        return 2 * math.prod(out) * math.prod(w[1:])  # w: [C_out, C_in / groups, *kernel]
    return 0


def count_graph_flops(model_path: Path | str, feeds: dict[str, np.ndarray], threads: int = 1) -> dict[str, Any]:
    """FLOP of one run of ``model_path`` on ``feeds``, from the shapes ONNX Runtime's profiler recorded.

    Returns the total, the total per op type, and the number of counted node runs.
    """
    import json

    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node}
    with tempfile.TemporaryDirectory(prefix="flops-") as tmp:
        sess = ort_session(model_path, threads=threads, opt_level="disable", profile_prefix=str(Path(tmp) / "p"))
        sess.run(None, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, int] = {}
    counted = 0
    for ev in trace:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        args = ev.get("args", {})
        op = args.get("op_name", "")
        if op not in MATMUL_OPS | GEMM_OPS | CONV_OPS:
            continue
        node = ev["name"][: -len("_kernel_time")]
        f = node_flops(op, _shapes(args.get("input_type_shape", [])), _shapes(args.get("output_type_shape", [])),
                       attrs.get(node, {}))
        by_op[op] = by_op.get(op, 0) + f
        counted += 1
    if not counted:
        raise ValueError(f"{model_path}: the profiler recorded no MatMul/Gemm/Conv node (nothing to count)")
    return {"flop": sum(by_op.values()), "by_op": by_op, "node_runs": counted}


def torch_flops(fn) -> int:
    """FLOP of ``fn()`` as PyTorch's own counter sees it (``torch.utils.flop_counter``): a cross-check of
    :func:`count_graph_flops` from the other side of the export.

    The counter (torch 2.14) has no formula for two CPU kernels on the calibrated model's path:
    ``nn.MultiheadAttention``'s inference fast path (one fused op: projections and attention would go uncounted),
    which is therefore off while counting — the work is the same — and the CPU flash-attention kernel behind
    ``scaled_dot_product_attention``, which gets the counter's own SDPA formula.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    mha = torch.backends.mha
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention}
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        mha.set_fastpath_enabled(previous)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------- the peak
def gemm_model(path: Path, n: int, kind: str) -> Path:
    """One ``n x n x n`` GEMM as an ONNX graph: ``A`` an input, ``B`` a constant (as weights are in the exported
    graphs, so ONNX Runtime pre-packs it). ``kind``: ``fp32`` (MatMul) or ``int8`` (MatMulInteger u8 x s8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        b = rng.standard_normal((n, n), dtype=np.float32)
        a_type, y_type, op = TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    elif kind == "int8":
        b = rng.integers(-127, 128, (n, n), dtype=np.int8)
        a_type, y_type, op = TensorProto.UINT8, TensorProto.INT32, "MatMulInteger"
    else:
        raise ValueError(f"unknown GEMM kind {kind!r} (fp32 or int8)")
    graph = helper.make_graph([helper.make_node(op, ["A", "B"], ["Y"], name="gemm")], f"peak_{kind}",
                              [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])],
                              initializer=[numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def gemm_input(n: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "fp32":
        return rng.standard_normal((n, n), dtype=np.float32)
    return rng.integers(0, 256, (n, n), dtype=np.uint8)


class PeakGemm:
    """One ``n``-cube GEMM through ONNX Runtime on ``threads`` threads, ready to be timed beside the graphs it
    bounds (in the same rounds, so the peak and the paths see the same load). ``flop``: 2 n^3."""

    def __init__(self, kind: str, threads: int, n: int = PEAK_SIZE):
        self.kind, self.n, self.flop = kind, n, 2 * n**3
        self._tmp = tempfile.TemporaryDirectory(prefix="peak-")
        self.session = ort_session(gemm_model(Path(self._tmp.name) / f"gemm_{kind}.onnx", n, kind), threads)
        self.feeds = {"A": gemm_input(n, kind)}

    def run(self) -> None:
        self.session.run(None, self.feeds)

    def rate(self, timing: Timing) -> float:
        """GFLOP/s (int8: GOP/s) at the timing's median."""
        return self.flop / timing.median / 1e9


@cache
def cpu_flags() -> tuple[str, ...]:
    """The ISA extensions of :data:`ISA_FLAGS` this CPU reports (``/proc/cpuinfo``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return tuple(f for f in ISA_FLAGS if f in flags)
    except OSError:
        pass
    return ()


def int8_kernel() -> str:
    """Which MLAS QGEMM kernel family ONNX Runtime dispatches u8 x s8 GEMMs to on this CPU (by its flags)."""
    flags = cpu_flags()
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("avx512f", "AVX512 (no VNNI)"), ("avx2", "AVX2 (no VNNI)")):
        if flag in flags:
            return name
    return "generic"


def has_bf16_units() -> bool:
    """Whether this CPU reports AMX-BF16 or AVX512-BF16 (a bf16 GEMM is then worth measuring)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def bf16_kernel() -> str:
    """Which bf16 units oneDNN runs bf16 GEMMs on here (by the CPU flags)."""
    flags = cpu_flags()
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none (emulated)"


class TorchPeakGemm:
    """One ``n``-cube GEMM through PyTorch (``torch.mm`` into a preallocated output, oneDNN/MKL on the CPU) in
    ``fp32`` or ``bf16``, on the threads PyTorch is set to; ``flop``: 2 n^3."""

    def __init__(self, kind: str, threads: int, n: int = PEAK_SIZE):
        import torch

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        if kind not in dtypes:
            raise ValueError(f"unknown GEMM kind {kind!r} for PyTorch (fp32 or bf16)")
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        self.kind, self.n, self.flop = kind, n, 2 * n**3
        self.a = torch.randn(n, n, generator=g).to(dtypes[kind])
        self.b = torch.randn(n, n, generator=g).to(dtypes[kind])
        self.out = torch.empty(n, n, dtype=dtypes[kind])

    def run(self) -> None:
        import torch

        with torch.inference_mode():
            torch.mm(self.a, self.b, out=self.out)

    def rate(self, timing: Timing) -> float:
        """GFLOP/s at the timing's median."""
        return self.flop / timing.median / 1e9


def peak_gemms(threads: int, n: int = PEAK_SIZE) -> dict[str, list[tuple[str, Any]]]:
    """Per precision, the ``(label, gemm)`` pairs whose fastest rate in a round is that precision's peak:
    fp32 through ONNX Runtime and PyTorch, int8 through ONNX Runtime, bf16 through PyTorch where the CPU has bf16
    units (:data:`PEAK_KINDS` order)."""
    peaks: dict[str, list[tuple[str, Any]]] = {
        "fp32": [(f"peak fp32 GEMM (ORT MatMul, {n}^3)", PeakGemm("fp32", threads, n)),
                 (f"peak fp32 GEMM (PyTorch mm, {n}^3)", TorchPeakGemm("fp32", threads, n))],
        "int8": [(f"peak int8 GEMM (ORT MatMulInteger u8 x s8, {n}^3)", PeakGemm("int8", threads, n))],
    }
    if has_bf16_units():
        peaks["bf16"] = [(f"peak bf16 GEMM (PyTorch mm, {bf16_kernel()}, {n}^3)", TorchPeakGemm("bf16", threads, n))]
    return peaks


PEAK_KINDS = ("fp32", "int8", "bf16")
