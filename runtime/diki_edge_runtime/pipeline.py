"""Decoding overlapped with inference: an ordered map over a bounded pool of decode threads.

:func:`ordered_map` applies a function to the inputs in worker threads and yields the results in input order. At
most ``ahead`` inputs are in flight (taken from the input iterable but not yet yielded), so memory does not grow
with the number of inputs and an iterable of any length (a generator over a photo library) is read lazily. Pillow
releases the GIL while it decodes and resizes, numpy while it normalises, and ONNX Runtime while it runs: the
decode threads work on the next batch while the caller's thread runs the current one through the graph
(``Predictor.iter_predict``). ``workers=0`` runs the function in the caller's thread, one input at a time.

An exception raised by the function is re-raised by the iterator at that input's position, as a plain loop would
(the predictor's decode step catches per-image errors itself, so one bad image never stops the others).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Past this many decode threads a CPU box gains nothing: ONNX Runtime needs cores too, and decoding scales with
# cores, not threads.
MAX_DEFAULT_WORKERS = 8


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Decode threads when the caller does not say: one per usable core, at most :data:`MAX_DEFAULT_WORKERS`
    (measured on 2 cores: benchmarks/bench_throughput.py; the numbers are in README.md)."""
    return min(usable_cores(), MAX_DEFAULT_WORKERS)


def check_workers(workers: int) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0: decode in the calling thread), got {workers!r}")
    return workers


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed by ``workers`` threads with at most ``ahead`` (>= 1) items
    in flight. A pool is started only once a second item exists; closing the iterator early cancels what has not
    started and waits for what has."""
    check_workers(workers)
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    it = iter(items)
    if workers == 0:
        for item in it:
            yield fn(item)
        return
    missing = object()
    first = next(it, missing)
    if first is missing:
        return
    second = next(it, missing)
    if second is missing:
        yield fn(first)
        return
    it = chain((first, second), it)
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diki-edge-decode")
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < ahead:
                item = next(it, missing)
                if item is missing:
                    exhausted = True
                else:
                    pending.append(pool.submit(fn, item))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
