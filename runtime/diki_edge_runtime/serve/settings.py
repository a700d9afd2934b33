"""The server's own options (``diki-edge serve``), frozen and checked once before the model is opened.

The model-opening options are not here: they are the very ``RuntimeOptions`` / ``PredictorSettings`` of
``diki-edge predict`` (diki_edge_runtime/cli_predict.py), so the two commands cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from diki_edge_runtime.errors import UsageError

MAX_TOP_K = 1000  # a request's top_k above this is refused (the answer would only grow, never be more useful)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """How the server listens, batches, bounds and reports (see docs/serve.md for every field)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    batch_size: int = 8  # images per forward pass of the batching queue
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others to join it
    max_body_mb: float = 64.0  # request body limit (413 above)
    max_images: int = 64  # image parts per predict request
    queue_limit: int = 64  # predict requests waiting for the model; past it: 503 with Retry-After
    idle_unload: float | None = None  # seconds without a request before the ONNX Runtime sessions are released
    drain_seconds: float = 10.0  # SIGTERM: how long requests in flight may take to finish
    cors_origins: tuple[str, ...] = ()
    log_json: bool = False
    top_k: int = 5  # a predict request's default top_k

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def check(self) -> None:
        """A :class:`UsageError` naming the option that cannot work; refuses a non-loopback bind without a key."""
        positive = {"--batch-size": self.batch_size, "--max-images": self.max_images,
                    "--queue-limit": self.queue_limit, "--max-body-mb": self.max_body_mb, "--top-k": self.top_k}
        for name, value in positive.items():
            if not (math.isfinite(value) and value >= 1):
                raise UsageError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0..65535, got {self.port}")
        if self.top_k > MAX_TOP_K:
            raise UsageError(f"--top-k must be at most {MAX_TOP_K}, got {self.top_k}")
        for name, value in (("--max-wait-ms", self.max_wait_ms), ("--drain-seconds", self.drain_seconds)):
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, got {value}")
        if self.idle_unload is not None and not (math.isfinite(self.idle_unload) and self.idle_unload > 0):
            raise UsageError(f"--idle-unload must be a number of seconds > 0, got {self.idle_unload}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key (or DIKI_EDGE_API_KEY) is empty")
        if not is_loopback(self.host) and self.api_key is None:
            raise UsageError(f"--host {self.host} is reachable beyond this machine; give --api-key (or set "
                             "DIKI_EDGE_API_KEY) to serve there, or bind 127.0.0.1")
