"""``Predictor``: calibrated DIKI inference from an exported model folder, torch-free.

::

    from diki_edge_runtime import Predictor
    p = Predictor("model/", provider="cpu", threads=2)
    results = p.predict(["a.jpg", pil_image, numpy_hwc_uint8])   # one Prediction per input, in order
    Predictor("model/", provider="tensorrt,cuda,cpu", provider_options={"tensorrt": {"trt_fp16_enable": True}})
    p.load_bank("bank_v2.safetensors")                           # new tasks, same graph, no re-export
    p.predict(images, labels=["rocket", "car", "tree"])          # any labels, calibrated DIKI (labels.py)
    p.encode_text(["a red car"], task=None, weight=0.0)          # [N, D] text embeddings (text.py)

The model folder (written by ``diki_edge_export.export_model``)::

    model.onnx          the single graph (bank arrays are graph inputs: diki_edge_runtime/contract.py)
    bank.safetensors    the default bank (a TaskBank file)
    preprocess.json     the backbone's image transform (see diki_edge_runtime.preprocess)
    manifest.json       {"format_version": 1, "inputs": {name: {"shape", "dtype"}}, "outputs": {...},
                         "backbone": {..., "weights_sha256"}, "bank_layout": BankLayout.to_json(), ...,
                         "text": {...}}  (the text graph; absent in folders exported before it: image-only)
    text.onnx, tokenizer.json   the text encoder and its tokenizer (labels at prediction time, encode_text)

A bank is accepted only if it fits the graph: same backbone weights (hash), same adapted depth and widths, same
calibration grid (``BankLayout.compatibility_problem``), a supported format version and at least one task. Any
number of tasks and classes runs on the same graph. A refused bank leaves the previous one in use.

Thread safety: the bank in use is one immutable snapshot replaced atomically by :meth:`Predictor.load_bank`;
every :meth:`Predictor.predict` call works on the snapshot current when it starts.

Throughput: inputs are decoded and preprocessed by ``workers`` threads while the graph runs the previous batch in
the calling thread (diki_edge_runtime/pipeline.py); at most ``batch_size + 2 * workers`` inputs are in the pool
besides the batch being answered.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diki_edge_runtime.bank import BankLayout, TaskBank
from diki_edge_runtime.contract import (
    BANK_FILE,
    CALIB_SLOPE,
    INPUT_NAMES,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAMES,
    PREPROCESS_FILE,
    REQUIRED_OUTPUT_NAMES,
    Manifest,
)
from diki_edge_runtime.errors import BankError, RuntimeSetupError
from diki_edge_runtime.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageInput,
    describe_input,
    load_rgb,
)
from diki_edge_runtime.labels import DEFAULT_LABEL_CACHE_BYTES, LabelTables, label_prompts
from diki_edge_runtime.pipeline import check_workers, default_workers, ordered_map
from diki_edge_runtime.preprocess import Preprocess
from diki_edge_runtime.providers import short_name
from diki_edge_runtime.reading import file_identity
from diki_edge_runtime.session import DEFAULT_LOG_SEVERITY, BankHandle, SessionSettings, numpy_dtype
from diki_edge_runtime.text import TextEncoder, text_files

REEXPORT = ("was exported before diki-edge had a text encoder (no text section in its manifest); re-export it "
            "with `diki-edge export` to use labels, encode_text or embeddings")


@dataclass
class Prediction:
    """The result for one input. On failure only ``input``, ``index``, ``error`` and ``error_kind`` are set."""

    input: str  # the path as given, or a label such as "<PIL RGB 640x480 #2>"
    index: int  # position in the call's inputs
    task: str | None = None  # name of the selected task
    task_index: int | None = None
    weight: float | None = None  # calibrated familiarity M in [0, 1]
    top_k: list[tuple[str, float]] = field(default_factory=list)  # (class or label, probability)
    task_scores: np.ndarray | None = None  # [T] Gaussian log-density per task
    image_embeds: np.ndarray | None = None  # [D] final L2-normalised embedding
    frozen_embeds: np.ndarray | None = None  # [D] pass-1 (frozen encoder) embedding; None from old model folders
    error: str | None = None
    error_kind: str | None = None  # one of diki_edge_runtime.images.ERROR_KINDS

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str | None:
        """The top-1 class, or None."""
        return self.top_k[0][0] if self.top_k else None

    def to_json(self, embeddings: bool = False) -> dict[str, Any]:
        """The ``--json`` line schema (see :mod:`diki_edge_runtime.cli_predict`). Every string is valid Unicode
        (see :func:`json_text`) and every number finite (:meth:`Predictor._fill` guarantees it), so
        ``json.dumps(..., allow_nan=False)`` always succeeds and any strict JSON parser reads the line.
        ``embeddings`` fills ``image_embeds`` / ``frozen_embeds`` (null otherwise and on failure)."""
        def vector(v: np.ndarray | None) -> list[float] | None:
            return None if v is None or not embeddings else [float(x) for x in np.asarray(v, np.float32)]

        return {
            "input": json_text(self.input),
            "ok": self.ok,
            "task": None if self.task is None else json_text(self.task),
            "task_index": self.task_index,
            "weight": None if self.weight is None else round(float(self.weight), 6),
            "top_k": [{"class": json_text(c), "probability": round(float(p), 6)} for c, p in self.top_k],
            "image_embeds": vector(self.image_embeds),
            "frozen_embeds": vector(self.frozen_embeds),
            "error": None if self.ok else {"kind": self.error_kind, "message": json_text(self.error or "")},
        }


def json_text(text: str) -> str:
    """``text`` with lone surrogates spelled out as backslash text so that it encodes as UTF-8: an undecodable byte
    of a file name (``os.fsdecode``'s ``surrogateescape``) becomes ``\\xNN``, any other lone surrogate (a
    ``\\ud800`` escape in bank metadata) ``\\ud800``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class PredictorSettings:
    """Every option of a :class:`Predictor` but the bank, built once (by the CLI's and the server's options) and
    passed down: ``session`` to the image and text sessions alike (field meanings: :meth:`Predictor.__init__`)."""

    session: SessionSettings = SessionSettings()
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    workers: int | None = None
    fast_decode: bool = False
    label_cache_bytes: int = DEFAULT_LABEL_CACHE_BYTES


@dataclass(frozen=True)
class _BankState:
    bank: TaskBank
    handle: BankHandle
    class_names: tuple[str, ...]
    class_task: np.ndarray  # [C] int64
    source: str
    labels: LabelTables | None  # label-set tables under this bank's text adapters (None: no text graph/adapters)


@dataclass(frozen=True)
class _Call:
    """What one predict call fixes at its start: the bank snapshot, top-k, and the labels (or None)."""

    state: _BankState
    top_k: int
    labels: list[str] | None = None
    prompts: tuple[str, ...] | None = None


class Predictor:
    """Calibrated inference through ONNX Runtime (see the module docstring)."""

    def __init__(self, model_dir: str | os.PathLike, provider: str | Sequence[str] = "cpu",
                 threads: int | None = None, bank: str | os.PathLike | TaskBank | None = None, *,
                 settings: PredictorSettings | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, device_id: int = 0, io_binding: bool | None = None,
                 provider_options: dict[str, dict[str, Any]] | None = None, low_memory: bool = False,
                 workers: int | None = None, fast_decode: bool = False,
                 log_severity: int = DEFAULT_LOG_SEVERITY, label_cache_bytes: int = DEFAULT_LABEL_CACHE_BYTES,
                 precision: str = "fp32"):
        """Open an exported model folder.

        ``settings``: every option below as one :class:`PredictorSettings` (what ``diki-edge predict`` and
        ``diki-edge serve`` build from their options); give it or the keyword options, not both.
        ``provider``: an execution provider name (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``coreml``,
        ``rocm``, ``migraphx``, ``dml`` or an ONNX Runtime id) or a fall-back chain written out
        (``"tensorrt,cuda,cpu"``); one that cannot run is an error, never a silent CPU run
        (diki_edge_runtime/providers.py); ``provider_options``: ``{provider: {option: value}}``;
        ``threads``: ONNX Runtime intra-op threads (default: ONNX Runtime's choice); ``bank``: a bank file or
        :class:`TaskBank` to use instead of the folder's ``bank.safetensors``; ``max_pixels``: inputs with more
        pixels are refused (decompression bombs), ``None`` for no limit; ``device_id``: the GPU;
        ``io_binding``: keep the bank in ``OrtValue``s bound per call (default: on CUDA / TensorRT only);
        ``low_memory``: ONNX Runtime's memory arena and memory patterns off (memory returned after each run);
        ``workers``: decode threads overlapped with inference (default: one per core, at most 8; 0 decodes in the
        calling thread); ``fast_decode``: decode JPEG files at a reduced DCT scale before the exact resize (faster,
        slightly different pixels: see README.md); ``log_severity``: the lowest ONNX Runtime log level
        printed (0 verbose .. 4 fatal; see ``session.DEFAULT_LOG_SEVERITY``); ``label_cache_bytes``: bound on the
        cached text tables of label sets (per bank, LRU; labels.py); ``precision``: ``fp32`` (default), ``bf16``
        (OpenVINO on a CPU with AMX / AVX512-BF16) or ``auto`` (bf16 where it runs and agrees with fp32 on a probe
        batch, else fp32; precision.py).
        Raises :class:`RuntimeSetupError` / :class:`BankError` with a message naming the problem.
        """
        session = SessionSettings(provider if isinstance(provider, str) else tuple(provider), threads, device_id,
                                  io_binding, provider_options, low_memory, log_severity, precision)
        given = PredictorSettings(session, max_pixels, workers, fast_decode, label_cache_bytes)
        if settings is not None and given != PredictorSettings():
            raise TypeError("Predictor takes settings=PredictorSettings(...) or keyword options, not both")
        self.settings = given if settings is None else settings
        self._open(Path(model_dir), self.settings, bank)

    def _open(self, model_dir: Path, settings: PredictorSettings, bank: str | os.PathLike | TaskBank | None) -> None:
        try:
            self.workers = default_workers() if settings.workers is None else check_workers(settings.workers)
        except ValueError as exc:
            raise RuntimeSetupError(str(exc)) from None
        self.fast_decode = bool(settings.fast_decode)
        self._draft = None  # set below once the preprocessing config is read
        self.model_dir = model_dir
        if not self.model_dir.is_dir():
            what = "is not a folder" if os.path.lexists(self.model_dir) else "model folder not found"
            raise RuntimeSetupError(f"{self.model_dir}: {what}")
        self.manifest = Manifest.load(self.model_dir)
        try:
            self.layout = BankLayout.from_json(self.manifest.bank_layout, f"{self.model_dir / MANIFEST_FILE}")
        except BankError as exc:
            raise RuntimeSetupError(str(exc).replace("metadata field layout", "field bank_layout")) from None
        # a folder exported before per-task calibration has no calib_* inputs: its graph applies the paper's mapping
        self.input_names = tuple(n for n in INPUT_NAMES if n in self.manifest.inputs)
        self._dtypes = {n: numpy_dtype(self.manifest.inputs[n]["dtype"]) for n in self.input_names}
        self.preprocess = Preprocess.from_file(self.model_dir / PREPROCESS_FILE)
        self._draft = self.preprocess.draft_size if self.fast_decode else None
        self.max_pixels = settings.max_pixels
        self.session = settings.session.open(self.model_dir / MODEL_FILE)
        self.session.require(self.input_names, REQUIRED_OUTPUT_NAMES, f"{self.model_dir / MODEL_FILE}: graph")
        for name in self.input_names:
            if self.session.input_dtype(name) != self._dtypes[name]:
                raise RuntimeSetupError(f"{self.model_dir}: manifest declares {name} as {self._dtypes[name]} but the "
                                        f"graph takes {self.session.input_types[name]}")
        graph_hw = self.session.input_shapes["pixel_values"][2:]
        if all(isinstance(d, int) for d in graph_hw) and tuple(graph_hw) != self.preprocess.size:
            raise RuntimeSetupError(f"{self.model_dir}: preprocess.json size {list(self.preprocess.size)} does not "
                                    f"match the graph's pixel_values {graph_hw}")
        self._lock = threading.Lock()
        self._text: TextEncoder | None = None  # opened on first use: image-only callers never pay for it
        # what the text files are now, beside the image graph just opened: a text graph opened later must be the
        # same files (a folder re-exported meanwhile would pair the new text graph with the old image graph)
        self._text_identity = self._text_files_identity()
        self.label_cache_bytes = int(settings.label_cache_bytes)
        self._state: _BankState | None = None
        self.load_bank(bank if bank is not None else self.model_dir / BANK_FILE)
        self.precision_notes: list[str] = []
        if settings.session.precision.strip().lower() == "auto" and self.compute_precision == "bf16":
            self._validate_auto_bf16(settings.session)

    PROBE_BATCH = 8

    def _validate_auto_bf16(self, session_settings: SessionSettings) -> None:
        """``precision="auto"`` chose bf16: keep it only if it agrees with an fp32 run of the same graph on a probe
        batch (seeded noise in the graph's pixel space, the current bank); else reopen at fp32 and say why."""
        from diki_edge_runtime.precision import disagreements
        from diki_edge_runtime.tolerances import BF16_MIN_COSINE

        fp32 = session_settings.open(self.model_dir / MODEL_FILE, precision="fp32")
        rng = np.random.default_rng(0)
        pixels = rng.normal(size=(self.PROBE_BATCH, 3, *self.preprocess.size)).astype(np.float32)
        fp32_bank = fp32.prepare_bank(self._state.handle.host)  # host arrays: both sessions read them in place
        problems = disagreements(fp32.run(pixels, fp32_bank), self.session.run(pixels, self._state.handle),
                                 BF16_MIN_COSINE)
        if problems:
            self.precision_notes.append(f"auto: bf16 disagreed with fp32 on the probe batch ({'; '.join(problems)}); "
                                        "running fp32")
            with self._lock:
                self.session = fp32
                self._state = dataclasses.replace(self._state, handle=fp32_bank)
        else:
            self.precision_notes.append(f"auto: bf16 agrees with fp32 on a probe batch of {self.PROBE_BATCH} (same "
                                        f"task and top-1, embedding cosine >= {BF16_MIN_COSINE})")

    @property
    def compute_precision(self) -> str:
        """The arithmetic the image graph runs in: ``bf16`` (OpenVINO), else the graph's own (fp32, fp16, int8)."""
        return getattr(self.session, "precision", None) or self.manifest.precision

    # ----------------------------------------------------------------- introspection
    @property
    def providers(self) -> list[str]:
        """The ONNX Runtime execution providers the session actually runs with, in priority order."""
        return list(self.session.providers)

    @property
    def bank(self) -> TaskBank:
        assert self._state is not None
        return self._state.bank

    @property
    def tasks(self) -> list[str]:
        return self.bank.task_names

    @property
    def classes(self) -> list[str]:
        return list(self._state.class_names) if self._state else []

    def info(self) -> dict[str, Any]:
        state = self._state
        return {
            "model_dir": str(self.model_dir),
            "providers": self.providers,
            "requested_providers": [short_name(i) for i in self.session.plan.requested],
            "provider_notes": list(self.session.provider_notes),
            "memory": self.session.memory_settings,
            "workers": self.workers,
            "fast_decode": self.fast_decode,
            "backbone": self.manifest.backbone,
            "precision": self.manifest.precision,
            "compute": self.compute_info(),
            "image_size": list(self.preprocess.size),
            "bank": state.source if state else None,
            "tasks": [{"name": t.name, "classes": len(t.classes)} for t in state.bank.tasks] if state else [],
        }

    def compute_info(self) -> dict[str, Any]:
        """Which precision, engine and CPU matrix kernels run the image graph, and what was asked."""
        from diki_edge_runtime.cpu_features import read_cpu_features

        cpu = read_cpu_features()
        precision = self.compute_precision
        kernels = (cpu.bf16_kernels if precision == "bf16" else cpu.int8_kernels if precision == "int8" else
                   [f for f in ("avx512f", "avx2", "fma") if f in cpu.flags])
        return {"precision": precision, "requested": self.settings.session.precision,
                "engine": "openvino" if precision == "bf16" else "onnxruntime", "providers": self.providers,
                "cpu": cpu.model_name, "cpu_kernels": kernels, "cpu_matrix_flags": cpu.kernels(),
                "notes": list(getattr(self, "precision_notes", []))}

    # ----------------------------------------------------------------- banks
    def load_bank(self, bank: str | os.PathLike | TaskBank) -> TaskBank:
        """Use another bank (more/fewer tasks, other classes) on the same graph; on failure keep the current one.

        Raises :class:`~diki_edge_runtime.errors.BankError` naming why the bank does not fit.
        """
        if isinstance(bank, TaskBank):
            problem = self.layout.compatibility_problem(bank.layout) or bank.finite_problem()
            if problem:
                raise BankError(f"bank does not fit this model: {problem}")
            loaded, source = snapshot(bank), "<TaskBank>"  # the caller's later edits must not reach predictions
        else:
            loaded = TaskBank.load(bank, expect=self.layout, graph_only=True, with_text=self.has_text)
            for arr in loaded.arrays.values():  # nobody else holds these: freezing them makes the snapshot immutable
                arr.setflags(write=False)
            source = os.fspath(bank)
        if loaded.num_tasks < 1:
            raise BankError(f"{source}: the bank has no tasks; the graph needs at least one")
        if CALIB_SLOPE not in self.input_names and not loaded.uses_paper_calibration():
            raise BankError(f"{source}: tasks {loaded.calibrated_task_names()} use a fitted calibration, but "
                            f"{self.model_dir} was exported before graphs took one (only the paper's mapping runs "
                            "there): re-export the model folder, or `diki-edge bank recalibrate BANK --method paper`")
        arrays = {}
        for name, arr in loaded.graph_inputs().items():
            if name not in self.input_names:
                continue
            expected = self.session.input_shapes.get(name, [])
            fixed = [(i, d) for i, d in enumerate(expected) if isinstance(d, int)]
            if len(expected) != arr.ndim or any(arr.shape[i] != d for i, d in fixed):
                raise BankError(f"{source}: bank array {name} has shape {list(arr.shape)}, the graph takes {expected}")
            arrays[name] = np.ascontiguousarray(arr, dtype=self._dtypes[name])
        with self._lock:  # serialise concurrent swaps; readers never wait
            handle = self.session.prepare_bank(arrays)  # CUDA: the only host->device copy of this bank
            labels = None
            if self.has_text and "text_k" in loaded.arrays:  # a new bank: label tables of the old one are dropped
                labels = LabelTables(self.text_encoder, loaded.arrays["text_k"], loaded.arrays["text_v"],
                                     self.layout.calibration_levels, self.layout.logit_scale, self.label_cache_bytes,
                                     on_progress=self._report_text_progress)
            self._state = _BankState(loaded, handle, tuple(loaded.class_names),
                                     np.asarray(loaded.arrays["class_task"], np.int64), source, labels)
        return loaded

    # ----------------------------------------------------------------- text
    # ``text_progress(done, total)``: called while label tables are built (prompts encoded of this build's total);
    # set it to report a long build (the CLI does), None for silence
    text_progress: Callable[[int, int], None] | None = None

    def _report_text_progress(self, done: int, total: int) -> None:
        if self.text_progress is not None:
            self.text_progress(done, total)

    @property
    def has_text(self) -> bool:
        """Whether the model folder has the text graph (labels, :meth:`encode_text`)."""
        return self.manifest.text is not None

    @property
    def has_frozen_embeds(self) -> bool:
        """Whether the image graph outputs the pass-1 embedding (``Prediction.frozen_embeds``)."""
        return "frozen_embeds" in self.session.output_names

    @property
    def label_tables(self) -> LabelTables | None:
        """The current bank's label-table cache (its ``nbytes``, ``len``), or None without a text graph."""
        return self._state.labels if self._state else None

    def text_encoder(self) -> TextEncoder:
        """The folder's :class:`TextEncoder`, opened on first use; a clear error for folders without one, and for
        text files that changed since this predictor opened the image graph (see :meth:`_text_files_identity`)."""
        if self._text is None:
            if not self.has_text:
                raise RuntimeSetupError(f"{self.model_dir}: the model folder {REEXPORT}")
            with self._lock:
                if self._text is None:
                    if self._text_files_identity() != self._text_identity:
                        raise RuntimeSetupError(
                            f"{self.model_dir}: the text graph or tokenizer changed since this predictor opened the "
                            "model folder (re-exported?); it would not match the image graph in use: open the "
                            "folder again (a new Predictor, or restart the command)")
                    self._text = TextEncoder(self.model_dir, self.manifest.text, self.settings.session)
        return self._text

    def _text_files_identity(self) -> tuple | None:
        """File identities (reading.file_identity) of the text graph and tokenizer, or None without a text graph."""
        if not self.has_text:
            return None
        return tuple(file_identity(p) for p in text_files(self.model_dir, self.manifest.text))

    def _state_with_labels(self) -> _BankState:
        state = self._state
        assert state is not None
        if state.labels is None:
            if not self.has_text:
                raise RuntimeSetupError(f"{self.model_dir}: the model folder {REEXPORT}")
            raise BankError(f"{state.source}: this bank was loaded without its text adapters (text_k/text_v); "
                            "load it from its file or in full to use labels")
        return state

    def encode_text(self, texts: str | Sequence[str], task: str | int | None = None,
                    weight: float | Sequence[float] = 0.0) -> np.ndarray:
        """``[N, D]`` L2-normalised text embeddings, torch-free: frozen (``task=None``, ``weight`` 0) or under a
        task's text adapter (name or index in the current bank) at ``M = weight`` (one value or one per text)."""
        state = self._state_with_labels()
        texts = [texts] if isinstance(texts, str) else list(texts)
        if task is None:
            if np.any(np.asarray(weight, np.float64) != 0):
                raise ValueError("a weight M other than 0 needs a task (task=None is the frozen text encoder)")
            index = 0
        elif isinstance(task, str):
            if task not in state.bank.task_names:
                raise ValueError(f"no task named {task!r} in the bank (tasks: {state.bank.task_names})")
            index = state.bank.task_names.index(task)
        else:
            index = int(task)
            if not 0 <= index < state.bank.num_tasks:
                raise ValueError(f"task index {index} out of range for a bank of {state.bank.num_tasks} tasks")
        w = np.asarray(weight, np.float32)
        if w.ndim and len(w) != len(texts):
            raise ValueError(f"{len(w)} weights for {len(texts)} texts")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w > 1):
            raise ValueError(f"weight M must be within [0, 1], got {weight!r}")
        encoder = self.text_encoder()
        if not texts:
            return np.zeros((0, self.layout.embed_dim), np.float32)
        return encoder.encode_tokens(encoder.tokens(texts), state.labels.text_k, state.labels.text_v, index, w)

    # ----------------------------------------------------------------- inference
    def pixel_values(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Decode and preprocess images into the graph's ``pixel_values`` ``[B, 3, H, W]`` (float32), exactly as
        :meth:`predict` does; a bad image raises its :class:`~diki_edge_runtime.images.ImageError`."""
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        return np.stack([self.preprocess(load_rgb(im, self.max_pixels, i, self._draft, keep_gray=True))
                         for i, im in enumerate(images)])

    def feeds(self, pixel_values: np.ndarray, bank_arrays: dict[str, np.ndarray] | None = None
              ) -> dict[str, np.ndarray]:
        """Every graph input by name, cast to the graph's dtypes: ``pixel_values`` plus the current bank's arrays
        (or ``bank_arrays``, e.g. a bank's ``graph_inputs()`` with another class table)."""
        state = self._state
        assert state is not None
        arrays = state.handle.host if bank_arrays is None else bank_arrays
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=self._dtypes["pixel_values"])}
        for name in self.input_names[1:]:
            feeds[name] = np.ascontiguousarray(arrays[name], dtype=self._dtypes[name])
        return feeds

    def run_arrays(self, pixel_values: np.ndarray, bank_arrays: dict[str, np.ndarray] | None = None,
                   batch_size: int | None = None) -> dict[str, np.ndarray]:
        """The graph's raw outputs (``contract.OUTPUT_NAMES``) for preprocessed pixels ``[B, 3, H, W]``.

        Under the current bank, or under explicit ``bank_arrays`` (the graph inputs other than ``pixel_values``;
        on CUDA those are uploaded once per call). ``batch_size`` splits the pixels into forwards of at most that
        many images. No per-image error isolation: this is the evaluator's and the benchmarks' entry point.
        """
        state = self._state
        assert state is not None
        if bank_arrays is None:
            handle = state.handle
        else:
            feeds = self.feeds(pixel_values[:0], bank_arrays)
            handle = self.session.prepare_bank({k: v for k, v in feeds.items() if k != "pixel_values"})
        n = len(pixel_values)
        step = n if not batch_size else int(batch_size)
        outs = [self.session.run(pixel_values[i:i + step], handle) for i in range(0, max(n, 1), max(step, 1))]
        return {name: np.concatenate([o[name] for o in outs]) for name in OUTPUT_NAMES if name in outs[0]}

    def predict(self, inputs: ImageInput | Sequence[ImageInput], top_k: int = 5, batch_size: int = 8,
                on_progress: Callable[[int], None] | None = None, labels: Sequence[str] | None = None,
                template: str | None = None) -> list[Prediction]:
        """One :class:`Prediction` per input, in order; a bad input gets its error, the others are predicted.

        ``labels``: classify among these labels instead of the bank's classes, with ``template`` (default
        ``"a photo of a {}."``): the image path is unchanged (task and ``M`` from the Gaussians, pass 2), the labels
        are encoded under the selected task's text adapter at the image's ``M`` (:mod:`diki_edge_runtime.labels`).
        """
        return list(self.iter_predict(inputs, top_k=top_k, batch_size=batch_size, on_progress=on_progress,
                                      labels=labels, template=template))

    def iter_predict(self, inputs: ImageInput | Sequence[ImageInput] | Iterable[ImageInput], top_k: int = 5,
                     batch_size: int = 8, on_progress: Callable[[int], None] | None = None,
                     labels: Sequence[str] | None = None, template: str | None = None) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding results batch by batch. Inputs are read lazily: at most the batch being
        answered plus ``batch_size + 2 * workers`` in the decode pool are held, whatever the number of inputs.

        Arguments, labels and the model's text graph are checked when this is called, before any image is read.
        """
        if isinstance(inputs, (str, os.PathLike, Image.Image, np.ndarray)):
            inputs = [inputs]
        return self._iter_chunks(inputs, self._call(top_k, batch_size, labels, template), batch_size, on_progress)

    def predict_pixels(self, pixel_values: np.ndarray, top_k: int = 5, batch_size: int = 8,
                       labels: Sequence[str] | None = None, template: str | None = None) -> list[Prediction]:
        """:meth:`predict` for images already preprocessed into ``[B, 3, H, W]`` (e.g. by the evaluator): the
        same selection, labels and results, without decoding (inputs are named ``<pixels #i>``)."""
        call = self._call(top_k, batch_size, labels, template)
        results: list[Prediction] = []
        for start in range(0, len(pixel_values), batch_size):
            pending = [Prediction(f"<pixels #{i}>", i)
                       for i in range(start, min(start + batch_size, len(pixel_values)))]
            self._run(np.asarray(pixel_values[start:start + batch_size]), pending, call)
            results += pending
        return results

    def decode(self, item: ImageInput, index: int = 0) -> tuple[Prediction, np.ndarray | None]:
        """Read and preprocess one input (thread-safe): its still empty result and its pixels, or the result
        with its error and no pixels. :meth:`predict_decoded` finishes it; a caller that decodes ahead in its own
        threads (the server, across requests) overlaps decoding with inference as :meth:`iter_predict` does."""
        return self._decode((index, item))

    def predict_decoded(self, decoded: Sequence[tuple[Prediction, np.ndarray | None]], top_k: int = 5,
                        batch_size: int = 8, labels: Sequence[str] | None = None,
                        template: str | None = None) -> list[Prediction]:
        """:meth:`predict` for inputs :meth:`decode` read: the same results, in order (failed decodes keep their
        errors and cost nothing)."""
        call = self._call(top_k, batch_size, labels, template)
        results: list[Prediction] = []
        for start in range(0, len(decoded), batch_size):
            results += self._predict_chunk(list(decoded[start:start + batch_size]), call)
        return results

    def _call(self, top_k: int, batch_size: int, labels: Sequence[str] | None, template: str | None) -> _Call:
        """Check a call's arguments (and, for labels, the text graph) and fix the bank snapshot it runs on."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if labels is None and template is None:
            state = self._state  # one bank for the whole call, even if another thread swaps it meanwhile
            assert state is not None
            return _Call(state, top_k)
        if labels is None:
            raise ValueError("a template needs labels")
        prompts = label_prompts(labels, template)
        state = self._state_with_labels()
        self.text_encoder()  # opened (and checked) now, before any image is read
        return _Call(state, top_k, list(labels), prompts)

    def _iter_chunks(self, inputs: Iterable[ImageInput], call: _Call, batch_size: int,
                     on_progress: Callable[[int], None] | None) -> Iterator[Prediction]:
        decoded = ordered_map(self._decode, enumerate(inputs), self.workers, ahead=batch_size + 2 * self.workers)
        chunk: list[tuple[Prediction, np.ndarray | None]] = []
        with closing(decoded):  # stopping early stops the decode threads too
            for pair in decoded:
                chunk.append(pair)
                if len(chunk) == batch_size:
                    yield from self._predict_chunk(chunk, call)
                    if on_progress:
                        on_progress(len(chunk))
                    chunk = []
        if chunk:
            yield from self._predict_chunk(chunk, call)
            if on_progress:
                on_progress(len(chunk))

    def _decode(self, indexed: tuple[int, ImageInput]) -> tuple[Prediction, np.ndarray | None]:
        """One input -> its (still empty) result and its pixels, or the result with its error and no pixels.
        Runs in a decode thread."""
        index, item = indexed
        res = Prediction(describe_input(item, index), index)
        try:
            return res, self.preprocess(load_rgb(item, self.max_pixels, index, self._draft, keep_gray=True))
        except ImageError as exc:
            res.error, res.error_kind = exc.message, exc.kind
        except Exception as exc:  # anything unexpected while decoding costs this image only
            res.error, res.error_kind = f"{res.input}: cannot decode: {type(exc).__name__}: {exc}", "unsupported"
        return res, None

    def _predict_chunk(self, chunk: list[tuple[Prediction, np.ndarray | None]], call: _Call) -> list[Prediction]:
        pending = [res for res, pixels in chunk if pixels is not None]
        if pending:
            self._run(np.stack([pixels for _, pixels in chunk if pixels is not None]), pending, call)
        return [res for res, _ in chunk]

    def _run(self, pixels: np.ndarray, pending: list[Prediction], call: _Call) -> None:
        try:
            out = self.session.run(pixels, call.state.handle)
        except Exception as exc:
            if len(pending) > 1:  # isolate the image that breaks the graph; the others still get answers
                for i, res in enumerate(pending):
                    self._run(pixels[i:i + 1], [res], call)
                return
            res = pending[0]
            res.error, res.error_kind = f"{res.input}: inference failed: {type(exc).__name__}: {exc}", "inference"
            return
        self._fill(out, pending, call)

    @staticmethod
    def _fill(out: dict[str, np.ndarray], pending: list[Prediction], call: _Call) -> None:
        """Results from the graph's outputs (the bank's classes, or the call's labels). A row with a task index out
        of range or any non-finite value the result depends on becomes that image's ``inference`` error: nothing
        non-finite is ever returned."""
        state = call.state
        tasks = state.bank.tasks
        label_logits = None
        if call.prompts is not None:  # rows whose task or M cannot be used are reported by _output_problem
            usable = [r for r in range(len(pending)) if 0 <= int(out["task"][r]) < len(tasks)
                      and 0.0 <= float(out["weight"][r]) <= 1.0]
            label_logits = np.full((len(pending), len(call.prompts)), np.nan)
            if usable:
                label_logits[usable] = state.labels.logits(call.prompts, out["image_embeds"][usable],
                                                           out["task"][usable], out["weight"][usable])
        for row, res in enumerate(pending):
            t = int(out["task"][row])
            if label_logits is None:
                cols = np.nonzero(state.class_task == t)[0] if 0 <= t < len(tasks) else np.zeros(0, np.int64)
                names: Sequence[str] = [state.class_names[c] for c in cols]
                logits = out["logits"][row, cols].astype(np.float64)
            else:
                names, logits = call.labels, label_logits[row].astype(np.float64)
            weight = float(out["weight"][row])
            scores, embeds = out["task_scores"][row], out["image_embeds"][row]
            problem = _output_problem(t, len(tasks), logits, weight, scores, embeds)
            if problem:
                res.error, res.error_kind = f"{res.input}: inference gave {problem}", "inference"
                continue
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")[:call.top_k]
            res.top_k = [(names[i], float(probs[i])) for i in order]
            res.task, res.task_index = tasks[t].name, t
            res.weight = weight
            res.task_scores = np.asarray(scores, np.float32).copy()
            res.image_embeds = np.asarray(embeds, np.float32).copy()
            if "frozen_embeds" in out:
                res.frozen_embeds = np.asarray(out["frozen_embeds"][row], np.float32).copy()


def snapshot(bank: TaskBank) -> TaskBank:
    """An immutable copy of ``bank`` for the predictor: its own read-only arrays and task metadata, so editing the
    caller's ``bank.arrays`` or ``bank.tasks`` in place later changes nothing the predictor uses."""
    arrays = {}
    for name, arr in bank.arrays.items():
        arrays[name] = np.array(arr, copy=True)
        arrays[name].setflags(write=False)
    return TaskBank(copy.deepcopy(bank.layout), copy.deepcopy(bank.tasks), arrays, graph_only=bank.graph_only)


def _output_problem(task: int, num_tasks: int, logits: np.ndarray, weight: float, scores: np.ndarray,
                    embeds: np.ndarray) -> str | None:
    """Why one image's graph outputs cannot be reported, or None (see :meth:`Predictor._fill`)."""
    if not 0 <= task < num_tasks:
        return f"task index {task} outside the bank's {num_tasks} tasks"
    if not len(logits):
        return f"no classes for task {task}"
    for name, values in (("logits", logits), ("task_scores", scores), ("image_embeds", embeds)):
        if not np.isfinite(values).all():
            return (f"non-finite {name} ({int(np.sum(~np.isfinite(values)))} of {np.size(values)} values); "
                    "the bank's values are out of range for this model")
    if not 0.0 <= weight <= 1.0:  # False for NaN too
        return f"a familiarity weight {weight} outside [0, 1]"
    return None
