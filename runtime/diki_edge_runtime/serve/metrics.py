"""What ``GET /metrics`` reports, in the Prometheus text exposition format (version 0.0.4), kept without any
client library: counters, gauges and two histograms behind one lock (updates are a few integer additions)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # images per forward


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.n}"]
        return out


class Metrics:
    """The server's counters; every method is safe to call from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.errors: Counter[str] = Counter()  # error kind (request errors and per-image kinds) -> count
        self.latency: dict[str, Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.queue_depth = 0
        self.bank_version = 0
        self.model_loaded = 0
        self.unloads = 0
        self.loads = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.errors[kind] += n

    def batch(self, images: int) -> None:
        with self._lock:
            self.batches.observe(images)
            self.images += images

    def set(self, **gauges: int) -> None:
        with self._lock:
            for name, value in gauges.items():
                setattr(self, name, value)

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP diki_edge_requests_total HTTP requests by route and status.",
                     "# TYPE diki_edge_requests_total counter"]
            lines += [f'diki_edge_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            lines += ["# HELP diki_edge_errors_total Errors by kind: request errors and per-image error kinds.",
                      "# TYPE diki_edge_errors_total counter"]
            lines += [f'diki_edge_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())]
            lines += ["# HELP diki_edge_request_seconds Request latency by route.",
                      "# TYPE diki_edge_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("diki_edge_request_seconds", f'route="{route}"')
            lines += ["# HELP diki_edge_batch_images Images per forward pass of the batching queue.",
                      "# TYPE diki_edge_batch_images histogram", *self.batches.lines("diki_edge_batch_images")]
            gauges = (("images_total", "counter", "Images predicted.", self.images),
                      ("queue_depth", "gauge", "Predict requests waiting for the model.", self.queue_depth),
                      ("bank_version", "gauge", "Banks accepted since start (1: the first).", self.bank_version),
                      ("model_loaded", "gauge", "1 while the ONNX Runtime sessions are held.", self.model_loaded),
                      ("model_loads_total", "counter", "Times the model was opened.", self.loads),
                      ("model_unloads_total", "counter", "Idle unloads.", self.unloads))
            for name, kind, help_, value in gauges:
                lines += [f"# HELP diki_edge_{name} {help_}", f"# TYPE diki_edge_{name} {kind}",
                          f"diki_edge_{name} {value}"]
        return "\n".join(lines) + "\n"
