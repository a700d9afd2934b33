"""The text encoder graph (issue 10, must-hold 1): the bank's text side as inputs, validated at export, declared in
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
    assert text["inputs"]["text_tokens"] == {"shape": ["prompts", 16], "dtype": "int64"}
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
    assert shapes["text_tokens"][0] == "prompts" and shapes["text_k"][0] == "tasks"


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
