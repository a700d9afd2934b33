"""The text encoder of a model folder, torch-free: ``tokenizer.json`` + ``text.onnx`` (contract ``TEXT_GRAPH_*``).

:class:`TextEncoder` turns texts into L2-normalised embeddings under any bank's text adapters: every prompt names
the task whose ``K_r/V_r`` it runs with and its own ``M`` (``M = 0``: the frozen text encoder, whatever the task).
The bank's ``text_k/text_v`` are inputs, so a swapped bank needs no re-export. Prompts run in chunks of
``batch_size`` so memory stays bounded for long label lists. :attr:`TextEncoder.prompts_encoded` counts prompt
passes (what the label-table cache of :mod:`diki_edge_runtime.labels` is measured by).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from diki_edge_runtime.contract import MANIFEST_FILE, TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES, TextSection
from diki_edge_runtime.session import SessionSettings
from diki_edge_runtime.tokenizer import ClipTokenizer, TokenizerSpec

TEXT_BATCH = 64  # prompts per text-graph run


class TextEncoder:
    """``text.onnx`` and its tokenizer, opened from a model folder's manifest ``text`` section."""

    def __init__(self, model_dir: str | os.PathLike, section: TextSection,
                 settings: SessionSettings = SessionSettings()):
        """``settings``: the image graph's session settings (``Predictor``'s); IO binding is always off here."""
        model_dir = Path(model_dir)
        source = str(model_dir / MANIFEST_FILE)
        self.tokenizer = ClipTokenizer.from_file(model_dir / section.files["tokenizer"],
                                                 TokenizerSpec.from_json(section.tokenizer, source))
        self.session = settings.open(model_dir / section.files["model"], io_binding=False)
        self.session.require(TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES, f"{model_dir / section.files['model']}: text graph")
        self.prompts_encoded = 0
        self._count = threading.Lock()

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, context_length]`` int64 token ids (identical to the backbone's open_clip tokenizer)."""
        return self.tokenizer(list(texts))

    def encode_tokens(self, tokens: np.ndarray, text_k: np.ndarray, text_v: np.ndarray, task: np.ndarray,
                      weight: np.ndarray, batch_size: int = TEXT_BATCH) -> np.ndarray:
        """``[N, D]`` float32 embeddings of token rows, prompt ``i`` under task ``task[i]`` at ``M = weight[i]``."""
        n = len(tokens)
        task = np.ascontiguousarray(np.broadcast_to(np.asarray(task, np.int64), (n,)))
        weight = np.ascontiguousarray(np.broadcast_to(np.asarray(weight, np.float32), (n,)))
        if n and not np.all(np.isfinite(weight)):
            raise ValueError("text weights M must be finite")
        if n and (task.min() < 0 or task.max() >= len(text_k)):
            raise ValueError(f"task index out of range for a bank of {len(text_k)} tasks")
        outs = []
        for i in range(0, n, batch_size):
            feeds = dict(zip(TEXT_INPUT_NAMES, (np.ascontiguousarray(tokens[i:i + batch_size], np.int64), text_k,
                                                text_v, task[i:i + batch_size], weight[i:i + batch_size])))
            outs.append(self.session.run_feeds(feeds)[TEXT_OUTPUT_NAMES[0]])
        with self._count:
            self.prompts_encoded += n
        return np.concatenate(outs).astype(np.float32, copy=False) if outs else np.zeros((0, 0), np.float32)
