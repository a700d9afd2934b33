"""Loaded by every Python process of a ``scripts/check_portability.py`` run (it is put first on ``PYTHONPATH``):
gives each ONNX Runtime session ``DIKI_PORTABILITY_ORT_THREADS`` intra-op threads unless the caller chose a number,
so the runtime, the export validation and the tests' own sessions all run with the thread count under test.
PyTorch takes its thread count from ``OMP_NUM_THREADS`` (set by the script) without help."""

import os
import sys

_THREADS = int(os.environ.get("DIKI_PORTABILITY_ORT_THREADS", "0") or 0)


def _patch(ort) -> None:
    original = ort.InferenceSession.__init__

    def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options if sess_options is not None else ort.SessionOptions()
        if options.intra_op_num_threads == 0:  # 0: ORT's default (every core); an explicit choice is kept
            options.intra_op_num_threads = _THREADS
        original(self, path_or_bytes, options, *args, **kwargs)

    ort.InferenceSession.__init__ = __init__


class _AfterImport:
    """A meta-path finder that patches ``onnxruntime`` right after its first import (never imports it itself)."""

    def find_spec(self, name, path=None, target=None):
        if name != "onnxruntime":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = patched
        return spec


if _THREADS > 0:
    sys.meta_path.insert(0, _AfterImport())
