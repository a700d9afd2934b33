"""Labels given at prediction time, classified exactly as DIKI classifies a bank's own classes.

The bank's classes are scored against a text table ``[G, C, D]``: each class prompt under its task's text adapter
at the ``G`` calibration levels of ``M``, linearly interpolated at each image's ``M`` and re-normalised
(``diki_edge.calibrated.interpolate_class_table``). Labels get the same table, under the *selected* task's
adapter, built lazily by :class:`LabelTables`:

* only the (task, level) pairs the images need are encoded: an image at ``M`` needs levels ``lo`` and ``lo + 1``
  around ``M (G - 1)``, and only one of them when ``M`` sits on a grid point (the other's interpolation weight is
  exactly 0, so the result is bit-identical); a level at ``M = 0`` is the frozen text encoder and is shared by
  every task. The first call for ``C`` labels on one task therefore costs at most ``3C`` prompt passes (the frozen
  level plus two levels), usually ``2C``;
* tables are cached per label set (prompts) for the bank they were built with; a :class:`LabelTables` belongs to
  one bank state of the predictor, so ``load_bank`` drops them;
* the cache is bounded by ``max_bytes`` (least recently used label sets are dropped first; a single label set
  larger than the bound is recomputed rather than kept).

The arithmetic mirrors the PyTorch reference in float32 (position, floor, fraction, mix, normalise, scale).
"""

from __future__ import annotations

import os
import threading
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diki_edge_runtime.contract import DEFAULT_TEMPLATE
from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.reading import TEXT_TABLE_MAX_BYTES, read_limited_text
from diki_edge_runtime.text import TextEncoder

DEFAULT_LABEL_CACHE_BYTES = 256 * 2**20
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def check_class_names(names: Sequence[str], what: str = "class name") -> None:
    """Class names (or labels) as a bank stores them: non-empty strings without control characters (a newline
    would break every table and the text file formats), each once. Raises ``ValueError`` naming the first problem."""
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"every {what} must be a non-empty string, got {name!r}")
        if any(unicodedata.category(ch) == "Cc" for ch in name):
            raise ValueError(f"{what} {name!r} contains a control character (newline, tab, ...)")
        if any(unicodedata.category(ch) == "Cs" for ch in name):  # how Python decodes a non-UTF-8 file name
            raise ValueError(f"{what} {name!r} is not valid UTF-8 text (a file or folder name in another "
                             "encoding? rename it, or give the class names in classes.txt)")
    dupes = sorted(lab for lab, n in Counter(names).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate {what}s {dupes[:5]}: each {what} must appear once")


def printable(text: str) -> str:
    """``text`` for one table cell: control characters (a newline in a name an older version stored) spelled as
    escapes (``\\n``), lone surrogates (a non-UTF-8 file name) as ``\\xNN``, so that a name cannot break a table."""
    from diki_edge_runtime.predictor import json_text

    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" else ch
                   for ch in json_text(text))


def label_prompts(labels: Sequence[str], template: str | None = DEFAULT_TEMPLATE) -> tuple[str, ...]:
    """The prompts of a label list: ``template.format(label)`` each. Raises ``ValueError`` naming the problem
    (no labels, a non-string or blank label, duplicates, a template without exactly one ``{}``)."""
    template = DEFAULT_TEMPLATE if template is None else template
    if isinstance(labels, str):
        raise ValueError("labels must be a list of strings, not one string (split it first)")
    labels = list(labels)
    if not labels:
        raise ValueError("the label list is empty")
    check_class_names(labels, "label")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"the template must contain '{{}}' exactly once (where the label goes), got {template!r}")
    try:
        return tuple(template.format(label) for label in labels)
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot use template {template!r}: {exc} (write literal braces as '{{{{' and "
                         "'}}')") from None


def parse_labels(text: str) -> list[str]:
    """``"rocket, car,tree"`` -> ``["rocket", "car", "tree"]`` (``--labels``); blank items are an error."""
    items = [item.strip() for item in str(text).split(",")]
    if any(not item for item in items):
        raise ValueError(f"--labels {text!r} has an empty label (labels are separated by commas)")
    return items


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """One label per line (``--labels-file``); blank lines are skipped. Raises ``ValueError`` naming the file."""
    path = Path(path)
    try:  # a regular file of at most TEXT_TABLE_MAX_BYTES: a FIFO or /dev/zero is refused, not waited on or read
        text = read_limited_text(path, "labels file", TEXT_TABLE_MAX_BYTES, encoding="utf-8-sig")
    except RuntimeSetupError as exc:
        raise ValueError(str(exc)) from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"{path}: the labels file holds no labels (one per line)")
    return labels


def interpolation(weight: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, frac)`` per image: the grid interval and position of ``M`` (float32, as the reference)."""
    pos = np.clip(np.asarray(weight, np.float32), np.float32(0), np.float32(1)) * np.float32(levels - 1)
    lo = np.minimum(np.floor(pos), np.float32(levels - 2)).astype(np.int64)
    return lo, (pos - lo.astype(np.float32)).astype(np.float32)


@dataclass
class _Entry:
    tokens: np.ndarray  # [C, context_length]
    levels: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (task or -1, level) -> [C, D]

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + sum(a.nbytes for a in self.levels.values()))


class LabelTables:
    """Lazily built, LRU-bounded text tables of label sets under one bank's text adapters."""

    def __init__(self, encoder: Callable[[], TextEncoder], text_k: np.ndarray, text_v: np.ndarray,
                 levels: Sequence[float], logit_scale: float, max_bytes: int = DEFAULT_LABEL_CACHE_BYTES,
                 on_progress: Callable[[int, int], None] | None = None):
        """``encoder`` returns the model folder's :class:`TextEncoder` (opened on first use); ``on_progress(done,
        total)`` follows each table build (prompts encoded so far, prompts this build encodes)."""
        self.on_progress = on_progress
        if max_bytes < 0:
            raise ValueError(f"the label cache bound must be >= 0 bytes, got {max_bytes}")
        self.encoder = encoder
        self.text_k = np.ascontiguousarray(text_k, np.float32)
        self.text_v = np.ascontiguousarray(text_v, np.float32)
        self.levels = np.asarray(levels, np.float32)
        self.logit_scale = np.float32(logit_scale)
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tables (tokens included)."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, task: int, level: int) -> tuple[int, int]:
        return (-1, level) if self.levels[level] == 0 else (task, level)

    def logits(self, prompts: tuple[str, ...], image_embeds: np.ndarray, task: np.ndarray,
               weight: np.ndarray) -> np.ndarray:
        """``[B, C]`` float32 scores of every image against every label, at its selected task and ``M``."""
        g = len(self.levels)
        lo, frac = interpolation(weight, g)
        task = np.asarray(task, np.int64)
        with self._lock:
            entry = self._entries.get(prompts)
            if entry is None:
                entry = self._entries[prompts] = _Entry(self.encoder().tokens(prompts))
            self._entries.move_to_end(prompts)
            uses = [[(lo[i], np.float32(1) - frac[i]), (lo[i] + 1, frac[i])] for i in range(len(lo))]
            needed = {self._key(int(task[i]), int(lv)) for i, pair in enumerate(uses) for lv, w in pair if w != 0}
            self._encode(entry, sorted(needed))
            tables = {k: entry.levels[k] for k in needed}
            self._evict(keep=prompts)
        f = np.asarray(image_embeds, np.float32)
        out = np.empty((len(f), len(prompts)), np.float32)
        for i, pair in enumerate(uses):
            mix = None
            for level, w in pair:  # (1 - frac) E[lo] + frac E[lo + 1]; a zero weight adds exactly nothing
                if w == 0:
                    continue
                term = w * tables[self._key(int(task[i]), int(level))]
                mix = term if mix is None else mix + term
            norm = np.maximum(np.linalg.norm(mix, axis=1, keepdims=True), np.float32(NORMALIZE_EPS))
            out[i] = self.logit_scale * ((mix / norm) @ f[i])
        return out

    def _encode(self, entry: _Entry, keys: list[tuple[int, int]]) -> None:
        missing = [k for k in keys if k not in entry.levels]
        if not missing:
            return
        c = len(entry.tokens)
        tokens = np.concatenate([entry.tokens] * len(missing))
        task = np.repeat([max(t, 0) for t, _ in missing], c)
        weight = np.repeat([self.levels[lv] for _, lv in missing], c)
        emb = self.encoder().encode_tokens(tokens, self.text_k, self.text_v, task, weight,
                                           on_progress=self.on_progress)
        for j, key in enumerate(missing):
            entry.levels[key] = emb[j * c:(j + 1) * c]

    def _evict(self, keep: tuple[str, ...]) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.max_bytes:
                return
            if key != keep:
                total -= self._entries.pop(key).nbytes
        if total > self.max_bytes:  # the label set in use alone exceeds the bound: keep nothing of it
            self._entries.pop(keep, None)
