"""The roofline's counting and peak: FLOP from the shapes nodes ran with (known small graphs, a data-dependent
sub-batch), the peak GEMM graphs compute what they claim, and PyTorch's counter agrees on a small model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.roofline import PeakGemm, count_graph_flops, gemm_input, gemm_model, node_flops


def _save(tmp_path, nodes, inputs, outputs, inits, name="g.onnx"):
    import onnx

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[numpy_helper.from_array(v, k)
                                                                        for k, v in inits.items()])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def test_counts_matmul_gemm_conv_from_their_shapes(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),  # [2,3,4] x [4,5]: 2*2*3*4*5 = 240
             helper.make_node("Gemm", ["a", "G"], ["z"], name="gemm", transA=1),  # A^T [6,4] x [4,7]: 2*6*7*4 = 336
             helper.make_node("Conv", ["img", "C"], ["c"], name="conv", pads=[1, 1, 1, 1], group=2),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]  # not counted
    path = _save(tmp_path, nodes, [vi("x", [2, 3, 4]), vi("a", [4, 6]), vi("img", [1, 4, 8, 8])],
                 [vi("y", None), vi("z", None), vi("r", None)],
                 {"W": np.ones((4, 5), np.float32), "G": np.ones((4, 7), np.float32),
                  "C": np.ones((6, 2, 3, 3), np.float32)})
    feeds = {"x": np.ones((2, 3, 4), np.float32), "a": np.ones((4, 6), np.float32),
             "img": np.ones((1, 4, 8, 8), np.float32)}
    res = count_graph_flops(path, feeds)
    conv = 2 * (1 * 6 * 8 * 8) * (2 * 3 * 3)  # grouped: each output sees C_in / groups = 2 channels
    assert res["by_op"] == {"MatMul": 240, "Gemm": 336, "Conv": conv}
    assert res["flop"] == 240 + 336 + conv and res["node_runs"] == 3


def test_counts_the_sub_batch_that_actually_ran(tmp_path):
    """Rows selected by NonZero (like the calibrated graph's pass 2): the count follows the data, and a
    zero-row sub-batch costs nothing."""
    nodes = [helper.make_node("Gather", ["x", "zero"], ["col0"], axis=1),
             helper.make_node("Greater", ["col0", "thr"], ["sel"]),
             helper.make_node("NonZero", ["sel"], ["nz"]),
             helper.make_node("Reshape", ["nz", "flat"], ["idx"]),
             helper.make_node("Gather", ["x", "idx"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "W"], ["y"], name="pass2")]
    path = _save(tmp_path, nodes, [vi("x", ["B", 8])], [vi("y", None)],
                 {"W": np.ones((8, 16), np.float32), "zero": np.array(0, np.int64),
                  "thr": np.array(0.0, np.float32), "flat": np.array([-1], np.int64)})
    x = -np.ones((5, 8), np.float32)
    x[[1, 3], 0] = 1.0  # two of five rows selected
    assert count_graph_flops(path, {"x": x})["flop"] == 2 * 2 * 8 * 16
    assert count_graph_flops(path, {"x": -np.ones((5, 8), np.float32)})["flop"] == 0


def test_a_graph_without_counted_nodes_is_an_error(tmp_path):
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", None)], {})
    with pytest.raises(ValueError, match="no MatMul/Gemm/Conv"):
        count_graph_flops(path, {"x": np.ones(2, np.float32)})


def test_node_flops_quantised_matmul_counts_like_matmul():
    assert node_flops("MatMulInteger", [[3, 4], [4, 5]], [[3, 5]], {}) == node_flops("MatMul", [[3, 4], [4, 5]],
                                                                                      [[3, 5]], {})
    assert node_flops("Add", [[3, 4]], [[3, 4]], {}) == 0


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_peak_gemm_graphs_compute_a_gemm(tmp_path, kind):
    import onnx
    import onnxruntime as ort

    n = 32
    path = gemm_model(tmp_path / f"{kind}.onnx", n, kind)
    b = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    a = gemm_input(n, kind)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"A": a})
    expect = a.astype(np.float64) @ b.astype(np.float64)
    assert y.shape == (n, n)
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-3 if kind == "fp32" else 0)
    assert count_graph_flops(path, {"A": a})["flop"] == 2 * n**3


def test_peak_gemm_rate_from_timed_rounds():
    from benchmarks.common import time_fn

    peak = PeakGemm("fp32", threads=1, n=64)
    t = time_fn(peak.run, warmup=0, repeats=2)
    assert peak.flop == 2 * 64**3
    assert peak.rate(t) == pytest.approx(peak.flop / t.median / 1e9)
    assert t.load is not None
    with pytest.raises(ValueError, match="unknown GEMM kind"):
        PeakGemm("fp8", threads=1, n=8)


def test_onnx_count_matches_pytorch_counter(tmp_path):
    """The same small MLP + conv counted on both sides of an export."""
    import warnings

    import torch
    from torch import nn

    from benchmarks.roofline import torch_flops

    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.GELU(),
                          nn.Linear(32, 10)).eval()
    x = torch.randn(3, 3, 16, 16)
    path = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), input_names=["x"], opset_version=18, dynamo=False)
    onnx_flop = count_graph_flops(path, {"x": x.numpy()})["flop"]
    assert onnx_flop == torch_flops(lambda: model(x))
    assert onnx_flop == 2 * (3 * 8 * 4 * 4 * 3 * 4 * 4 + 3 * 128 * 32 + 3 * 32 * 10)


def test_pytorch_counter_sees_attention_on_the_inference_fast_path():
    """``nn.MultiheadAttention`` under ``inference_mode`` takes a fused fast path; its work is still counted."""
    import torch
    from torch import nn

    from benchmarks.roofline import torch_flops

    b, n, e = 2, 5, 16
    mha = nn.MultiheadAttention(e, 2, batch_first=True).eval()
    x = torch.randn(b, n, e)
    expect = 2 * b * n * e * 3 * e + 2 * (2 * b * n * n * e) + 2 * b * n * e * e  # in-proj, QK^T + AV, out-proj

    def run():
        with torch.inference_mode():
            mha(x, x, x, need_weights=False)

    assert torch_flops(run) == expect
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_torch_peak_gemm_computes_the_product_in_its_precision():
    """The PyTorch peak GEMM really multiplies (a timed no-op would inflate the peak): bf16 inputs, bf16 output.
    Bound: the inputs are bf16 already, so every product is exact in the float32 accumulator; accumulating 64 of
    them (|a_i b_i| <~ 16) errs by <= 64 * 2^-24 * 64 * 16 ~ 4e-3 at worst; the single rounding to bf16 (7 stored
    mantissa bits) errs by <= 2^-8 |x|. Checked as 1.25 * 2^-8 |x| + 1e-2 (25 % and 2.5x margins)."""
    import torch

    from benchmarks.roofline import TorchPeakGemm

    gemm = TorchPeakGemm("bf16", 1, 64)
    gemm.run()
    want = gemm.a.float() @ gemm.b.float()
    err = (gemm.out.float() - want).abs()
    assert gemm.out.dtype == torch.bfloat16 and bool((err <= 1.25 * 2**-8 * want.abs() + 1e-2).all())
    assert float(want.abs().max()) > 1.0  # not a degenerate product
    with pytest.raises(ValueError, match="unknown GEMM kind"):
        TorchPeakGemm("int8", 1, 8)
