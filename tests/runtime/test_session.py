"""Execution-provider logic of the runtime session, and the runtime's independence from torch."""

from __future__ import annotations

import numpy as np
import pytest
from support import GOLDEN, TORCH_MODULES, block, run_blocked  # tests/support.py

from diki_edge_runtime.errors import RuntimeSetupError

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


# Provider names, chains, options and dropped providers: tests/runtime/test_providers.py


def test_bad_provider_threads_and_paths(tmp_path):
    from diki_edge_runtime.session import Session

    model = MODEL
    with pytest.raises(RuntimeSetupError, match="unknown execution provider"):
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
