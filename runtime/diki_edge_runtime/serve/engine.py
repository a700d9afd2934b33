"""The model behind the server: one :class:`Predictor`, the dynamic batching queue in front of it, bank reloads
and idle unloading.

Batching: predict requests wait in one FIFO queue (at most ``queue_limit``; :class:`QueueFull` past it, answered
503 at once instead of growing memory). One worker thread takes the oldest request and, for at most
``max_wait_ms`` after it arrived, lets later requests with the same labels and template join it, up to
``batch_size`` images; the batch runs as one :meth:`Predictor.predict_decoded` call (top-k: the largest asked, cut
per request) and each request gets back only its own images, in its own order.

Decoding ahead: a request's images are read and preprocessed in a pool of decode threads (``workers``, as
``Predictor``) as soon as it is among the first ``2 * batch_size`` queued images, so the next batch decodes while
the current one runs (what :meth:`Predictor.iter_predict` does within one call) and at most about two batches of
decoded pixels wait in memory, whatever the queue holds.

Reload: :meth:`Engine.reload` re-reads the bank file the server was started with through
:meth:`Predictor.load_bank`, which swaps atomically or keeps the old bank; a batch already running keeps the
bank it started with, so every result belongs to the old bank or the new one.

Idle unload (immich's ``MACHINE_LEARNING_MODEL_TTL`` idea): after ``idle_unload`` seconds without a request the
worker drops the Predictor (its ONNX Runtime sessions and arenas) and asks glibc to return freed heap pages;
the next request opens it again from the same settings, with the last accepted bank kept in memory (so a bank
file broken meanwhile cannot replace it behind a reload's back).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diki_edge_runtime.contract import BANK_FILE
from diki_edge_runtime.pipeline import default_workers
from diki_edge_runtime.predictor import Prediction, Predictor, PredictorSettings
from diki_edge_runtime.serve.metrics import Metrics
from diki_edge_runtime.serve.settings import ServeSettings


class QueueFull(Exception):
    """The batching queue holds ``queue_limit`` requests already."""


@dataclass
class Job:
    """One predict request: its images (server-side files the server wrote) and the names to report."""

    paths: list[str]
    names: list[str]
    top_k: int
    labels: tuple[str, ...] | None = None
    template: str | None = None
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    decoded: list[Future] | None = None  # one per image once its decoding started (Predictor.decode)

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests batch together only when they classify among the same classes."""
        return self.labels, self.template


def release_heap() -> None:
    """Return freed heap pages to the system where the C library can (glibc's ``malloc_trim``)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the pages are returned when the allocator decides
        pass


class Engine:
    """The model holder shared by every request (thread-safe)."""

    def __init__(self, model_dir: Path, bank: Path | None, settings: PredictorSettings, serve: ServeSettings,
                 metrics: Metrics):
        self.model_dir = Path(model_dir)
        self.bank_file = Path(bank) if bank is not None else self.model_dir / BANK_FILE
        self.settings = settings
        self.serve = serve
        self.metrics = metrics
        self.ready = False  # set once a prediction ran (readyz)
        self._predictor: Predictor | None = None
        self._bank = None  # the last accepted TaskBank: what an unloaded model is reopened with
        self._info: dict[str, Any] = {}
        self._model_lock = threading.RLock()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._last_used = time.monotonic()
        self._worker = threading.Thread(target=self._loop, name="diki-edge-batcher", daemon=True)
        workers = default_workers() if settings.workers is None else max(settings.workers, 1)
        self._decoder = ThreadPoolExecutor(workers, thread_name_prefix="diki-edge-decode")

    # ----------------------------------------------------------------- model
    def open(self) -> None:
        """Open the model (setup errors raise here, before the server binds) and run one prediction on it."""
        self.predictor()
        gray = np.full((32, 32, 3), 128, np.uint8)
        result = self.predictor().predict([gray], top_k=1)[0]
        if not result.ok:
            from diki_edge_runtime.errors import RuntimeSetupError

            raise RuntimeSetupError(f"{self.model_dir}: the warm-up prediction failed: {result.error}")
        self.ready = True
        self._worker.start()

    def predictor(self) -> Predictor:
        """The open Predictor, reopened (same settings, last accepted bank) after an idle unload."""
        with self._model_lock:
            if self._predictor is None:
                bank = self._bank if self._bank is not None else self.bank_file
                predictor = Predictor(self.model_dir, bank=bank, settings=self.settings)
                self._predictor, self._bank = predictor, predictor.bank
                self._info = predictor.info()
                self.metrics.count("loads")
                if not self.metrics.bank_version:
                    self.metrics.set(bank_version=1)
                self.metrics.set(model_loaded=1)
            self._last_used = time.monotonic()
            return self._predictor

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def info(self) -> dict[str, Any]:
        """``Predictor.info()`` of the model as last opened, plus the server's own state."""
        with self._model_lock:
            info = dict(self._info)
            info.update(loaded=self.loaded, bank=os.fspath(self.bank_file), bank_version=self.metrics.bank_version)
        return info

    def unload(self) -> None:
        with self._model_lock:
            if self._predictor is None:
                return
            self._predictor = None  # calls holding a reference finish on it; its memory goes with the last one
            self.metrics.set(model_loaded=0)
            self.metrics.count("unloads")
        gc.collect()
        release_heap()

    def reload(self) -> dict[str, Any]:
        """Re-read the bank file; on success the new bank serves every later batch. Raises ``BankError`` (the old
        bank stays) naming the problem."""
        with self._model_lock:
            predictor = self.predictor()
            bank = predictor.load_bank(self.bank_file)
            self._bank = bank
            self._info = predictor.info()
            self.metrics.set(bank_version=self.metrics.bank_version + 1)
            return {"bank": os.fspath(self.bank_file), "bank_version": self.metrics.bank_version,
                    "tasks": [{"name": t.name, "classes": len(t.classes)} for t in bank.tasks]}

    def encode_text(self, texts: Sequence[str], task: str | int | None, weight: float | list[float]) -> np.ndarray:
        return self.predictor().encode_text(texts, task=task, weight=weight)

    # ----------------------------------------------------------------- queue
    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is stopping")
            if len(self._queue) >= self.serve.queue_limit:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (queue limit "
                                f"{self.serve.queue_limit})")
            self._queue.append(job)
            self.metrics.set(queue_depth=len(self._queue))
            self._decode_ahead()
            self._cond.notify()
        return job.future

    def _decode_ahead(self) -> None:
        """Start decoding the oldest queued requests' images, up to ``2 * batch_size`` images decoding or decoded
        (always at least the oldest request). Called with ``_cond`` held."""
        budget, started = 2 * self.serve.batch_size, 0
        for job in self._queue:
            if job.decoded is None:
                if started and started + len(job.paths) > budget:
                    return
                self._start_decoding(job)
            started += len(job.paths)

    def _start_decoding(self, job: Job) -> None:
        def decode(path: str, index: int) -> tuple[Prediction, np.ndarray | None]:
            return self.predictor().decode(path, index)

        job.decoded = [self._decoder.submit(decode, path, i) for i, path in enumerate(job.paths)]

    def stop(self, timeout: float) -> None:
        """Finish the queued requests (within ``timeout`` seconds) and stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._worker.is_alive():
            self._worker.join(timeout)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)
            else:  # idle for long enough, and no batch is running: this thread is the only one that runs them
                self.unload()

    def _next_batch(self) -> list[Job] | None:
        """The next batch ([] after an idle check), or None once stopping with nothing left."""
        wait_s = self.serve.max_wait_ms / 1000
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                if self._idle_due():
                    break
                self._cond.wait(self._idle_wait())
            if not self._queue:
                return []
            first = self._queue[0]
            while not self._stopping and self._images(first.key) < self.serve.batch_size:
                left = first.arrived + wait_s - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, images, rest = [], 0, deque()
            while self._queue:
                job = self._queue.popleft()
                if job.key == first.key and (not batch or images + len(job.paths) <= self.serve.batch_size):
                    batch.append(job)
                    images += len(job.paths)
                else:
                    rest.append(job)
            self._queue.extendleft(reversed(rest))
            self.metrics.set(queue_depth=len(self._queue))
            for job in batch:
                if job.decoded is None:
                    self._start_decoding(job)
            self._decode_ahead()  # the next batch decodes while this one runs
            return batch

    def _images(self, key: tuple[Any, ...]) -> int:
        return sum(len(j.paths) for j in self._queue if j.key == key)

    def _idle_due(self) -> bool:
        idle = self.serve.idle_unload
        return idle is not None and self.loaded and time.monotonic() - self._last_used >= idle

    def _idle_wait(self) -> float | None:
        idle = self.serve.idle_unload
        if idle is None or not self.loaded:
            return None
        return max(0.01, self._last_used + idle - time.monotonic())

    def _run(self, batch: list[Job]) -> None:
        paths = [p for job in batch for p in job.paths]
        first = batch[0]
        try:
            decoded = [f.result() for job in batch for f in job.decoded or ()]
            predictor = self.predictor()
            results = predictor.predict_decoded(decoded, top_k=max(j.top_k for j in batch),
                                                batch_size=self.serve.batch_size, labels=first.labels,
                                                template=first.template)
        except Exception as exc:  # a setup or label error: every request of the batch asked the same thing
            for job in batch:
                job.future.set_exception(exc)
            return
        self.metrics.batch(len(paths))
        self.ready = True
        self._last_used = time.monotonic()
        start = 0
        for job in batch:
            mine = results[start:start + len(job.paths)]
            start += len(job.paths)
            job.future.set_result([rename(res, path, name, i, job.top_k)
                                   for i, (res, path, name) in enumerate(zip(mine, job.paths, job.names))])


def rename(res: Prediction, path: str, name: str, index: int, top_k: int) -> Prediction:
    """A result as its request sees it: the uploaded file's name instead of the server-side file, its index in
    the request, and its own top-k."""
    res.input, res.index = name, index
    if res.error:
        res.error = res.error.replace(path, name)
    res.top_k = res.top_k[:top_k]
    return res
