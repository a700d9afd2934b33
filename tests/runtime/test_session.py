"""Execution-provider logic of the runtime session, and the runtime's independence from torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from diki_edge_runtime.errors import RuntimeSetupError
from support import GOLDEN, TORCH_MODULES, block, run_blocked  # tests/support.py

MODEL = GOLDEN / "model" / "model.onnx"  # any real graph does; this one is committed (no onnx package needed)


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
    res = run_blocked("""
        import diki_edge_runtime  # importing works without ONNX Runtime
        from diki_edge_runtime.session import Session
        from diki_edge_runtime.errors import RuntimeSetupError
        try:
            Session(sys.argv[1])
        except RuntimeSetupError as exc:
            print(exc)
    """, str(MODEL), block=block(*TORCH_MODULES, "onnxruntime"))
    assert res.returncode == 0, res.stderr
    assert "diki-edge-runtime[cpu]" in res.stdout and "diki-edge-runtime[gpu]" in res.stdout


def test_cpu_session_reports_providers(tmp_path):
    from diki_edge_runtime.session import Session

    sess = Session(MODEL, provider="cpu", threads=1)
    assert sess.providers == ["CPUExecutionProvider"]
    assert not sess.on_cuda


def test_cuda_where_unavailable_is_an_error_not_a_fallback(tmp_path):
    from diki_edge_runtime.session import Session, cuda_unavailable_reason

    model = MODEL
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has CUDA")
    reason = cuda_unavailable_reason()
    assert reason and "CUDA" in reason and "diki-edge-runtime[gpu]" in reason
    with pytest.raises(RuntimeSetupError) as exc:
        Session(model, provider="cuda")
    msg = str(exc.value)
    assert "CUDA was requested" in msg and "diki-edge-runtime[gpu]" in msg and "CPUExecutionProvider" in msg


def test_cuda_provider_that_fails_to_start_is_reported(tmp_path, monkeypatch):
    """onnxruntime-gpu without working CUDA libraries silently runs on the CPU; we refuse instead."""
    from diki_edge_runtime import session as session_mod

    model = MODEL
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

    model = MODEL
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

    sess = Session(MODEL)
    handle = sess.prepare_bank({"a": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]})
    assert not handle.on_device and handle.host["a"].flags.c_contiguous
    assert handle.host["a"].tolist() == [[0.0, 2.0], [3.0, 5.0]]
