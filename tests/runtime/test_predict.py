"""The torch-free Predictor on the committed golden model folder (tests/runtime/golden): parity with the PyTorch
reference outputs stored beside it, bank swaps, bad inputs, concurrency and the ``predict`` command (JSON through
a subprocess where torch cannot be imported).

The folder (scripts/make_golden_model.py) holds the tiny backbone exported with three synthetic tasks fitted to
crops of scikit-image photographs, so that unseen crops of those photographs are familiar and pass 2 runs for
them; ``golden.npz`` holds what ``CalibratedDiki`` computed for its images under each bank.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from support import BLOCK_TORCH, REPO  # tests/support.py

from diki_edge_runtime import Predictor
from diki_edge_runtime import calibration as calib
from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.errors import BankError

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def predictor(golden) -> Predictor:
    return Predictor(golden.model_dir, threads=2)


def _check_against_reference(golden, results, names: list[str], bank: str) -> dict[str, np.ndarray]:
    """The Predictor's results for the golden images ``names`` equal the PyTorch reference under ``bank``."""
    rows = [golden.names.index(n) for n in names]
    ref = {k: v[rows] for k, v in golden.reference(bank).items()}
    task_bank = golden.banks[bank]
    for i, res in enumerate(results):
        assert res.ok, res.error
        assert res.task_index == int(ref["task"][i])
        assert res.task == task_bank.task_names[res.task_index]
        assert abs(res.weight - float(ref["weight"][i])) <= 1e-5
        assert np.abs(res.image_embeds - ref["image_embeds"][i]).max() <= 1e-4
        assert res.top_k[0][0] == task_bank.class_names[int(np.argmax(ref["logits"][i]))]
        np.testing.assert_allclose(res.task_scores, ref["task_scores"][i], rtol=1e-5, atol=1e-3)
    return ref


def test_model_folder_contract(golden):
    for name in ("model.onnx", "bank.safetensors", "preprocess.json", "manifest.json", "text.onnx",
                 "tokenizer.json"):
        assert (golden.model_dir / name).is_file(), name


def test_predictions_match_pytorch(golden, predictor):
    results = predictor.predict([str(p) for p in golden.files], top_k=3, batch_size=4)
    assert [r.input for r in results] == [str(p) for p in golden.files]
    ref = _check_against_reference(golden, results, golden.names, "three")
    # familiar images select their own task with a high M; pass 2 therefore ran for them
    familiar = golden.meta["familiar_task"]
    bank = golden.banks["three"]
    for name, res in zip(golden.names, results):
        if familiar.get(name) in bank.task_names:
            assert res.task == familiar[name] and res.weight > 0.05, (name, res.task, res.weight)
    assert (ref["weight"] > 0.05).any() and (ref["weight"] < 1e-6).any()  # both graph paths exercised
    classes = golden.meta["classes"]
    for res in results:
        assert len(res.top_k) == min(3, len(classes[res.task]))
        assert all(c in classes[res.task] for c, _ in res.top_k)
        probs = [p for _, p in res.top_k]
        assert probs == sorted(probs, reverse=True)


def test_mixed_input_kinds_give_the_same_answers(golden, predictor):
    im = golden.image("chelsea_0")
    path = golden.files[golden.names.index("chelsea_0")]
    results = predictor.predict([str(path), path, im, np.asarray(im)], batch_size=3)
    first = results[0]
    for res in results[1:]:
        assert res.ok and res.task == first.task and res.top_k[0][0] == first.top_k[0][0]
        assert np.abs(res.image_embeds - first.image_embeds).max() <= 1e-6
    assert predictor.predict(im)[0].task == first.task  # a single input works too


def test_results_do_not_depend_on_batch_size(golden, predictor):
    files = [str(p) for p in golden.files]
    a = predictor.predict(files, batch_size=1)
    b = predictor.predict(files, batch_size=16)
    for x, y in zip(a, b):
        assert x.task == y.task and x.top_k[0][0] == y.top_k[0][0]
        assert np.abs(x.image_embeds - y.image_embeds).max() <= 1e-5


def test_bad_inputs_never_lose_the_batch(golden, tmp_path):
    p = Predictor(golden.model_dir, threads=1, max_pixels=2_000_000)
    good = golden.files[0]
    data = good.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("hello")
    Image.new("L", (2000, 1500)).save(tmp_path / "bomb.png")
    src = golden.image("coffee_0")
    gray16 = (np.asarray(src.convert("L")).astype(np.uint32) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    src.convert("CMYK").save(tmp_path / "cmyk.jpg")
    src.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    rgba = src.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    src.convert("L").save(tmp_path / "gray.png")
    inputs = [str(good), str(tmp_path / "missing.jpg"), str(tmp_path / "empty.jpg"), str(tmp_path / "trunc.png"),
              str(tmp_path / "notes.txt"), str(tmp_path / "bomb.png"), str(tmp_path / "gray16.png"),
              str(tmp_path / "cmyk.jpg"), str(tmp_path / "palette.png"), str(tmp_path / "rgba.png"),
              str(tmp_path / "gray.png"), np.zeros((4, 4), np.float64), 42]
    results = p.predict(inputs, batch_size=4)
    assert len(results) == len(inputs)
    kinds = [r.error_kind for r in results]
    assert kinds == [None, "not_found", "empty", "truncated", "not_an_image", "too_large", None, None, None, None,
                     None, "unsupported", "unsupported"]
    for r in results:
        if not r.ok:
            assert r.error and r.task is None and r.top_k == []
            assert r.to_json()["error"] == {"kind": r.error_kind, "message": r.error}
    alone = p.predict([str(good)])[0]
    assert np.abs(alone.image_embeds - results[0].image_embeds).max() <= 1e-5
    # converted modes: the same answers as the image converted by hand (16-bit scaled, not clipped)
    by_hand = p.predict([src.convert("L").convert("RGB")])[0]
    assert results[6].task == by_hand.task and np.abs(results[6].image_embeds - by_hand.image_embeds).max() <= 1e-5


def test_bank_swap_more_fewer_and_other_classes(golden, tmp_path):
    p = Predictor(golden.model_dir, threads=1)
    names = ["chelsea_0", "astronaut_0", "rocket_1", "camera"]
    images = [golden.image(n) for n in names]
    before = p.predict(images)
    _check_against_reference(golden, before, names, "three")
    assert before[1].task != "portraits"
    # more tasks: the fourth one is recognised, on the same session
    more = golden.banks["four"]
    p.load_bank(more.save(tmp_path / "more.safetensors"))
    assert p.tasks == more.task_names == ["pets", "drinks", "space", "portraits"]
    res = p.predict(images)
    _check_against_reference(golden, res, names, "four")
    assert res[1].task == "portraits" and res[1].weight > 0.05
    # fewer tasks: a task's score and M do not depend on the other tasks in the bank
    three = golden.banks["three"]
    space = three.task_names.index("space")
    p.load_bank(three.select([space]))
    res = p.predict(images)
    assert {r.task for r in res} == {"space"}
    ref = golden.reference("three")
    for name, r in zip(names, res):
        row = golden.names.index(name)
        score = ref["task_scores"][row, space]
        np.testing.assert_allclose(r.task_scores, [score], rtol=1e-5, atol=1e-3)
        slope, bias = three.arrays["calib_slope"][space], three.arrays["calib_bias"][space]
        assert abs(r.weight - float(calib.weight(score, slope, bias))) <= 1e-5
        if int(ref["task"][row]) == space:  # the same task selected: the same embedding as with three tasks
            assert np.abs(r.image_embeds - ref["image_embeds"][row]).max() <= 1e-4
    # other classes for a task of the same name
    changed = golden.banks["other-classes"]
    p.load_bank(changed.save(tmp_path / "changed.safetensors"))
    res = p.predict(images)
    _check_against_reference(golden, res, names, "other-classes")
    assert res[0].task == "pets" and res[0].top_k[0][0] in set(golden.meta["other_pets_classes"])
    # back to the original bank: the original answers
    p.load_bank(golden.bank_path)
    again = p.predict(images)
    for x, y in zip(before, again):
        assert x.task == y.task and x.top_k == y.top_k


def _rewrite_metadata(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="numpy") as fh:
        meta = json.loads(fh.metadata()["diki_edge"])
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(meta, arrays)
    save_file(arrays, str(dst), metadata={"diki_edge": json.dumps(meta)})
    return dst


def test_incompatible_banks_are_refused_and_the_previous_stays(golden, tmp_path):
    p = Predictor(golden.model_dir, threads=1)
    images = [golden.image("chelsea_0"), golden.image("rocket_0")]
    before = p.predict(images)

    def other_backbone(meta, arrays):
        meta["layout"]["backbone"]["weights_sha256"] = "0" * 64

    def other_depth(meta, arrays):
        meta["layout"]["image_layers"] = 1
        arrays["bank_k"] = np.ascontiguousarray(arrays["bank_k"][:, :1])
        arrays["bank_v"] = np.ascontiguousarray(arrays["bank_v"][:, :1])

    def newer_format(meta, arrays):
        meta["format_version"] = 99

    cases = {"backbone": (other_backbone, "backbone weights differ"),
             "depth": (other_depth, "image_layers differs"),
             "format": (newer_format, "format version 99")}
    for name, (edit, message) in cases.items():
        bad = _rewrite_metadata(golden.bank_path, tmp_path / f"{name}.safetensors", edit)
        with pytest.raises(BankError, match=message):
            p.load_bank(bad)
        assert p.bank is not None and p.tasks == golden.banks["three"].task_names
    with pytest.raises(BankError, match="not found"):
        p.load_bank(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(BankError):
        p.load_bank(tmp_path / "junk.safetensors")
    with pytest.raises(BankError, match="no tasks"):
        p.load_bank(TaskBank.empty(golden.banks["three"].layout))
    after = p.predict(images)
    for x, y in zip(before, after):
        assert x.task == y.task and x.top_k == y.top_k


def test_threads_give_the_same_results_as_serial(golden, predictor):
    files = [str(p) for p in golden.files]
    serial = predictor.predict(files, batch_size=3)
    outcomes: dict[int, list] = {}
    errors = []

    def work(k: int) -> None:
        try:
            outcomes[k] = [predictor.predict(files[i::2] + files[:i], batch_size=2 + k % 3) for i in range(2)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    by_input = {r.input: r for r in serial}
    for runs in outcomes.values():
        for run in runs:
            for r in run:
                s = by_input[r.input]
                assert r.task == s.task and [c for c, _ in r.top_k] == [c for c, _ in s.top_k]
                assert np.abs(r.image_embeds - s.image_embeds).max() <= 1e-5


def test_bank_swap_while_predicting(golden, tmp_path):
    """A swap in another thread never mixes banks within one call."""
    p = Predictor(golden.model_dir, threads=1)
    fewer = golden.banks["three"].select([2])
    files = [str(f) for f in golden.files]
    seen = []

    def swapper():
        for _ in range(3):
            p.load_bank(fewer)
            p.load_bank(golden.banks["three"])

    t = threading.Thread(target=swapper)
    t.start()
    for _ in range(3):
        seen.append({(r.task, r.task_index) for r in p.predict(files, batch_size=2)})
    t.join()
    full = {(t, i) for i, t in enumerate(golden.banks["three"].task_names)}
    for pairs in seen:  # every call used one bank: all ("space", 0) or all consistent with the full bank
        assert pairs == {("space", 0)} or pairs <= full, pairs


def test_setup_errors(golden, tmp_path):
    from diki_edge_runtime.errors import RuntimeSetupError

    with pytest.raises(RuntimeSetupError, match="model folder not found"):
        Predictor(tmp_path / "nowhere")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(RuntimeSetupError, match="manifest"):
        Predictor(empty)
    import shutil

    broken = tmp_path / "v2-model"
    shutil.copytree(golden.model_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format_version"] = 2
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeSetupError, match="format version"):
        Predictor(broken)
    if not HAS_CUDA:
        with pytest.raises(RuntimeSetupError, match="CUDA"):
            Predictor(golden.model_dir, provider="cuda")


# ---------------------------------------------------------------------------- the command, without torch
CLI = BLOCK_TORCH + """
import sys
from diki_edge_runtime.cli import main
try:
    main(["predict", *sys.argv[1:]])
finally:
    bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip")]
    assert not bad, bad
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_json_lines_without_torch(golden, tmp_path):
    img_dir = tmp_path / "photos"
    (img_dir / "sub").mkdir(parents=True)
    names = ["b.png", "a.png", "sub/c.png"]
    for name, src in zip(names, golden.files):
        (img_dir / name).write_bytes(src.read_bytes())
    (img_dir / "readme.txt").write_text("not picked up from a directory")
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    res = _cli(str(img_dir), str(tmp_path / "bad.jpg"), str(tmp_path / "missing.png"), str(tmp_path / "zz*.png"),
               "--model", str(golden.model_dir), "--json", "--top-k", "2", "--batch-size", "2", "--quiet")
    assert res.returncode == 1, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    inputs = [d["input"] for d in lines]
    assert inputs == [str(img_dir / "a.png"), str(img_dir / "b.png"), str(img_dir / "sub" / "c.png"),
                      str(tmp_path / "bad.jpg"), str(tmp_path / "missing.png"), str(tmp_path / "zz*.png")]
    keys = {"input", "ok", "task", "task_index", "weight", "top_k", "image_embeds", "frozen_embeds", "error"}
    for d in lines:
        assert set(d) == keys
    ok = [d for d in lines if d["ok"]]
    assert len(ok) == 3
    for d in ok:
        assert d["error"] is None and len(d["top_k"]) == 2 and set(d["top_k"][0]) == {"class", "probability"}
    assert [d["error"]["kind"] for d in lines if not d["ok"]] == ["not_an_image", "not_found", "not_found"]
    assert "no files match" in lines[-1]["error"]["message"]
    # the same predictions as the Python API (same batches, so the same numbers)
    p = Predictor(golden.model_dir, threads=1)
    api = [r.to_json() for r in p.predict([str(img_dir / n) for n in ("a.png", "b.png")], top_k=2, batch_size=2)]
    for got, want in zip(lines[:2], api):
        assert {k: v for k, v in got.items() if k not in ("weight", "top_k")} == \
            {k: v for k, v in want.items() if k not in ("weight", "top_k")}
        assert abs(got["weight"] - want["weight"]) <= 1e-5
        assert [t["class"] for t in got["top_k"]] == [t["class"] for t in want["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in got["top_k"]],
                                   [t["probability"] for t in want["top_k"]], atol=1e-5)


def test_cli_table_exit_codes_and_bank_option(golden, tmp_path):
    fewer = golden.banks["three"].select([1]).save(tmp_path / "drinks.safetensors")
    res = _cli(str(golden.files[0]), "--model", str(golden.model_dir), "--bank", str(fewer), "--top-k", "1")
    assert res.returncode == 0, res.stderr
    assert "drinks" in res.stdout and "CPUExecutionProvider" in res.stderr
    res = _cli(str(golden.files[0]), "--model", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "not found" in res.stderr
    res = _cli(str(golden.files[0]), "--model", str(golden.model_dir), "--provider", "cuda")
    if not HAS_CUDA:
        assert res.returncode == 2 and "CUDA" in res.stderr


# ---------------------------------------------------------------------------- IO binding (the CUDA code path)
def test_io_binding_path_uploads_the_bank_once(golden, predictor, tmp_path):
    """The CUDA path (bank as OrtValues bound per call) run with host OrtValues: same answers, one upload per
    bank, none per call, none for a refused bank."""
    p = Predictor(golden.model_dir, threads=1, io_binding=True)
    assert p.session.io_binding and p.session.bank_uploads == 1
    files = [str(f) for f in golden.files]
    plain = predictor.predict(files, batch_size=4)
    for _ in range(3):
        bound = p.predict(files, batch_size=4)
    assert p.session.bank_uploads == 1
    for x, y in zip(plain, bound):
        assert x.task == y.task and x.top_k[0][0] == y.top_k[0][0]
        assert np.abs(x.image_embeds - y.image_embeds).max() <= 1e-5
    p.load_bank(golden.banks["three"].select([2]))
    assert p.session.bank_uploads == 2
    with pytest.raises(BankError):
        p.load_bank(TaskBank.empty(golden.banks["three"].layout))
    assert p.session.bank_uploads == 2 and p.tasks == ["space"]
    assert {r.task for r in p.predict(files)} == {"space"}


def test_diki_edge_predict_entry_point_without_torch(golden):
    script = BLOCK_TORCH + """
from diki_edge_runtime.cli import main
try:
    main()
finally:
    bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip")]
    assert not bad, bad
"""
    res = subprocess.run([sys.executable, "-c", script, "predict", str(golden.files[0]), "--model",
                          str(golden.model_dir), "--json", "--quiet"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.splitlines()
    assert json.loads(line)["ok"] is True
