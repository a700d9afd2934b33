"""The server's batching engine in process, with a stand-in predictor whose inference waits on a gate: requests
queued behind a running batch are decoded ahead (overlapping that batch), within a bound of two batches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")

from diki_edge_runtime.predictor import Prediction, PredictorSettings  # noqa: E402
from diki_edge_runtime.serve.engine import Engine, Job  # noqa: E402
from diki_edge_runtime.serve.metrics import Metrics  # noqa: E402
from diki_edge_runtime.serve.settings import ServeSettings  # noqa: E402


class GatedPredictor:
    """Decodes at once (recording what it decoded); its inference waits until ``gate`` opens."""

    def __init__(self):
        self.decoded: list[str] = []
        self.batches: list[list[str]] = []
        self.running, self.gate = threading.Event(), threading.Event()
        self.lock = threading.Lock()

    def decode(self, path: str, index: int = 0):
        with self.lock:
            self.decoded.append(path)
        return Prediction(path, index), np.zeros(3, np.float32)

    def predict_decoded(self, decoded, top_k=5, batch_size=8, labels=None, template=None):
        self.batches.append([res.input for res, _ in decoded])
        self.running.set()
        assert self.gate.wait(10), "the test never opened the gate"
        for res, _ in decoded:
            res.task, res.weight, res.top_k = "t", 1.0, [(res.input.upper(), 1.0)]
        return [res for res, _ in decoded]


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_queued_requests_decode_while_a_batch_runs_within_two_batches(tmp_path):
    fake = GatedPredictor()
    engine = Engine(Path(tmp_path), None, PredictorSettings(workers=2),
                    ServeSettings(batch_size=2, max_wait_ms=1.0), Metrics())
    engine._predictor = fake  # the stand-in instead of an ONNX model (open() would run a warm-up prediction)
    engine._worker.start()
    try:
        first = Job(["a"], ["a.jpg"], 1)
        engine.submit(first)
        assert fake.running.wait(30), "the first batch never started"
        later = [Job([name], [f"{name}.jpg"], 1) for name in "bcdef"]
        for job in later:
            engine.submit(job)
        # while "a" runs, the next two batches (b, c and d, e) decode; f would exceed the bound
        assert wait_until(lambda: set(fake.decoded) >= set("abcde")), fake.decoded
        time.sleep(0.1)
        assert "f" not in fake.decoded and len(fake.batches) == 1
        fake.gate.set()
        results = [job.future.result(10) for job in [first, *later]]
    finally:
        fake.gate.set()
        engine.stop(5)
    assert [[r.input for r in rs] for rs in results] == [[f"{n}.jpg"] for n in "abcdef"]
    assert [rs[0].label for rs in results] == list("ABCDEF")  # each request its own image's result
    assert fake.batches[0] == ["a"] and sum(map(len, fake.batches)) == 6
    assert all(len(b) <= 2 for b in fake.batches)


def test_decode_then_predict_decoded_is_predict(golden, tmp_path):
    """The server's two steps give exactly Predictor.predict's results, a broken file's error included."""
    from diki_edge_runtime import Predictor

    images = sorted((golden.root / "images").iterdir())[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    inputs = [str(p) for p in images[:2]] + [str(broken)] + [str(p) for p in images[2:]]
    predictor = Predictor(golden.root / "model", threads=1)
    want = predictor.predict(inputs, top_k=3, batch_size=4)
    got = predictor.predict_decoded([predictor.decode(p, i) for i, p in enumerate(inputs)], top_k=3, batch_size=4)
    assert [r.to_json() for r in got] == [r.to_json() for r in want]
    assert not got[2].ok and got[2].error_kind == want[2].error_kind and all(r.ok for r in got if r is not got[2])
