"""Execution-provider logic of the runtime session, and the runtime's independence from torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diki_edge_runtime.errors import RuntimeSetupError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from support import BLOCK_TORCH, run_blocked  # noqa: E402  (tests/support.py)


def _identity_model(path: Path) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_import_runtime_never_imports_torch():
    res = run_blocked("""
        import diki_edge_runtime, diki_edge_runtime.cli_predict
        from diki_edge_runtime import Predictor, Preprocess, load_rgb
        import numpy as np
        pre = Preprocess.from_config({"size": 32, "mean": [0.5]*3, "std": [0.5]*3})
        x = pre(load_rgb(np.zeros((40, 50, 3), np.uint8)))
        assert x.shape == (3, 32, 32)
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip")]
        assert not bad, bad
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_block_hook_really_blocks():
    res = run_blocked("import torch")
    assert res.returncode != 0 and "blocked import of torch" in res.stderr


def test_missing_onnxruntime_says_how_to_install(tmp_path):
    block = BLOCK_TORCH.replace('("torch", "torchvision", "open_clip")', '("torch", "torchvision", "open_clip", '
                                                                          '"onnxruntime")')
    res = run_blocked("""
        import diki_edge_runtime  # importing works without ONNX Runtime
        from diki_edge_runtime.session import Session
        from diki_edge_runtime.errors import RuntimeSetupError
        try:
            Session(sys.argv[1])
        except RuntimeSetupError as exc:
            print(exc)
    """, str(tmp_path / "model.onnx"), block=block)
    assert res.returncode == 0, res.stderr
    assert "diki-edge[cpu]" in res.stdout and "diki-edge[gpu]" in res.stdout


def test_cpu_session_reports_providers(tmp_path):
    from diki_edge_runtime.session import Session

    sess = Session(_identity_model(tmp_path / "m.onnx"), provider="cpu", threads=1)
    assert sess.providers == ["CPUExecutionProvider"]
    assert not sess.on_cuda


def test_cuda_where_unavailable_is_an_error_not_a_fallback(tmp_path):
    from diki_edge_runtime.session import Session, cuda_unavailable_reason

    model = _identity_model(tmp_path / "m.onnx")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has CUDA")
    reason = cuda_unavailable_reason()
    assert reason and "CUDA" in reason and "diki-edge[gpu]" in reason
    with pytest.raises(RuntimeSetupError) as exc:
        Session(model, provider="cuda")
    msg = str(exc.value)
    assert "CUDA was requested" in msg and "diki-edge[gpu]" in msg and "CPUExecutionProvider" in msg


def test_cuda_provider_that_fails_to_start_is_reported(tmp_path, monkeypatch):
    """onnxruntime-gpu without working CUDA libraries silently runs on the CPU; we refuse instead."""
    from diki_edge_runtime import session as session_mod

    model = _identity_model(tmp_path / "m.onnx")
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda path, sess_options=None, providers=None: real(path, sess_options=sess_options,
                                                                             providers=["CPUExecutionProvider"]))
    with pytest.raises(RuntimeSetupError) as exc:
        session_mod.Session(model, provider="cuda")
    assert "could not start its CUDA execution provider" in str(exc.value)


def test_bad_provider_threads_and_paths(tmp_path):
    from diki_edge_runtime.session import Session

    model = _identity_model(tmp_path / "m.onnx")
    with pytest.raises(RuntimeSetupError, match="unknown provider"):
        Session(model, provider="tpu")
    with pytest.raises(RuntimeSetupError, match="threads"):
        Session(model, threads=0)
    with pytest.raises(RuntimeSetupError, match="not found"):
        Session(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"garbage")
    with pytest.raises(RuntimeSetupError, match="cannot load"):
        Session(tmp_path / "junk.onnx")


def test_bank_handles_on_cpu_stay_on_the_host(tmp_path):
    from diki_edge_runtime.session import Session

    sess = Session(_identity_model(tmp_path / "m.onnx"))
    handle = sess.prepare_bank({"a": np.arange(3, dtype=np.float32)})
    assert not handle.on_device and handle.host["a"].flags.c_contiguous
