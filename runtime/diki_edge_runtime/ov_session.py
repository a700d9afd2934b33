"""The bf16 path: the exported graph run by OpenVINO's own runtime on the CPU, behind the interface of
:class:`diki_edge_runtime.session.Session` (``run``, ``run_feeds``, ``prepare_bank``, ``require``, ...).

Why OpenVINO's runtime and not ONNX Runtime's OpenVINO execution provider: ONNX Runtime's CPU provider has no bf16
arithmetic, and ``onnxruntime-openvino`` ships the same ``onnxruntime`` module as the ``onnxruntime`` wheel
(installing both leaves whichever came last), so it cannot sit beside the CPU build this runtime depends on. The
``openvino`` wheel (``pip install 'diki-edge-runtime[openvino]'``) reads the ONNX file itself, keeps the graph's
dynamic dimensions (tasks, classes, batch) and its ``If`` around pass 2, and with ``INFERENCE_PRECISION_HINT=bf16``
runs its matrix products in bf16 on AMX or AVX512-BF16 (accumulating in fp32).

The bank arrays are fed from host memory on every call, as on ONNX Runtime's CPU provider. One compiled model is
shared by every thread: each call makes its own infer request (OpenVINO's requests are not thread-safe, the
compiled model is).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.session import BankHandle, GraphSignature

OPENVINO_PACKAGE = "openvino (pip install 'diki-edge-runtime[openvino]')"
PROVIDER_NAME = "OpenVINO CPU (openvino runtime)"
_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)",
          "f64": "tensor(double)"}


def import_openvino():
    """``openvino``, or a :class:`RuntimeSetupError` naming the package that brings it."""
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeSetupError(f"the bf16 path needs OpenVINO, which is not installed ({exc}); it is provided by "
                                f"{OPENVINO_PACKAGE}") from None
    return openvino


def openvino_missing_reason() -> str | None:
    """Why the OpenVINO runtime cannot be used here, or None when it is installed."""
    try:
        import_openvino()
    except RuntimeSetupError as exc:
        return str(exc)
    return None


class OpenVinoSession(GraphSignature):
    """The graph compiled by OpenVINO for the CPU at ``precision`` (``bf16`` or ``fp32``)."""

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None, precision: str = "bf16"):
        ov = import_openvino()
        path = Path(model_path)
        if not path.is_file():
            raise RuntimeSetupError(f"{path}: ONNX model file not found")
        if threads is not None and int(threads) < 1:
            raise RuntimeSetupError(f"threads must be >= 1, got {threads}")
        if precision not in ("bf16", "fp32"):
            raise RuntimeSetupError(f"OpenVINO session precision {precision!r}: use bf16 or fp32")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:
            raise RuntimeSetupError(f"{path}: OpenVINO cannot compile the model for the CPU at {precision} "
                                    f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})") from None
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")  # read back: what the plugin really chose
        self.precision = "bf16" if hint == ov.Type.bf16 else "fp32" if hint == ov.Type.f32 else str(hint)
        if self.precision != precision:
            raise RuntimeSetupError(f"{path}: OpenVINO compiled the model at {self.precision}, not the {precision} "
                                    "asked for (the CPU plugin found no kernel for it)")
        self.openvino_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        self.providers: list[str] = [PROVIDER_NAME]
        self.provider_notes: list[str] = []
        self.primary = PROVIDER_NAME
        self.plan = SimpleNamespace(requested=["OpenVINO"], in_use=list(self.providers), notes=[])
        self.low_memory = False
        self.io_binding = False
        self.bank_device = "cpu"
        self.bank_uploads = 0
        self.on_cuda = False
        self.input_types = {p.get_any_name(): _TYPES.get(p.get_element_type().get_type_name(), "unknown")
                            for p in self._compiled.inputs}
        self.input_shapes = {p.get_any_name(): [d.get_length() if d.is_static else "?" for d in p.get_partial_shape()]
                             for p in self._compiled.inputs}
        self.output_names = [p.get_any_name() for p in self._compiled.outputs]

    @property
    def memory_settings(self) -> dict[str, Any]:
        return {"low_memory": False, "cpu_mem_arena": None, "mem_pattern": None}

    def prepare_bank(self, arrays: Mapping[str, np.ndarray]) -> BankHandle:
        return BankHandle({k: np.ascontiguousarray(v) for k, v in arrays.items()})

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._compiled.create_infer_request()  # per call: requests are not shared between threads
        result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        by_name = {port.get_any_name(): value for port, value in result.items()}
        return {name: np.array(by_name[name]) for name in self.output_names}

    def run(self, pixel_values: np.ndarray, bank: BankHandle) -> dict[str, np.ndarray]:
        pixels = np.ascontiguousarray(pixel_values, dtype=self.input_dtype("pixel_values"))
        return self.run_feeds({"pixel_values": pixels, **bank.host})
