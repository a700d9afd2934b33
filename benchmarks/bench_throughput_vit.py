"""ViT-B/16 with the decode pool (no regression) and low-memory sessions (peak RSS): the second half of issue
13's measurements; the setting and the code are in benchmarks/bench_throughput.py."""

from __future__ import annotations

from typing import Any

from benchmarks.bench_throughput import measure_vit
from benchmarks.common import Config


def measure(cfg: Config) -> dict[str, Any]:
    return measure_vit(cfg)
