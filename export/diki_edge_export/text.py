"""The text side of a model folder: the tokenizer file, the text encoder graph and its validation.

* :func:`export_tokenizer` — ``tokenizer.json`` from the backbone's own open_clip tokenizer, checked id for id
  against it (:data:`TOKENIZER_PROBES` plus every class prompt of the bank); a tokenizer the runtime cannot
  reproduce (another class, another cleaning, a reduction mask) fails the export with a message saying so.
* :class:`TextGraph` — ``DikiCLIP.encode_text`` with the text side of the bank as inputs: each prompt gathers its
  task's ``K_r/V_r`` from ``text_k/text_v`` (``[T, L, l, W]``, dynamic ``T``) and runs at its own ``M``; ``M = 0``
  is the frozen text encoder. Inputs and outputs: ``diki_edge_runtime.contract.TEXT_GRAPH_INPUTS/OUTPUTS``.
* :func:`text_cases` / :func:`validate_text_fp32` / :func:`validate_text_variant` — the graph against
  ``DikiCLIP.encode_text`` on the bank's class prompts and probe strings, under the bank's adapters plus two
  random probe adapters (so that the branch really changes the output), at random ``M`` including 0 and 1, with
  the full task count, a single task and a single prompt. Bounds: the image graph's (fp32 max |delta| <= 1e-4;
  fp16 cosine >= 0.999; int8 cosine >= 0.98 and top-1 agreement >= 90 %, as prompt retrieval, see
  :func:`validate_text_variant`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diki_edge.model import DikiCLIP, residual
from diki_edge_export.errors import ExportError
from diki_edge_export.validate import FP32_BOUNDS, Validation, row_cosine
from diki_edge_runtime.contract import TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES
from diki_edge_runtime.tokenizer import ClipTokenizer, TokenizerSpec, tokenizer_json

# Strings every export checks the written tokenizer on (besides the bank's prompts): the cases where
# re-implementations of CLIP's tokenizer are known to drift (cleaning, Unicode classes, specials, truncation).
TOKENIZER_PROBES = (
    "", " ", "a photo of a cat.", "Café naïve résumé Ångström", "東京タワーの写真", "한국어 문장", "🚀🛰️ rocket!!!",
    "&amp;lt;b&amp;gt; bold &eacute; &#x263A;", "HeLLo   WoRLD\t\n tabs", "it's they're I'M we'd", "?!?!... ---",
    "don’t “curly” ‘quotes’", "ﬁne ligature", "ＦＵＬＬ　ｗｉｄｔｈ", "e\u0301 combining", "zero\u200bwidth",
    "<start_of_text>inside<end_of_text>", "!<end_of_text> after punctuation", "ΣΑΣ İstanbul", "x " * 200,
)
PROBE_ADAPTERS = 2  # random text adapters added to the bank's during validation
PROBE_VALUE_SCALE = 0.5
MAX_VALIDATION_PROMPTS = 48


def export_tokenizer(tokenizer: Any, texts: Sequence[str]) -> tuple[TokenizerSpec, str]:
    """``(spec, tokenizer.json text)`` for an open_clip tokenizer, verified on ``texts`` and the probes."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError as exc:  # pragma: no cover - open_clip is a dependency of the training core
        raise ExportError(f"open_clip's tokenizer module is unavailable: {exc}") from None
    name = type(tokenizer).__name__
    if not isinstance(tokenizer, SimpleTokenizer):
        raise ExportError(f"the backbone's tokenizer ({name}) cannot be reproduced without torch: diki-edge's "
                          "runtime reproduces open_clip's SimpleTokenizer (CLIP BPE) only, so labels could not be "
                          "encoded at prediction time")
    if getattr(tokenizer, "clean_fn", None) is not _clean_lower:
        raise ExportError(f"the backbone's {name} cleans text with {getattr(tokenizer.clean_fn, '__name__', '?')}; "
                          "the runtime reproduces clean='lower' only")
    if getattr(tokenizer, "reduction_fn", None) is not None or not getattr(tokenizer, "context_length", None):
        raise ExportError(f"the backbone's {name} uses a token reduction mask or has no context length; the "
                          "runtime reproduces plain truncation only")
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    specials = tuple(tokenizer.decoder[i] for i in tokenizer.all_special_ids)
    spec = TokenizerSpec(int(tokenizer.context_length), int(tokenizer.sot_token_id), int(tokenizer.eot_token_id),
                         specials)
    text = tokenizer_json(tokenizer.encoder, merges, specials)
    ours = ClipTokenizer(text, spec)
    probes = list(TOKENIZER_PROBES) + [str(t) for t in texts]
    want = tokenizer(probes).numpy()
    got = ours(probes)
    bad = [p for p, a, b in zip(probes, want, got) if not np.array_equal(a, b)]
    if bad:
        raise ExportError(f"the runtime tokenizer differs from the backbone's open_clip tokenizer on {len(bad)} of "
                          f"{len(probes)} strings (first: {bad[0][:80]!r}); the export would encode labels "
                          "differently from training, so it stops here")
    return spec, text


class TextGraph(nn.Module):
    """The text graph contract (``TEXT_GRAPH_INPUTS`` -> ``TEXT_GRAPH_OUTPUTS``) as a traceable module.

    ``encoder_dtype=torch.float16`` runs the encoder on a half copy; inputs and outputs stay float32.
    """

    def __init__(self, diki: DikiCLIP, encoder_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.encoder_dtype = encoder_dtype
        self.diki = diki if encoder_dtype == torch.float32 else copy.deepcopy(diki).to(encoder_dtype)

    def forward(self, text_tokens: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor,
                prompt_task: torch.Tensor, prompt_weight: torch.Tensor) -> torch.Tensor:
        dt = self.encoder_dtype
        keys = text_k.index_select(0, prompt_task).to(dt)
        values = text_v.index_select(0, prompt_task).to(dt)
        with residual(self.diki.text_slot, keys, values, prompt_weight.to(dt)):
            f = encode_text_any_length(self.diki.clip, text_tokens)
        return F.normalize(f.float(), dim=-1)


def encode_text_any_length(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` on ``tokens`` of any length ``n`` up to the context length: the positional
    embedding and the causal mask are cut to ``n``, so the traced graph keeps ``text_length`` dynamic.

    Cutting is exact, not an approximation: the frozen attention is causal, the residual branch attends to the
    task's ``K_r`` only, and the output is read at the end-of-text position, so positions after the longest
    prompt's end-of-text token never reach the output. Text towers that already cut to the input's length
    (open_clip's ``TextTransformer`` of ``CustomTextCLIP``) run as they are.
    """
    if not hasattr(clip, "positional_embedding") or not hasattr(clip, "token_embedding"):
        return clip.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    n = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype)
    x = x + clip.positional_embedding[:n].to(cast_dtype)
    mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
    x = clip.ln_final(clip.transformer(x, attn_mask=mask))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is not None:
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
    return x


@dataclass
class TextCase:
    name: str
    tokens: np.ndarray  # [P, context_length] int64
    text_k: np.ndarray  # [T, L, l, W] float32
    text_v: np.ndarray
    task: np.ndarray  # [P] int64
    weight: np.ndarray  # [P] float32

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(TEXT_INPUT_NAMES, (self.tokens, self.text_k, self.text_v, self.task, self.weight)))


def text_cases(bank, tokenizer: ClipTokenizer, seed: int = 0) -> list[TextCase]:
    """Validation cases over the bank's text adapters plus random probe adapters (see the module docstring)."""
    rng = np.random.default_rng(seed)
    text_k = np.asarray(bank.arrays["text_k"], np.float32)
    text_v = np.asarray(bank.arrays["text_v"], np.float32)
    shape = text_k.shape[1:]
    probe_k = rng.uniform(-1, 1, (PROBE_ADAPTERS, *shape)).astype(np.float32)
    probe_v = (rng.standard_normal((PROBE_ADAPTERS, *shape)) * PROBE_VALUE_SCALE).astype(np.float32)
    text_k, text_v = np.concatenate([text_k, probe_k]), np.concatenate([text_v, probe_v])
    prompts = [t.template.format(c) for t in bank.tasks for c in t.classes]
    prompts = (prompts + [p for p in TOKENIZER_PROBES if p.strip()])[:MAX_VALIDATION_PROMPTS]
    tokens = tokenizer(prompts)
    n, t = len(prompts), text_k.shape[0]
    weight = rng.uniform(0, 1, n).astype(np.float32)
    weight[:4] = (0.0, 1.0, 0.0, 1.0)
    task = rng.integers(0, t, n).astype(np.int64)
    task[-PROBE_ADAPTERS:] = np.arange(t - PROBE_ADAPTERS, t)
    return [
        TextCase("all tasks", tokens, text_k, text_v, task, weight),
        TextCase("one task", tokens, text_k[-1:], text_v[-1:], np.zeros(n, np.int64), weight),
        TextCase("single prompt", tokens[:1], text_k, text_v, task[-1:], np.array([0.5], np.float32)),
    ]


@torch.no_grad()
def text_reference(diki: DikiCLIP, case: TextCase) -> np.ndarray:
    """``DikiCLIP.encode_text`` of one case: ``[P, D]``."""
    task = torch.from_numpy(case.task)
    keys = torch.from_numpy(case.text_k)[task]
    values = torch.from_numpy(case.text_v)[task]
    return diki.encode_text(torch.from_numpy(case.tokens), keys, values, torch.from_numpy(case.weight)).numpy()


def text_runner(session) -> Callable[[TextCase], np.ndarray]:
    def run(case: TextCase) -> np.ndarray:
        return session.run(list(TEXT_OUTPUT_NAMES), case.feeds())[0]

    return run


def validate_text_fp32(run: Callable[[TextCase], np.ndarray], cases: list[TextCase],
                       refs: dict[str, np.ndarray], provider: str) -> Validation:
    bound = FP32_BOUNDS["embeds_max_abs"]
    v = Validation("text fp32", provider, bounds={"embeds_max_abs": bound})
    for case in cases:
        diff = float(np.max(np.abs(run(case) - refs[case.name]), initial=0.0))
        v.cases.append({"name": case.name, "prompts": int(len(case.tokens)), "tasks": int(len(case.text_k)),
                        "embeds_max_abs": diff})
        if not diff <= bound:
            v.failures.append(f"{case.name}: text embeds max |delta| = {diff:.3g} > {bound:g}")
    v.passed = not v.failures
    v.summary = {"embeds_max_abs": max(c["embeds_max_abs"] for c in v.cases),
                 "prompts": sum(c["prompts"] for c in v.cases)}
    return v


def validate_text_variant(variant: str, run: Callable[[TextCase], np.ndarray], cases: list[TextCase],
                          refs: dict[str, np.ndarray], provider: str, min_cosine: float,
                          min_top1: float | None = None) -> Validation:
    """A reduced-precision text graph against the fp32 reference: per-prompt cosine, and top-1 agreement as
    retrieval: each prompt's reduced-precision embedding must be nearest to its own fp32 embedding among all the
    case's fp32 embeddings (the quantisation error stays below the distance between different prompts). An
    image-to-prompt argmax was tried first and flips on near-ties of random test backbones."""
    bounds = {"cosine_min": min_cosine, **({"top1_agreement": min_top1} if min_top1 is not None else {})}
    v = Validation(f"text {variant}", provider, bounds=bounds)
    agree = total = 0
    for case in cases:
        got, ref = run(case), refs[case.name]
        cos = row_cosine(got, ref)
        same = int(np.sum(np.argmax(got @ ref.T, 1) == np.arange(len(ref))))
        agree, total = agree + same, total + len(ref)
        v.cases.append({"name": case.name, "prompts": int(len(case.tokens)), "cosine_min": float(cos.min()),
                        "top1_agree": same})
    v.summary = {"cosine_min": min(c["cosine_min"] for c in v.cases), "top1_agreement": agree / max(total, 1)}
    if not v.summary["cosine_min"] >= min_cosine:
        v.failures.append(f"text embedding cosine vs fp32 {v.summary['cosine_min']:.5f} < {min_cosine}")
    if min_top1 is not None and not v.summary["top1_agreement"] >= min_top1:
        v.failures.append(f"image-to-prompt top-1 agreement with fp32 {v.summary['top1_agreement']:.3f} < {min_top1}")
    v.passed = not v.failures
    return v
