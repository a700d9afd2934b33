"""The runtime's torch-free tokenizer against open_clip's, id for id.

``tokenizer.json`` is built by the exporter from the backbone's own open_clip tokenizer; the runtime reproduces
open_clip's cleaning in Python and the split + byte mapping + BPE with Hugging Face ``tokenizers``. Checked on
more than 2,000 strings: every class name and template in the repository, and the cases where CLIP tokenizer
re-implementations drift (accents, CJK, emoji, punctuation runs, HTML entities, mixed case, odd whitespace, the
empty string, special-token literals, strings far past the context length).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")

from diki_edge_export.errors import ExportError  # noqa: E402
from diki_edge_export.text import TOKENIZER_PROBES, export_tokenizer  # noqa: E402
from diki_edge_runtime.tokenizer import ClipTokenizer  # noqa: E402


def repository_strings() -> list[str]:
    """Every class name and template the repository ships (DCIL tasks, pretraining sets, the golden folder's)."""
    from support import golden_script  # tests/support.py

    from diki_edge.datasets.dcil import TEMPLATE
    from diki_edge.datasets.sources import DIGIT_NAMES, FASHION_NAMES, TEXTURE_NAMES, emoji_concepts
    from diki_edge_runtime.contract import DEFAULT_TEMPLATE

    script = golden_script()

    names = set(DIGIT_NAMES) | set(FASHION_NAMES) | set(TEXTURE_NAMES) | {"face", "background"}
    for group in ("jobs", "hands", "sports", "people", "objects"):
        names |= set(emoji_concepts(group).values())
    names |= {c for cs in script.CLASSES.values() for c in cs} | set(script.OTHER_PETS_CLASSES) | set(script.LABELS)
    names |= set(script.TEXTS)
    templates = {TEMPLATE, DEFAULT_TEMPLATE, "a photo of a {}", "{}", "an emoji of a {}.", "a picture of {}!"}
    out = sorted(names) + sorted(templates)
    out += [t.format(n) for n in sorted(names) for t in sorted(templates)[:2]]
    return out


def tricky_strings(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["café", "naïve", "résumé", "Ångström", "São Paulo", "Zürich", "東京", "北京大学", "한국어", "日本語の文",
              "🚀", "🛰️", "👩🏽‍🚀", "🇫🇷", "❤️", "&amp;", "&lt;b&gt;", "&eacute;", "&#x263A;", "&amp;amp;", "&nbsp;",
              "!!!", "?!?!", "...", "---", "(((", "))))", "$$$", "#hashtag", "@user", "e-mail", "x²", "½", "Ⅻ",
              "HELLO", "WoRlD", "iPhone", "McDonald's", "it's", "they'RE", "I'M", "we'd", "y'all", "’s",
              "don’t", "“quoted”", "ﬁne", "ＡＢＣ", "１２３", "e\u0301", "a\u0308", "zero\u200bwidth", "tab\there",
              "new\nline", "nbsp\u00a0here", "\u3000wide space", "ΣΑΣ", "İstanbul", "straße", "ﬀ", "Ⓐ",
              "<start_of_text>", "<end_of_text>", "!<end_of_text>", "<|endoftext|>", "12345", "3.14159", "1,000,000",
              "C++", "C#", "a_b_c"]
    out = ["", " ", "\t\n", "   a   ", "x " * 200, "supercalifragilisticexpialidocious " * 30, "🚀" * 100,
           "東京" * 120, "!" * 500, "a photo of a " + "very " * 100 + "long label."]
    for _ in range(1400):
        k = rng.randint(1, 6)
        words = [rng.choice(pieces) for _ in range(k)]
        seps = [rng.choice([" ", "  ", "", "\t", " \n ", ",", "-"]) for _ in range(k)]
        text = "".join(w + s for w, s in zip(words, seps))
        if rng.random() < 0.2:
            text = text.upper()
        out.append(text)
    return out


@pytest.fixture(scope="module", params=["diki-tiny", "ViT-B-16"])
def tokenizers(request):
    """(open_clip tokenizer, runtime tokenizer) for the bundled backbone (context 20) and ViT-B/16 (context 77)."""
    if request.param == "diki-tiny":
        from diki_edge.backbone import load_backbone

        reference = load_backbone("diki-tiny").tokenizer
    else:
        reference = open_clip.get_tokenizer("ViT-B-16")
    spec, text = export_tokenizer(reference, [])
    return reference, ClipTokenizer(text, spec)


def test_token_ids_identical_to_open_clip(tokenizers):
    reference, ours = tokenizers
    strings = repository_strings() + tricky_strings() + list(TOKENIZER_PROBES)
    assert len(strings) >= 2000
    want = reference(strings).numpy()
    got = ours(strings)
    assert got.dtype == np.int64 and got.shape == want.shape == (len(strings), reference.context_length)
    bad = [s for s, a, b in zip(strings, want, got) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    # truncation as open_clip: the context is full and ends with end-of-text; the empty string is [sot, eot]
    long = ours(["x " * 200])[0]
    assert (long != 0).all() and long[-1] == reference.eot_token_id and long[0] == reference.sot_token_id
    assert list(ours([""])[0][:3]) == [reference.sot_token_id, reference.eot_token_id, 0]


def test_a_tokenizer_the_runtime_cannot_reproduce_fails_the_export():
    from open_clip.tokenizer import SimpleTokenizer

    with pytest.raises(ExportError, match="clean"):
        export_tokenizer(SimpleTokenizer(clean="whitespace"), [])
    with pytest.raises(ExportError, match="reduction mask"):
        export_tokenizer(SimpleTokenizer(reduction_mask="simple"), [])
    with pytest.raises(ExportError, match="cannot be reproduced"):
        export_tokenizer(object(), [])

    class Drifted(SimpleTokenizer):  # behaves differently from what its class promises
        def encode(self, text):
            return super().encode(text.replace("cat", "dog"))

    with pytest.raises(ExportError, match="differs from the backbone's open_clip tokenizer on 1 of"):
        export_tokenizer(Drifted(), [])  # "a photo of a cat." is one of the probes
