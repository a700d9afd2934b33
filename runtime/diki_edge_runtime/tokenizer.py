"""The text tokenizer of a model folder, torch-free: open_clip's CLIP BPE reproduced with Hugging Face ``tokenizers``.

open_clip's ``SimpleTokenizer`` (the one CLIP backbones use) does, per text::

    clean    ftfy.fix_text -> html.unescape twice -> strip -> whitespace runs to one space -> lower()
    split    regex  <special tokens> | 's|'t|'re|'ve|'m|'ll|'d | [\\p{L}]+ | [\\p{N}] | [^\\s\\p{L}\\p{N}]+
             (IGNORECASE)
    bytes    each piece's UTF-8 bytes mapped to printable characters (GPT-2's byte-to-unicode table)
    BPE      merges by rank, "</w>" appended to the last character of every piece
    ids      [sot] + ids + [eot], truncated to the context length with the last id replaced by eot, zero-padded

Here the cleaning is the same few lines of Python (with the same ``ftfy``); the split, the byte mapping and the
BPE are a ``tokenizers`` pipeline (``Split`` with the same pattern, ``ByteLevel`` without its own regex, a BPE
model with ``end_of_word_suffix="</w>"``) stored as ``tokenizer.json`` in the model folder. The exporter builds that
file from the backbone's own open_clip tokenizer (:func:`tokenizer_json`) and refuses to export a backbone whose
tokenizer this module cannot reproduce id for id (``export/diki_edge_export/text.py``).

Special-token literals typed into a text are recognised exactly where open_clip's regex recognises them (as the
first alternative of the split pattern), so every piece is looked up in the special table before BPE; the
``tokenizers`` "added tokens" mechanism would also match them after punctuation, where open_clip does not.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.reading import TEXT_TABLE_MAX_BYTES, read_limited_text

# open_clip's SimpleTokenizer split pattern after its special tokens (open_clip/tokenizer.py, SimpleTokenizer).
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
TOKENIZER_SOURCE = "tokenizer.json"
# Longest context a manifest may declare: CLIP's is 77, the longest open_clip text towers' 256-512; a larger value
# would only size the token array (prompts x context_length int64) before the graph refuses it.
MAX_CONTEXT_LENGTH = 4096


def split_regex(special_tokens: Sequence[str]) -> str:
    """The split pattern with the special tokens first, case-insensitive, as open_clip compiles it."""
    return "(?i)" + "|".join([*special_tokens, SPLIT_PATTERN])


def clean_lower(text: str) -> str:
    """open_clip's ``clean="lower"``: ``whitespace_clean(basic_clean(text)).lower()``."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


def tokenizer_json(vocab: dict[str, int], merges: Sequence[tuple[str, str]], special_tokens: Sequence[str]) -> str:
    """The ``tokenizer.json`` text of a CLIP BPE: ``vocab`` token -> id, ``merges`` in rank order, and the special
    tokens (which must be in ``vocab``) recognised by the split."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    missing = [t for t in special_tokens if t not in vocab]
    if missing:
        raise ValueError(f"special tokens {missing} are not in the vocabulary")
    model = models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], end_of_word_suffix=END_OF_WORD)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex(special_tokens)), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok.to_str()


@dataclass(frozen=True)
class TokenizerSpec:
    """What ``manifest.json`` records about the tokenizer next to ``tokenizer.json``."""

    context_length: int
    sot_token_id: int
    eot_token_id: int
    special_tokens: tuple[str, ...]
    clean: str = "lower"
    kind: str = "open_clip SimpleTokenizer"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "clean": self.clean, "context_length": self.context_length,
                "sot_token_id": self.sot_token_id, "eot_token_id": self.eot_token_id,
                "special_tokens": list(self.special_tokens)}

    @classmethod
    def from_json(cls, data: Any, source: str) -> TokenizerSpec:
        try:
            spec = cls(int(data["context_length"]), int(data["sot_token_id"]), int(data["eot_token_id"]),
                       tuple(str(t) for t in data["special_tokens"]), str(data["clean"]), str(data["kind"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RuntimeSetupError(f"{source}: malformed tokenizer description ({exc!r})") from None
        if spec.clean != "lower" or spec.kind != "open_clip SimpleTokenizer":
            raise RuntimeSetupError(f"{source}: tokenizer {spec.kind!r} with clean={spec.clean!r} is not supported "
                                    "by this diki-edge")
        if not 2 <= spec.context_length <= MAX_CONTEXT_LENGTH:
            raise RuntimeSetupError(f"{source}: tokenizer context_length must be within 2 .. {MAX_CONTEXT_LENGTH}, "
                                    f"not {spec.context_length}")
        return spec


class ClipTokenizer:
    """Texts -> ``[N, context_length]`` int64 token ids, identical to the backbone's open_clip tokenizer."""

    def __init__(self, tokenizer_json_text: str, spec: TokenizerSpec, source: str = TOKENIZER_SOURCE):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise RuntimeSetupError(f"the 'tokenizers' package is not installed ({exc}); "
                                    "pip install tokenizers (a dependency of diki-edge-runtime)") from None
        try:
            tok = Tokenizer.from_str(tokenizer_json_text)
        except Exception as exc:
            raise RuntimeSetupError(f"{source}: cannot read the tokenizer: {exc}") from None
        self.spec = spec
        vocab = tok.get_vocab_size(with_added_tokens=True)
        for field, value in (("sot_token_id", spec.sot_token_id), ("eot_token_id", spec.eot_token_id)):
            if not 0 <= value < vocab:
                raise RuntimeSetupError(f"{source}: the manifest's text.tokenizer.{field} {value} is outside this "
                                        f"tokenizer's vocabulary (0 .. {vocab - 1})")
        self._specials = {t: tok.token_to_id(t) for t in spec.special_tokens}
        if any(i is None for i in self._specials.values()) or tok.pre_tokenizer is None:
            raise RuntimeSetupError(f"{source}: not a diki-edge CLIP tokenizer (special tokens "
                                    f"{list(spec.special_tokens)} or the split are missing)")
        self._pre = tok.pre_tokenizer
        self._model = tok.model

    @classmethod
    def from_file(cls, path: str | os.PathLike, spec: TokenizerSpec) -> ClipTokenizer:
        path = Path(path)
        return cls(read_limited_text(path, "tokenizer", TEXT_TABLE_MAX_BYTES), spec, str(path))

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    def encode(self, text: str) -> list[int]:
        """Token ids of one text without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, not {type(text).__name__}")
        ids: list[int] = []
        for piece, _ in self._pre.pre_tokenize_str(clean_lower(text)):
            special = self._specials.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(t.id for t in self._model.tokenize(piece))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """``[N, context_length]`` int64: ``[sot] + ids + [eot]``, cut to the context length with eot kept last."""
        if isinstance(texts, str):
            texts = [texts]
        n = self.spec.context_length
        out = np.zeros((len(texts), n), np.int64)
        for i, text in enumerate(texts):
            ids = [self.spec.sot_token_id, *self.encode(text), self.spec.eot_token_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.spec.eot_token_id
            out[i, :len(ids)] = ids
        return out
