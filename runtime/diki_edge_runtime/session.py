"""One session interface over ONNX Runtime's CPU and CUDA execution providers.

* ``provider="cpu"``: ``CPUExecutionProvider``; the bank arrays are fed from host memory on every call (ONNX
  Runtime reads them in place, no copy).
* ``provider="cuda"``: ``CUDAExecutionProvider`` (from the ``onnxruntime-gpu`` package, ``pip install
  diki-edge-runtime[gpu]``). The bank is uploaded to the device ONCE per bank (:meth:`Session.prepare_bank`
  builds device ``OrtValue``s) and bound by IO binding on every call, so only the pixels travel per call.
  Swapping the bank uploads the new one; calls in flight keep the bank they started with.
* Asking for CUDA where it cannot run is an error that says why (package without CUDA, CUDA/cuDNN libraries
  missing, no device) — never a silent fall-back to the CPU. :attr:`Session.providers` reports the providers the
  session actually runs with, as ONNX Runtime reports them.

A :class:`Session` is safe to share between threads: ``InferenceSession.run`` is thread-safe, IO bindings are
created per call, and a :class:`BankHandle` is immutable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diki_edge_runtime.errors import RuntimeSetupError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
INSTALL_HINT = "pip install 'diki-edge-runtime[cpu]' (or 'diki-edge-runtime[gpu]' for CUDA)"

_DTYPES = {
    "float32": np.float32, "float": np.float32, "tensor(float)": np.float32,
    "float16": np.float16, "half": np.float16, "tensor(float16)": np.float16,
    "int64": np.int64, "tensor(int64)": np.int64,
    "int32": np.int32, "tensor(int32)": np.int32,
    "float64": np.float64, "double": np.float64, "tensor(double)": np.float64,
}


def numpy_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(_DTYPES[str(name).lower()])
    except KeyError:
        raise RuntimeSetupError(f"unsupported tensor dtype {name!r} in the model") from None


def import_onnxruntime():
    """``onnxruntime``, or a :class:`RuntimeSetupError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeSetupError(f"ONNX Runtime is not installed ({exc}); {INSTALL_HINT}") from None
    return onnxruntime


def cuda_unavailable_reason(ort: Any | None = None) -> str | None:
    """Why the CUDA execution provider cannot be used here, or None when the installed package offers it."""
    ort = ort or import_onnxruntime()
    available = ort.get_available_providers()
    if PROVIDERS["cuda"] not in available:
        return (f"the installed onnxruntime {ort.__version__} has no CUDA execution provider (available: "
                f"{', '.join(available)}); install the GPU build: pip uninstall onnxruntime && "
                f"pip install 'diki-edge-runtime[gpu]'")
    return None


@dataclass(frozen=True)
class BankHandle:
    """Bank arrays ready for :meth:`Session.run`: host arrays (CPU) or device ``OrtValue``s (CUDA)."""

    host: Mapping[str, np.ndarray]
    device: Mapping[str, Any] = field(default_factory=dict)  # name -> OrtValue on the CUDA device

    @property
    def on_device(self) -> bool:
        return bool(self.device)


class Session:
    """An ONNX Runtime session for one exported graph on one execution provider."""

    def __init__(self, model_path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 device_id: int = 0, io_binding: bool | None = None):
        """``io_binding``: bind the bank as ``OrtValue``s (default: on CUDA only; forcing it on the CPU runs the
        exact CUDA code path with host ``OrtValue``s, which is how it is tested without a GPU)."""
        ort = import_onnxruntime()
        self._ort = ort
        key = str(provider).lower()
        if key not in PROVIDERS:
            raise RuntimeSetupError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
        if threads is not None and int(threads) < 1:
            raise RuntimeSetupError(f"threads must be >= 1, got {threads}")
        path = Path(model_path)
        if not path.is_file():
            raise RuntimeSetupError(f"{path}: ONNX model file not found")
        if key == "cuda":
            reason = cuda_unavailable_reason(ort)
            if reason:
                raise RuntimeSetupError(f"CUDA was requested but cannot be used: {reason}")
        self.requested = key
        self.device_id = int(device_id)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; provider failures are reported by us below
        if key == "cuda":
            providers: list[Any] = [(PROVIDERS["cuda"], {"device_id": self.device_id}), PROVIDERS["cpu"]]
        else:
            providers = [PROVIDERS["cpu"]]
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:
            where = "with the CUDA execution provider " if key == "cuda" else ""
            raise RuntimeSetupError(f"{path}: ONNX Runtime cannot load the model {where}({exc})") from None
        self.providers: list[str] = list(self._sess.get_providers())
        if key == "cuda" and PROVIDERS["cuda"] not in self.providers:
            raise RuntimeSetupError(
                "CUDA was requested but ONNX Runtime could not start its CUDA execution provider (CUDA or cuDNN "
                "libraries missing or of the wrong version, or no visible GPU: check nvidia-smi, "
                f"CUDA_VISIBLE_DEVICES and the onnxruntime-gpu requirements); providers that started: {self.providers}")
        self.io_binding = self.on_cuda if io_binding is None else bool(io_binding)
        self.bank_device = "cuda" if self.on_cuda else "cpu"
        self.bank_uploads = 0  # how many banks were copied into OrtValues (once per bank, never per call)
        self.input_types = {i.name: i.type for i in self._sess.get_inputs()}
        self.input_shapes = {i.name: list(i.shape) for i in self._sess.get_inputs()}
        self.output_names = [o.name for o in self._sess.get_outputs()]

    @property
    def on_cuda(self) -> bool:
        return PROVIDERS["cuda"] in self.providers

    def input_dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.input_types[name])

    def prepare_bank(self, arrays: Mapping[str, np.ndarray]) -> BankHandle:
        """Bank arrays (already in the graph's dtypes) -> a handle; with IO binding (CUDA) they are copied to the
        device here, once, and every later :meth:`run` binds those device buffers instead of copying again."""
        host = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        if not self.io_binding:
            return BankHandle(host)
        ort = self._ort
        try:
            device = {k: ort.OrtValue.ortvalue_from_numpy(v, self.bank_device, self.device_id)
                      for k, v in host.items()}
        except Exception as exc:
            raise RuntimeSetupError(f"cannot copy the bank to {self.bank_device} device {self.device_id}: "
                                    f"{exc}") from None
        self.bank_uploads += 1
        return BankHandle(host, device)

    def run(self, pixel_values: np.ndarray, bank: BankHandle) -> dict[str, np.ndarray]:
        """One forward: ``{output name: array}`` on the host."""
        pixels = np.ascontiguousarray(pixel_values, dtype=self.input_dtype("pixel_values"))
        if not bank.on_device:
            outputs = self._sess.run(self.output_names, {"pixel_values": pixels, **bank.host})
            return dict(zip(self.output_names, outputs))
        binding = self._sess.io_binding()  # per call: bindings are not shared between threads
        binding.bind_cpu_input("pixel_values", pixels)
        for name, value in bank.device.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self._sess.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
