"""The text encoder graph: the bank's text side as inputs, validated at export, declared in
the contract and the manifest, any bank and task count on the same file. The fp16/int8 text graphs are checked
beside the image graph's variants in test_export.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from diki_edge.layout import layout_for  # noqa: E402
from diki_edge.model import DikiCLIP  # noqa: E402
from diki_edge.synthetic import synthetic_task  # noqa: E402
from diki_edge_export import export_model  # noqa: E402
from diki_edge_export.errors import ExportError  # noqa: E402
from diki_edge_runtime.bank import TaskBank  # noqa: E402
from diki_edge_runtime.contract import TEXT_INPUT_NAMES, TEXT_OUTPUT_NAMES, Manifest  # noqa: E402
from diki_edge_runtime.tokenizer import ClipTokenizer, TokenizerSpec  # noqa: E402

PROMPTS = ["a photo of a cat.", "a photo of a rocket.", "Café au lait", "東京タワー", "🚀 launch!!!", "x " * 40, ""]


class TextWorld:
    def __init__(self, spec: str, tmp):
        from diki_edge.backbone import load_backbone

        self.backbone = load_backbone(spec)
        self.diki = DikiCLIP(self.backbone.model).eval()
        self.layout = layout_for(self.backbone, self.diki)
        g = torch.Generator().manual_seed(3)
        bank = TaskBank.empty(self.layout)
        for t in range(4):
            images = torch.randn(1, 3, 32, 32, generator=g) + 0.3 * torch.randn(12, 3, 32, 32, generator=g)
            bank = bank.with_task(synthetic_task(self.diki, self.backbone.tokenizer, f"task{t}", [f"c{t}", "d"],
                                                 images, self.layout.calibration_levels, seed=t))
        self.bank = bank
        self.bank_path = bank.save(tmp / "bank.safetensors")
        self.result = export_model(self.bank_path, tmp / "model", backbone=self.backbone, quiet=True)
        self.folder = self.result.out_dir
        self.session = ort.InferenceSession(str(self.folder / "text.onnx"), providers=["CPUExecutionProvider"])
        section = self.result.manifest.text
        self.tokenizer = ClipTokenizer.from_file(self.folder / "tokenizer.json",
                                                 TokenizerSpec.from_json(section.tokenizer, "test"))

    def run(self, tokens, text_k, text_v, task, weight) -> np.ndarray:
        feeds = dict(zip(TEXT_INPUT_NAMES, (tokens, text_k, text_v, task, weight)))
        return self.session.run(list(TEXT_OUTPUT_NAMES), feeds)[0]

    @torch.no_grad()
    def reference(self, prompts, text_k, text_v, task, weight) -> np.ndarray:
        tokens = self.backbone.tokenizer(prompts)
        t = torch.from_numpy(task)
        return self.diki.encode_text(tokens, torch.from_numpy(text_k)[t], torch.from_numpy(text_v)[t],
                                     torch.from_numpy(weight)).numpy()


@pytest.fixture(scope="module")
def tw(tmp_path_factory, tiny_model_spec) -> TextWorld:
    return TextWorld(tiny_model_spec, tmp_path_factory.mktemp("text"))


def test_manifest_declares_the_text_graph(tw):
    manifest = json.loads((tw.folder / "manifest.json").read_text())
    assert Manifest.from_json(manifest) == tw.result.manifest
    text = manifest["text"]
    assert list(text["inputs"]) == list(TEXT_INPUT_NAMES) and list(text["outputs"]) == list(TEXT_OUTPUT_NAMES)
    assert text["inputs"]["text_tokens"] == {"shape": ["prompts", "text_length"], "dtype": "int64"}
    assert text["inputs"]["text_k"]["shape"] == ["tasks", 2, 8, 48]
    assert text["inputs"]["prompt_weight"] == {"shape": ["prompts"], "dtype": "float32"}
    assert text["outputs"]["text_embeds"]["shape"] == ["prompts", 32]
    assert text["files"] == {"model": "text.onnx", "tokenizer": "tokenizer.json"}
    assert text["tokenizer"]["context_length"] == 16 and text["tokenizer"]["kind"] == "open_clip SimpleTokenizer"
    fp32 = text["validation"]["fp32"]
    assert fp32["passed"] and fp32["summary"]["embeds_max_abs"] <= 1e-4
    assert {c["tasks"] for c in fp32["cases"]} == {1, 6}  # 4 bank tasks + 2 probe adapters, and a single task
    assert "frozen_embeds" in manifest["outputs"]
    shapes = {i.name: i.shape for i in tw.session.get_inputs()}
    assert shapes["text_tokens"] == ["prompts", "text_length"] and shapes["text_k"][0] == "tasks"


@pytest.mark.parametrize("tasks", [1, 2, 4])
@pytest.mark.parametrize("prompts", [1, 7])
def test_any_task_count_and_prompt_count_matches_encode_text(tw, tasks, prompts):
    rng = np.random.default_rng(tasks * 10 + prompts)
    bank = tw.bank.select(list(range(tasks)))
    text_k, text_v = bank.arrays["text_k"], bank.arrays["text_v"]
    chosen = PROMPTS[:prompts]
    task = rng.integers(0, tasks, prompts).astype(np.int64)
    weight = rng.uniform(0, 1, prompts).astype(np.float32)
    weight[:2] = (1.0, 0.0)[:prompts] if prompts > 1 else (1.0,)
    got = tw.run(tw.tokenizer(chosen), text_k, text_v, task, weight)
    want = tw.reference(chosen, text_k, text_v, task, weight)
    assert got.shape == (prompts, 32)
    assert np.abs(got - want).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_weight_zero_is_the_frozen_encoder_under_every_task(tw):
    n = len(PROMPTS)
    text_k, text_v = tw.bank.arrays["text_k"], tw.bank.arrays["text_v"]
    tokens = tw.tokenizer(PROMPTS)
    frozen = [tw.run(tokens, text_k, text_v, np.full(n, t, np.int64), np.zeros(n, np.float32)) for t in range(4)]
    for f in frozen[1:]:
        np.testing.assert_array_equal(f, frozen[0])
    with torch.no_grad():
        plain = torch.nn.functional.normalize(tw.backbone.model.encode_text(tw.backbone.tokenizer(PROMPTS)), dim=-1)
    assert np.abs(frozen[0] - plain.numpy()).max() <= 1e-4
    # and M matters: the adapters change the embedding at M = 1
    adapted = tw.run(tokens, text_k, text_v, np.full(n, 1, np.int64), np.ones(n, np.float32))
    assert np.abs(adapted - frozen[0]).max() > 1e-2


def test_unreproducible_tokenizer_fails_the_export_and_writes_nothing(tw, tmp_path):
    from dataclasses import replace

    from open_clip.tokenizer import SimpleTokenizer

    other = replace(tw.backbone, tokenizer=SimpleTokenizer(context_length=16, clean="canonicalize"))
    with pytest.raises(ExportError, match="clean"):
        export_model(tw.bank_path, tmp_path / "out", backbone=other, quiet=True)
    assert not (tmp_path / "out").exists()


# Cutting the token axis is exact in exact arithmetic (the frozen attention is causal, so the cut positions get
# softmax weight exp(-inf) = 0; the residual branch attends to K_r only; the output is read at end-of-text). What
# remains is float32 rounding of GEMMs of other shapes (MLAS picks other blocks; AMX and AVX-512 kernels differ):
# a few ulps (~1e-7 relative) per layer on activations that LayerNorm keeps O(1), through at most 12 layers, on
# unit-norm embeddings whose entries are <= 1: ~1e-6 at most. 1e-5 (the bound) leaves a 10x margin.
TRIM_BOUND = 1e-5


def test_the_text_graph_runs_at_any_length_that_keeps_the_end_of_text(tw):
    from diki_edge_runtime.text import trimmed_length

    text_k, text_v = tw.bank.arrays["text_k"], tw.bank.arrays["text_v"]
    tokens = tw.tokenizer(PROMPTS)  # "x " * 40 is truncated to the context (16), end-of-text kept last
    eot = tw.tokenizer.spec.eot_token_id
    ends = (tokens == eot).argmax(1) + 1
    assert ends.max() == 16 and ends.min() < 8  # both kinds present, so the cut really happens
    n = len(PROMPTS)
    task, weight = np.arange(n, dtype=np.int64) % 4, np.linspace(0, 1, n, dtype=np.float32)
    full = tw.run(tokens, text_k, text_v, task, weight)
    for i, end in enumerate(ends):
        alone = tw.run(tokens[i:i + 1, :end], text_k, text_v, task[i:i + 1], weight[i:i + 1])
        assert np.abs(alone - full[i:i + 1]).max() <= TRIM_BOUND, PROMPTS[i]
    short = tokens[ends <= 8]
    assert trimmed_length(short, eot) == 8 and trimmed_length(tokens, eot) == 16
    assert trimmed_length(short[:, 1:], eot, step=4) == 8  # rounded up to the step
    assert trimmed_length(np.zeros((2, 16), np.int64), eot) == 16  # rows without end-of-text: never cut


def test_the_runtime_text_encoder_cuts_each_chunk_and_keeps_the_input_order(tw):
    from diki_edge_runtime.text import TextEncoder

    encoder = TextEncoder(tw.folder, tw.result.manifest.text)
    assert encoder.dynamic_length
    text_k, text_v = tw.bank.arrays["text_k"], tw.bank.arrays["text_v"]
    prompts = PROMPTS[::-1] + PROMPTS  # long and short prompts interleaved across chunks
    tokens = encoder.tokens(prompts)
    n = len(prompts)
    task, weight = np.arange(n, dtype=np.int64) % 4, np.linspace(0, 1, n, dtype=np.float32)
    calls = []
    run_feeds = encoder.session.run_feeds
    encoder.session.run_feeds = lambda feeds: calls.append(feeds["text_tokens"].shape[1]) or run_feeds(feeds)
    got = encoder.encode_tokens(tokens, text_k, text_v, task, weight, batch_size=4)
    want = tw.run(tokens, text_k, text_v, task, weight)
    assert np.abs(got - want).max() <= TRIM_BOUND  # TRIM_BOUND's analysis: the cut is exact up to rounding
    assert min(calls) == 8 and max(calls) == 16  # short prompts ran cut, the truncated one at the full length
