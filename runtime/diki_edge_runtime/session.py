"""One session interface over any ONNX Runtime execution provider (names and fall-back rules: providers.py).

* CPU (and every provider that reads host memory): the bank arrays are fed from host memory on every call (ONNX
  Runtime reads them in place, no copy).
* CUDA and TensorRT (``onnxruntime-gpu``, ``pip install diki-edge-runtime[gpu]``): the bank is uploaded to the device
  ONCE per bank (:meth:`Session.prepare_bank` builds device ``OrtValue``s) and bound by IO binding on every call,
  so only the pixels travel per call. Swapping the bank uploads the new one; calls in flight keep the bank they
  started with.
* A provider that cannot run here is an error that names it and the package that provides it — never a silent
  fall-back to the CPU (providers.py). :attr:`Session.providers` reports the providers the session actually runs
  with, as ONNX Runtime reports them; :attr:`Session.provider_notes` what a user-written chain skipped.
* ``low_memory``: ONNX Runtime's CPU memory arena and memory-pattern planning off (as immich does for its CLIP
  service), and GPU arenas grow by what is requested only: working memory is returned after each run instead of
  kept. It did not lower the peak RSS of a one-shot ViT-B/16 run (docs/benchmarks.md, throughput_vit).

``threads`` is bounded by :func:`max_threads` (the machine's cores x 4): far more intra-op threads than cores
only slows ONNX Runtime down, and very large counts make it hang while creating its thread pool.
``log_severity`` is the lowest ONNX Runtime log level printed to stderr (``diki-edge predict``: 4 = fatal only
under ``--quiet``, 3 = errors by default, 1 = info under ``--verbose``); it is applied to the session and to
ONNX Runtime's process-wide default logger, which prints the messages of session creation.

A :class:`Session` is safe to share between threads: ``InferenceSession.run`` is thread-safe, IO bindings are
created per call, and a :class:`BankHandle` is immutable.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.providers import CUDA_DEVICE_PROVIDERS, check_started, plan_providers, short_name

INSTALL_HINT = "pip install 'diki-edge-runtime[cpu]' (or 'diki-edge-runtime[gpu]' for CUDA and TensorRT)"
# GPU providers whose memory arena can be told to grow by what is requested only (low-memory mode).
_ARENA_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider")
THREADS_PER_CORE = 4
DEFAULT_LOG_SEVERITY = 3  # ONNX Runtime: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


def max_threads() -> int:
    """The most intra-op threads a session accepts: the machine's cores x :data:`THREADS_PER_CORE`."""
    return (os.cpu_count() or 1) * THREADS_PER_CORE

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


def import_onnxruntime(log_severity: int = DEFAULT_LOG_SEVERITY):
    """``onnxruntime``, or a :class:`RuntimeSetupError` saying how to install it.

    The first import prints ONNX Runtime's start-up log lines before any severity can be set (e.g. "Failed to
    persist telemetry device ID" when ``$XDG_CACHE_HOME`` / ``$HOME`` is read-only): those below ``log_severity``
    are dropped, every other line written to stderr meanwhile is passed on unchanged."""
    try:
        if "onnxruntime" in sys.modules or log_severity <= min(ORT_LOG_LEVELS.values()):
            import onnxruntime
        else:
            onnxruntime = _import_filtering_stderr(log_severity)
    except ImportError as exc:
        raise RuntimeSetupError(f"ONNX Runtime is not installed ({exc}); {INSTALL_HINT}") from None
    return onnxruntime


# The level letter of an ONNX Runtime log line ("[W:onnxruntime:Default, file.cc:613 ...] message").
ORT_LOG_LEVELS = {b"V": 0, b"I": 1, b"W": 2, b"E": 3, b"F": 4}
_ORT_LOG_LINE = re.compile(rb"\[([VIWEF]):onnxruntime:")


def _import_filtering_stderr(log_severity: int):
    """``import onnxruntime`` with file descriptor 2 captured, then replayed without ONNX Runtime's log lines of a
    level below ``log_severity`` (native code writes to the descriptor, so ``sys.stderr`` cannot catch them)."""
    try:
        capture = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # nowhere to capture (a read-only TMPDIR) or no descriptor 2: import as is
        import onnxruntime

        return onnxruntime
    with capture:
        sys.stderr.flush()
        try:
            os.dup2(capture.fileno(), 2)
            import onnxruntime
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().splitlines(keepends=True):
                level = _ORT_LOG_LINE.search(line)
                if level is None or ORT_LOG_LEVELS[level.group(1)] >= log_severity:
                    os.write(2, line)
    return onnxruntime


def provider_unavailable_reason(provider: str | Sequence[str] = "cuda") -> str | None:
    """Why ``provider`` (a name or a chain) cannot be used with the installed ONNX Runtime build, or None when the
    build offers it (whether it then starts is only known when a session starts)."""
    try:
        plan_providers(provider, import_onnxruntime())
    except RuntimeSetupError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class BankHandle:
    """Bank arrays ready for :meth:`Session.run`: host arrays (CPU) or device ``OrtValue``s (CUDA)."""

    host: Mapping[str, np.ndarray]
    device: Mapping[str, Any] = field(default_factory=dict)  # name -> OrtValue on the CUDA device

    @property
    def on_device(self) -> bool:
        return bool(self.device)


@dataclass(frozen=True)
class SessionSettings:
    """How every ONNX Runtime session of a model folder is opened (the image graph's and the text graph's alike):
    built once from the caller's options and passed down unchanged (see :class:`Session` for each field)."""

    provider: str | tuple[str, ...] = "cpu"
    threads: int | None = None
    device_id: int = 0
    io_binding: bool | None = None  # the image graph's only: the text graph never binds (see text.py)
    provider_options: Mapping[str, Mapping[str, Any]] | None = None
    low_memory: bool = False
    log_severity: int = DEFAULT_LOG_SEVERITY
    precision: str = "fp32"  # fp32 | bf16 | auto (precision.py); bf16 opens an OpenVINO session (ov_session.py)

    def open(self, model_path: str | os.PathLike, *, io_binding: bool | None = None,
             precision: str | None = None) -> Session:
        """A :class:`Session` for ``model_path`` with these settings (``io_binding`` and ``precision`` override the
        fields); at bf16 an :class:`~diki_edge_runtime.ov_session.OpenVinoSession`, which has the same interface."""
        from diki_edge_runtime.precision import resolve_precision

        if resolve_precision(self.precision if precision is None else precision, self.provider) == "bf16":
            from diki_edge_runtime.ov_session import OpenVinoSession

            return OpenVinoSession(model_path, self.threads, "bf16")  # type: ignore[return-value]
        return Session(model_path, self.provider, self.threads, self.device_id,
                       self.io_binding if io_binding is None else io_binding,
                       provider_options=self.provider_options, low_memory=self.low_memory,
                       log_severity=self.log_severity)


class GraphSignature:
    """What every session (ONNX Runtime's :class:`Session`, OpenVINO's ``OpenVinoSession``) answers about its graph
    from its ``input_types`` (name -> ONNX type string) and ``output_names``."""

    input_types: dict[str, str]
    output_names: list[str]

    def require(self, inputs: Sequence[str], outputs: Sequence[str], what: str) -> None:
        """Refuse a graph that lacks any of these inputs or outputs (``what`` names it in the error)."""
        absent = [n for n in inputs if n not in self.input_types]
        absent += [n for n in outputs if n not in self.output_names]
        if absent:
            raise RuntimeSetupError(f"{what} lacks inputs/outputs {absent}")

    def input_dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.input_types[name])


class Session(GraphSignature):
    """An ONNX Runtime session for one exported graph on one execution provider."""

    def __init__(self, model_path: str | os.PathLike, provider: str | Sequence[str] = "cpu",
                 threads: int | None = None, device_id: int = 0, io_binding: bool | None = None, *,
                 provider_options: Mapping[str, Mapping[str, Any]] | None = None, low_memory: bool = False,
                 log_severity: int = DEFAULT_LOG_SEVERITY):
        """``provider``: a name or a user-written chain (``"tensorrt,cuda,cpu"`` or a list; providers.py);
        ``provider_options``: ``{provider name: {option: value}}``; ``low_memory``: see the module docstring;
        ``io_binding``: bind the bank as ``OrtValue``s (default: on CUDA and TensorRT only; forcing it on the CPU
        runs the exact CUDA code path with host ``OrtValue``s, which is how it is tested without a GPU);
        ``log_severity``: the lowest ONNX Runtime log level printed (see the module docstring)."""
        ort = import_onnxruntime(int(log_severity))
        self._ort = ort
        if threads is not None and int(threads) < 1:
            raise RuntimeSetupError(f"threads must be >= 1, got {threads}")
        if threads is not None and int(threads) > max_threads():
            raise RuntimeSetupError(f"threads must be at most {max_threads()} ({os.cpu_count() or 1} cores x "
                                    f"{THREADS_PER_CORE}), got {threads}")
        if not 0 <= int(log_severity) <= 4:
            raise RuntimeSetupError(f"log_severity must be 0..4, got {log_severity}")
        path = Path(model_path)
        if not path.is_file():
            what = ("is a folder, not an ONNX model file" if path.is_dir() else
                    "is not a regular file (an ONNX model file is)" if os.path.lexists(path) and path.exists() else
                    "ONNX model file not found")
            raise RuntimeSetupError(f"{path}: {what}")
        self.device_id = int(device_id)
        plan = plan_providers(provider, ort, provider_options, self.device_id)
        self.low_memory = bool(low_memory)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = int(log_severity)  # provider failures are reported by us below
        ort.set_default_logger_severity(int(log_severity))
        if self.low_memory:
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
            for ort_id, opts in plan.register:
                if ort_id in _ARENA_PROVIDERS:
                    opts.setdefault("arena_extend_strategy", "kSameAsRequested")
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=options, providers=plan.ort_providers())
        except Exception as exc:
            names = ", ".join(short_name(i) for i, _ in plan.register)
            raise RuntimeSetupError(f"{path}: ONNX Runtime cannot load the model with the {names} execution "
                                    f"provider(s) ({str(exc).strip()})") from None
        self.plan = check_started(plan, self._sess.get_providers(), ort)
        self.providers: list[str] = list(self.plan.in_use)
        self.provider_notes: list[str] = list(self.plan.notes)
        self.primary: str = self.plan.primary or self.providers[0]
        on_device = self.primary in CUDA_DEVICE_PROVIDERS
        self.io_binding = on_device if io_binding is None else bool(io_binding)
        self.bank_device = "cuda" if on_device else "cpu"
        self.bank_uploads = 0  # how many banks were copied into OrtValues (once per bank, never per call)
        self.input_types = {i.name: i.type for i in self._sess.get_inputs()}
        self.input_shapes = {i.name: list(i.shape) for i in self._sess.get_inputs()}
        self.output_names = [o.name for o in self._sess.get_outputs()]

    @property
    def on_cuda(self) -> bool:
        """The graph runs on an NVIDIA GPU (CUDA or TensorRT): the bank lives on the device."""
        return self.bank_device == "cuda"

    @property
    def memory_settings(self) -> dict[str, Any]:
        """What ONNX Runtime was told about memory (read back from the session)."""
        opts = self._sess.get_session_options()
        return {"low_memory": self.low_memory, "cpu_mem_arena": bool(opts.enable_cpu_mem_arena),
                "mem_pattern": bool(opts.enable_mem_pattern)}

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

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward of any graph from host arrays (the text graph's entry point): ``{output name: array}``."""
        return dict(zip(self.output_names, self._sess.run(self.output_names, dict(feeds))))

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
