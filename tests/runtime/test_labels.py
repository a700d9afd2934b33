"""Labels at prediction time and embeddings out, torch-free, on the golden folder:
``Predictor.predict(labels=...)`` against the PyTorch reference stored beside it (``CalibratedDiki`` with the
labels' text table, ``three.labels.*`` in golden.npz), the lazy, bounded label-table cache, ``encode_text``, the
embeddings in the API and in ``--json --embeddings``, and the command line's label options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support import BLOCK_TORCH, REPO, cli_in_process  # tests/support.py

from diki_edge_runtime import Predictor


@pytest.fixture(scope="module")
def labels(golden) -> list[str]:
    return golden.meta["labels"]


def _probs(res, labels) -> np.ndarray:
    got = dict(res.top_k)
    return np.array([got[label] for label in labels])


def test_labels_run_diki_exactly_as_the_pytorch_reference(golden, labels):
    p = Predictor(golden.model_dir, threads=2)
    results = p.predict([str(f) for f in golden.files], labels=labels, template=golden.meta["labels_template"],
                        top_k=len(labels), batch_size=4)
    ref = {k: golden.outputs[f"three.labels.{k}"] for k in ("task", "weight", "probs")}
    assert (ref["weight"] > 0.05).any() and (ref["weight"] < 1e-6).any()  # familiar and unfamiliar images
    grid = np.asarray(golden.banks["three"].layout.calibration_levels)
    assert any(np.min(np.abs(grid - w)) > 1e-3 for w in ref["weight"])  # some M between levels: interpolation
    for i, res in enumerate(results):
        assert res.ok, res.error
        assert res.task_index == int(ref["task"][i]) and abs(res.weight - float(ref["weight"][i])) <= 1e-5
        assert res.top_k[0][0] == labels[int(np.argmax(ref["probs"][i]))]  # the same top-1 on every image
        assert np.abs(_probs(res, labels) - ref["probs"][i]).max() <= 1e-4
        assert [c for c, _ in res.top_k] == sorted(labels, key=lambda c: -dict(res.top_k)[c])
    # the labels really run under the selected task's adapter: the frozen text encoder would give other numbers
    frozen = p.encode_text([golden.meta["labels_template"].format(label) for label in labels])
    i = next(i for i, r in enumerate(results) if r.weight > 0.5)
    plain = golden.banks["three"].layout.logit_scale * frozen @ results[i].image_embeds
    plain = np.exp(plain - plain.max()) / np.exp(plain - plain.max()).sum()
    assert np.abs(plain - _probs(results[i], labels)).max() > 1e-3


def _file(golden, prefix: str) -> str:
    return str(next(f for f in golden.files if f.name.startswith(prefix)))


def test_tables_are_lazy_cached_per_label_set_and_dropped_on_load_bank(golden, labels):
    p = Predictor(golden.model_dir, threads=1)
    c = len(labels)
    familiar, noise = _file(golden, "chelsea"), _file(golden, "noise")
    assert p._text is None  # an image-only caller never opens the text graph
    first = p.predict([familiar], labels=labels, top_k=c)[0]
    encoder = p.text_encoder()
    g = len(golden.banks["three"].layout.calibration_levels)
    assert 0 < first.weight < 1 and min(abs(first.weight * (g - 1) - k) for k in range(g)) > 1e-6
    assert encoder.prompts_encoded == 2 * c  # the two levels around this image's M, one task
    assert p.predict([noise], labels=labels)[0].weight < 1e-6
    assert encoder.prompts_encoded == 3 * c  # + the frozen level (M = 0), shared by every task
    again = p.predict([familiar, noise], labels=labels, top_k=c)
    assert encoder.prompts_encoded == 3 * c  # cached: no text pass at all
    assert [c for c, _ in again[0].top_k] == [c for c, _ in first.top_k]
    assert np.abs(_probs(again[0], labels) - _probs(first, labels)).max() <= 1e-5  # (a batch of 2 vs 1)
    tables = p.label_tables
    assert len(tables) == 1 and tables.nbytes > 0
    p.predict([noise], labels=labels, template="an image of {}")  # another label set: its own tables
    assert encoder.prompts_encoded == 4 * c and len(tables) == 2
    p.load_bank(golden.bank_path)  # the same bank file again: tables belong to a bank state, dropped
    assert p.label_tables is not tables and len(p.label_tables) == 0
    p.predict([noise], labels=labels)
    assert encoder.prompts_encoded == 5 * c


def test_label_cache_is_bounded(golden, labels):
    files = [str(f) for f in golden.files]
    sets = [[f"{label} {k}" for label in labels] for k in range(4)]
    big = Predictor(golden.model_dir, threads=1)
    for s in sets:
        big.predict(files, labels=s)
    bound = int(big.label_tables.nbytes / len(big.label_tables) * 2.5)
    small = Predictor(golden.model_dir, threads=1, label_cache_bytes=bound)
    for s in sets:
        got, want = small.predict(files, labels=s), big.predict(files, labels=s)
        assert small.label_tables.nbytes <= bound
        assert [r.top_k for r in got] == [r.top_k for r in want]
    assert len(small.label_tables) == 2  # the two most recently used sets
    none = Predictor(golden.model_dir, threads=1, label_cache_bytes=0)  # nothing kept, the same answers
    assert [r.top_k for r in none.predict(files, labels=sets[0])] == \
        [r.top_k for r in big.predict(files, labels=sets[0])]
    assert none.label_tables.nbytes == 0


def test_encode_text_frozen_and_under_a_task(golden):
    p = Predictor(golden.model_dir, threads=1)
    texts, task, weight = golden.meta["texts"], golden.meta["text_task"], golden.meta["text_weight"]
    got = p.encode_text(texts)
    assert got.shape == (len(texts), golden.banks["three"].layout.embed_dim) and got.dtype == np.float32
    assert np.abs(got - golden.outputs["text.frozen"]).max() <= 1e-4
    want = golden.outputs[f"text.{task}@{weight}"]
    assert np.abs(p.encode_text(texts, task=task, weight=weight) - want).max() <= 1e-4
    index = golden.banks["three"].task_names.index(task)
    assert np.abs(p.encode_text(texts, task=index, weight=[weight] * len(texts)) - want).max() <= 1e-4
    for bad in (dict(task=None, weight=0.5), dict(task="nope"), dict(task=7), dict(task=0, weight=1.5),
                dict(task=0, weight=[0.1, 0.2])):
        with pytest.raises(ValueError):
            p.encode_text(texts, **bad)


CLI = BLOCK_TORCH + """
import sys
from diki_edge_runtime.cli import main
main(["predict", *sys.argv[1:]])
"""


def _predict(*args: str) -> tuple[int, str, str]:
    """``diki-edge predict ARGS`` in this process (through ``cli.main``, which prints errors): exit code, stdout,
    stderr."""
    res = cli_in_process("predict", *args)
    return res.exit_code, res.stdout, res.stderr


def test_embeddings_in_the_api_and_in_json_lines_without_torch(golden, tmp_path):
    p = Predictor(golden.model_dir, threads=1)
    results = p.predict([str(f) for f in golden.files])
    ref = golden.reference("three")
    for i, res in enumerate(results):
        assert np.abs(res.frozen_embeds - ref["frozen_embeds"][i]).max() <= 1e-4
        assert np.abs(res.image_embeds - ref["image_embeds"][i]).max() <= 1e-4
        if res.weight < 1e-6:  # pass 2 skipped: the final embedding is the frozen one
            np.testing.assert_array_equal(res.image_embeds, res.frozen_embeds)
    res = subprocess.run([sys.executable, "-c", CLI, str(golden.files[0]), str(tmp_path / "missing.png"), "--model",
                          str(golden.model_dir), "--json", "--embeddings", "--labels", " rocket, cat ,tree",
                          "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    ok, missing = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(ok["image_embeds"]) == len(ok["frozen_embeds"]) == golden.banks["three"].layout.embed_dim
    assert np.abs(np.array(ok["frozen_embeds"]) - results[0].frozen_embeds).max() <= 1e-6
    assert {d["class"] for d in ok["top_k"]} == {"rocket", "cat", "tree"}
    assert missing["image_embeds"] is None and missing["frozen_embeds"] is None and not missing["ok"]


def test_predict_labels_file_and_template_from_the_command_line(golden, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("rocket\n\ncup of coffee\n  cat  \n", encoding="utf-8")
    files = [str(f) for f in golden.files[:4]]
    code, out, err = _predict(*files, "--model", str(golden.model_dir), "--labels-file", str(labels_file),
                              "--template", "an image of a {}", "--json", "--quiet", "--top-k", "3")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    want = Predictor(golden.model_dir, threads=1).predict(files, labels=["rocket", "cup of coffee", "cat"],
                                                          template="an image of a {}", top_k=3)
    for d, r in zip(lines, want):
        assert [(c["class"], round(c["probability"], 4)) for c in d["top_k"]] == \
            [(c, round(p, 4)) for c, p in r.top_k]
    code, out, _ = _predict(files[0], "--model", str(golden.model_dir), "--labels", "rocket,cat")
    assert code == 0 and "rocket" in out and "cat" in out


@pytest.mark.parametrize("args, message", [
    (["--labels", "rocket,,cat"], "empty label"),
    (["--labels", "cat,dog,cat"], "duplicate labels"),
    (["--labels", "cat", "--template", "a photo"], "exactly once"),
    (["--template", "a {}"], "needs --labels"),
    (["--labels", "cat", "--labels-file", "x.txt"], "not both"),
    (["--labels-file", "does-not-exist.txt"], "labels file not found"),
    (["--embeddings"], "pass --json"),
])
def test_bad_labels_are_usage_errors(golden, args, message):
    code, out, err = _predict(str(golden.files[0]), "--model", str(golden.model_dir), *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert out == ""


def test_api_label_errors(golden):
    p = Predictor(golden.model_dir, threads=1)
    for labels, match in (([], "empty"), (["a", "a"], "duplicate"), ("rocket", "not one string"),
                          (["ok", ""], "non-empty")):
        with pytest.raises(ValueError, match=match):
            p.predict([str(golden.files[0])], labels=labels)
    with pytest.raises(ValueError, match="exactly once"):
        p.predict([str(golden.files[0])], labels=["a"], template="{} and {}")
    with pytest.raises(ValueError, match="needs labels"):
        p.predict([str(golden.files[0])], template="a {}")
