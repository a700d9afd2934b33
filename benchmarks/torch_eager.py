"""PyTorch's side of the comparisons: the calibrated model in the fastest eager configuration a user would pick.

A ratio against PyTorch means something only against PyTorch at its best, so the suite does not assume a
configuration: it times each candidate of :data:`CANDIDATES` for a few rounds on the batch being measured and
keeps the fastest (the trial's timings are recorded). Every candidate runs under ``torch.inference_mode`` (no
autograd bookkeeping at all, faster than ``no_grad``), float32, on ``torch.set_num_threads(threads)`` —
the same count ONNX Runtime gets as intra-op threads; :func:`torch_thread_settings` records what PyTorch
actually runs with (intra-op and inter-op threads, OpenMP / MKL environment, oneDNN).

* ``inference_mode``: the model as trained (open_clip's blocks that hold no adapter keep
  ``nn.MultiheadAttention``, whose native fast path PyTorch takes by itself in inference);
* ``inference_mode+channels_last``: also the patch-embedding convolution and its input in channels-last memory
  format (oneDNN's preferred layout for convolutions).

Compiled modes (``torch.compile``, TorchScript) are not eager and are left out.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

from benchmarks.common import Timing, time_side_by_side

CANDIDATES = ("inference_mode", "inference_mode+channels_last")


def torch_thread_settings() -> dict[str, Any]:
    import torch

    return {"intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "mha_fastpath": bool(torch.backends.mha.get_fastpath_enabled())}


def calibrated_forward(diki, bank_inputs: dict[str, Any], candidate: str) -> Callable[[Any], Any]:
    """``forward(pixels) -> CalibratedOutput`` for one candidate configuration (channels-last on a copy)."""
    import torch

    from diki_edge.calibrated import CalibratedDiki

    if candidate not in CANDIDATES:
        raise ValueError(f"unknown PyTorch configuration {candidate!r}; one of {CANDIDATES}")
    channels_last = candidate.endswith("+channels_last")
    if channels_last:
        diki = copy.deepcopy(diki)
        diki.clip.visual.conv1.to(memory_format=torch.channels_last)
    calibrated = CalibratedDiki(diki).eval()

    def forward(pixels):
        with torch.inference_mode():
            if channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            return calibrated(pixels, **bank_inputs)

    return forward


def fastest_eager(diki, bank_inputs: dict[str, Any], pixels, rounds: int = 2
                  ) -> tuple[str, Callable[[Any], Any], dict[str, Any]]:
    """The fastest of :data:`CANDIDATES` on ``pixels`` (one warm-up, ``rounds`` interleaved rounds each):
    ``(name, forward, record)``; ``record`` holds every candidate's trial timing and the thread settings."""
    forwards = {c: calibrated_forward(diki, bank_inputs, c) for c in CANDIDATES}
    trial: dict[str, Timing] = time_side_by_side({c: (lambda f=f: f(pixels)) for c, f in forwards.items()},
                                                 1, rounds)
    best = min(trial, key=lambda c: trial[c].median)
    return best, forwards[best], {"chosen": best, "trial": {c: t.to_json() for c, t in trial.items()},
                                  "threads": torch_thread_settings()}
