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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diki_edge_runtime.contract import MANIFEST_FILE, TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES, TextSection
from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.reading import folder_file
from diki_edge_runtime.session import DEFAULT_LOG_SEVERITY, Session
from diki_edge_runtime.tokenizer import ClipTokenizer, TokenizerSpec

TEXT_BATCH = 64  # prompts per text-graph run


def text_files(model_dir: Path, section: TextSection) -> tuple[Path, Path]:
    """The text graph and the tokenizer of a model folder, both confined to the folder (reading.folder_file)."""
    source = str(model_dir / MANIFEST_FILE)
    return (folder_file(model_dir, section.files["model"], source),
            folder_file(model_dir, section.files["tokenizer"], source))


class TextEncoder:
    """``text.onnx`` and its tokenizer, opened from a model folder's manifest ``text`` section."""

    def __init__(self, model_dir: str | os.PathLike, section: TextSection, provider: str | Sequence[str] = "cpu",
                 threads: int | None = None, device_id: int = 0, *,
                 provider_options: Mapping[str, Mapping[str, Any]] | None = None, low_memory: bool = False,
                 log_severity: int = DEFAULT_LOG_SEVERITY):
        """The session settings are the image graph's (``Predictor``'s arguments)."""
        model_dir = Path(model_dir)
        source = str(model_dir / MANIFEST_FILE)
        model_path, tokenizer_path = text_files(model_dir, section)
        self.tokenizer = ClipTokenizer.from_file(tokenizer_path, TokenizerSpec.from_json(section.tokenizer, source))
        self.session = Session(model_path, provider=provider, threads=threads,
                               device_id=device_id, io_binding=False, provider_options=provider_options,
                               low_memory=low_memory, log_severity=log_severity)
        self.session.require(TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES, f"{model_path}: text graph")
        graph_context = self.session.input_shapes["text_tokens"][1:]
        if graph_context and isinstance(graph_context[0], int) and graph_context[0] != self.tokenizer.context_length:
            raise RuntimeSetupError(f"{source}: text.tokenizer.context_length is {self.tokenizer.context_length} but "
                                    f"the text graph {model_path.name} takes {graph_context[0]} tokens per prompt")
        self.prompts_encoded = 0
        self._count = threading.Lock()

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, context_length]`` int64 token ids (identical to the backbone's open_clip tokenizer)."""
        return self.tokenizer(list(texts))

    def encode_tokens(self, tokens: np.ndarray, text_k: np.ndarray, text_v: np.ndarray, task: np.ndarray,
                      weight: np.ndarray, batch_size: int = TEXT_BATCH,
                      on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """``[N, D]`` float32 embeddings of token rows, prompt ``i`` under task ``task[i]`` at ``M = weight[i]``.
        ``on_progress(done, N)`` is called after every run of the text graph."""
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
            if on_progress:
                on_progress(min(i + batch_size, n), n)
        with self._count:
            self.prompts_encoded += n
        return np.concatenate(outs).astype(np.float32, copy=False) if outs else np.zeros((0, 0), np.float32)
