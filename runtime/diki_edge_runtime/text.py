"""The text encoder of a model folder, torch-free: ``tokenizer.json`` + ``text.onnx`` (contract ``TEXT_GRAPH_*``).

:class:`TextEncoder` turns texts into L2-normalised embeddings under any bank's text adapters: every prompt names
the task whose ``K_r/V_r`` it runs with and its own ``M`` (``M = 0``: the frozen text encoder, whatever the task).
The bank's ``text_k/text_v`` are inputs, so a swapped bank needs no re-export. Prompts run in chunks of
``batch_size`` so memory stays bounded for long label lists. :attr:`TextEncoder.prompts_encoded` counts prompt
passes (what the label-table cache of :mod:`diki_edge_runtime.labels` is measured by).

**Dynamic text length.** CLIP's text tower is causal and read at the end-of-text token, so the positions after a
batch's longest prompt change nothing. Where the text graph's token axis is dynamic (``text_length``, every
export since that axis exists), prompts are ordered by length, and each chunk runs cut to
:func:`trimmed_length` (its longest end-of-text position + 1, rounded up to a multiple of :data:`LENGTH_STEP` so
that a label list runs few distinct shapes); the outputs come back in the input order. Older folders, whose
graph has a fixed context length, run at the full length as before. Over-long prompts were already truncated by
the tokenizer exactly as open_clip does (end-of-text kept last).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from diki_edge_runtime.contract import MANIFEST_FILE, TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES, TextSection
from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.reading import folder_file
from diki_edge_runtime.session import SessionSettings
from diki_edge_runtime.tokenizer import ClipTokenizer, TokenizerSpec

TEXT_BATCH = 64  # prompts per text-graph run
LENGTH_STEP = 8  # trimmed lengths are rounded up to a multiple of this (fewer distinct shapes per label list)


def trimmed_length(tokens: np.ndarray, eot_token_id: int, step: int = LENGTH_STEP) -> int:
    """The shortest token length (a multiple of ``step``, at most ``tokens.shape[1]``) that keeps every row's
    end-of-text token; the full length when a row has none (token rows not made by the tokenizer)."""
    full = int(tokens.shape[1])
    if len(tokens) == 0:
        return full
    has_eot = tokens == eot_token_id
    if not bool(np.all(has_eot.any(axis=1))):
        return full
    end = int(has_eot.argmax(axis=1).max()) + 1
    return min(full, -(-end // step) * step)


def text_files(model_dir: Path, section: TextSection) -> tuple[Path, Path]:
    """The text graph and the tokenizer of a model folder, both confined to the folder (reading.folder_file)."""
    source = str(model_dir / MANIFEST_FILE)
    return (folder_file(model_dir, section.files["model"], source),
            folder_file(model_dir, section.files["tokenizer"], source))


class TextEncoder:
    """``text.onnx`` and its tokenizer, opened from a model folder's manifest ``text`` section."""

    def __init__(self, model_dir: str | os.PathLike, section: TextSection,
                 settings: SessionSettings = SessionSettings()):
        """``settings``: the image graph's session settings (``Predictor``'s); IO binding is always off here."""
        model_dir = Path(model_dir)
        source = str(model_dir / MANIFEST_FILE)
        model_path, tokenizer_path = text_files(model_dir, section)
        self.tokenizer = ClipTokenizer.from_file(tokenizer_path, TokenizerSpec.from_json(section.tokenizer, source))
        # fp32 always: the label tables are built once per label set, so bf16 would save little and cost accuracy
        self.session = settings.open(model_path, io_binding=False, precision="fp32")
        self.session.require(TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES, f"{model_path}: text graph")
        graph_context = self.session.input_shapes[TEXT_INPUT_NAMES[0]][1]
        self.dynamic_length = not isinstance(graph_context, int)
        if not self.dynamic_length and graph_context != self.tokenizer.context_length:
            raise RuntimeSetupError(f"{source}: text.tokenizer.context_length is {self.tokenizer.context_length} but "
                                    f"the text graph {model_path.name} takes {graph_context} tokens per prompt")
        if self.dynamic_length:
            self._probe_full_length(f"{source}: text.tokenizer.context_length is {self.tokenizer.context_length} but "
                                    f"the text graph {model_path.name} does not take that many tokens per prompt")
        self.prompts_encoded = 0
        self._count = threading.Lock()

    def _probe_full_length(self, message: str) -> None:
        """One blank prompt of the tokenizer's full context length through a dynamic-length graph: a manifest whose
        context length exceeds the graph's positional embedding is a setup error now, not an ONNX Runtime error
        on the first long prompt."""
        shapes = self.session.input_shapes
        feeds = {TEXT_INPUT_NAMES[0]: np.zeros((1, self.tokenizer.context_length), np.int64)}
        for name in TEXT_INPUT_NAMES[1:3]:  # the text bank: one task of zeros (the branch adds nothing)
            dims = [d if isinstance(d, int) else 1 for d in shapes[name]]
            feeds[name] = np.zeros(dims, self.session.input_dtype(name))
        feeds[TEXT_INPUT_NAMES[3]] = np.zeros(1, np.int64)
        feeds[TEXT_INPUT_NAMES[4]] = np.zeros(1, self.session.input_dtype(TEXT_INPUT_NAMES[4]))
        try:
            self.session.run_feeds(feeds)
        except Exception:  # noqa: BLE001 - ONNX Runtime's own error types; the message says what is wrong
            raise RuntimeSetupError(message) from None

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
        eot = self.tokenizer.spec.eot_token_id
        order = np.argsort((tokens == eot).argmax(axis=1), kind="stable") if self.dynamic_length and n else None
        rows = np.arange(n) if order is None else order
        outs = []
        for i in range(0, n, batch_size):
            chunk = rows[i:i + batch_size]
            ids = tokens[chunk]
            if self.dynamic_length:
                ids = ids[:, :trimmed_length(ids, eot)]
            feeds = dict(zip(TEXT_INPUT_NAMES, (np.ascontiguousarray(ids, np.int64), text_k, text_v, task[chunk],
                                                weight[chunk])))
            outs.append(self.session.run_feeds(feeds)[TEXT_OUTPUT_NAMES[0]])
            if on_progress:
                on_progress(min(i + batch_size, n), n)
        with self._count:
            self.prompts_encoded += n
        if not outs:
            return np.zeros((0, 0), np.float32)
        embeds = np.concatenate(outs).astype(np.float32, copy=False)
        if order is not None:
            embeds[order] = embeds.copy()
        return embeds
