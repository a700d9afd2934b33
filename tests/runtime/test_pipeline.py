"""The ordered, bounded decode pool (diki_edge_runtime/pipeline.py): order, errors, bounded memory, early stop."""

from __future__ import annotations

import random
import threading
import time

import pytest

from diki_edge_runtime.pipeline import MAX_DEFAULT_WORKERS, default_workers, ordered_map, usable_cores


def _slow_square(x: int) -> int:
    time.sleep(random.Random(x).uniform(0, 0.004))  # later inputs often finish first
    return x * x


@pytest.mark.parametrize("workers", [0, 1, 3, 8])
def test_results_keep_the_input_order(workers):
    assert list(ordered_map(_slow_square, range(60), workers, ahead=10)) == [x * x for x in range(60)]


def test_zero_one_and_two_inputs():
    assert list(ordered_map(_slow_square, [], 4, ahead=4)) == []
    assert list(ordered_map(_slow_square, [3], 4, ahead=4)) == [9]
    assert list(ordered_map(_slow_square, [3, 4], 4, ahead=1)) == [9, 16]


def test_work_really_runs_in_parallel_threads():
    seen: set[str] = set()
    barrier = threading.Barrier(3, timeout=5)

    def wait_for_two_others(x: int) -> int:
        seen.add(threading.current_thread().name)
        if x < 3:
            barrier.wait()  # deadlocks (BrokenBarrierError) unless three inputs run at the same time
        return x

    assert list(ordered_map(wait_for_two_others, range(6), 3, ahead=6)) == list(range(6))
    assert len(seen) == 3 and all(n.startswith("diki-edge-decode") for n in seen)


def test_an_exception_surfaces_at_its_input_and_the_earlier_results_come_first():
    def fail_on_5(x: int) -> int:
        if x == 5:
            raise KeyError("five")
        return x

    got = []
    with pytest.raises(KeyError, match="five"):
        for r in ordered_map(fail_on_5, range(20), 4, ahead=8):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("workers,ahead", [(0, 1), (2, 4), (4, 12)])
def test_inputs_are_read_lazily_and_in_flight_work_is_bounded(workers, ahead):
    """Memory does not grow with the number of inputs: never more than ``ahead`` inputs taken but not yet
    consumed, however long (here: endless) the input iterable is."""
    taken = 0
    consumed = 0
    peak = 0
    lock = threading.Lock()

    def endless():
        nonlocal taken, peak
        i = 0
        while True:
            with lock:
                taken += 1
                peak = max(peak, taken - consumed)
            yield i
            i += 1

    it = ordered_map(lambda x: x, endless(), workers, ahead)
    for i, r in enumerate(it):
        assert r == i
        consumed += 1
        if consumed == 2000:
            break
    it.close()
    assert peak <= max(ahead, 1) + 1  # + the one being handed over
    assert taken <= consumed + ahead


def test_closing_early_cancels_what_has_not_started():
    started = []

    def slow(x: int) -> int:
        started.append(x)
        time.sleep(0.02)
        return x

    it = ordered_map(slow, range(1000), 2, ahead=6)
    assert next(it) == 0
    it.close()
    count = len(started)
    time.sleep(0.1)
    assert len(started) == count <= 8  # nothing more started after close; the pool is shut down


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        list(ordered_map(abs, [1], -1, ahead=2))
    with pytest.raises(ValueError, match="workers"):
        list(ordered_map(abs, [1], True, ahead=2))
    with pytest.raises(ValueError, match="ahead"):
        list(ordered_map(abs, [1], 2, ahead=0))


def test_default_workers_follow_the_cores():
    assert default_workers() == min(usable_cores(), MAX_DEFAULT_WORKERS) >= 1
