"""The bank file: round trip, merge/remove/rename, clear errors, atomic writes, nothing unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diki_edge_runtime.bank import FORMAT_VERSION, METADATA_KEY, TaskBank
from diki_edge_runtime.errors import BankError


@pytest.fixture()
def bank_setup(layout, make_task):
    """(layout, task factory) -- banks from numpy arrays (tests/runtime/conftest.py)."""
    return layout, make_task


def test_round_trip_preserves_everything(tmp_path, bank_setup):
    layout, task = bank_setup
    bank = TaskBank.empty(layout).with_task(task("a", 3, 0)).with_task(task("b", 2, 1))
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = TaskBank.load(path, expect=layout)
    assert loaded.task_names == ["a", "b"]
    assert loaded.class_names == ["a class 0", "a class 1", "a class 2", "b class 0", "b class 1"]
    assert loaded.arrays["class_task"].tolist() == [0, 0, 0, 1, 1]
    for k, v in bank.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[k], v)
    meta = json.loads(__import__("safetensors").safe_open(str(path), "numpy").metadata()[METADATA_KEY])
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["layout"]["backbone"]["weights_sha256"] == layout.backbone_hash
    assert meta["tasks"][0]["num_samples"] == 20 and meta["tasks"][1]["template"] == "a photo of a {}."


def test_merge_remove_rename(bank_setup):
    layout, task = bank_setup
    ta, tb, tc = task("a", 3, 0), task("b", 2, 1), task("c", 4, 2)
    ab = TaskBank.empty(layout).with_task(ta).with_task(tb)
    c = TaskBank.empty(layout).with_task(tc)
    merged = ab.merged(c)
    assert merged.task_names == ["a", "b", "c"]
    assert merged.arrays["class_task"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    # each task's slice survives the merge unchanged (tasks are independent)
    np.testing.assert_array_equal(merged.task_slice("c").image_k, tc.image_k)
    np.testing.assert_array_equal(merged.task_slice("c").class_embeds, tc.class_embeds)
    removed = merged.without("b")
    assert removed.task_names == ["a", "c"] and removed.arrays["class_task"].tolist() == [0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_array_equal(removed.arrays["gauss_whiten"][1], merged.arrays["gauss_whiten"][2])
    renamed = removed.renamed("c", "cars")
    assert renamed.task_names == ["a", "cars"]
    with pytest.raises(BankError, match="exist in both"):
        ab.merged(ab)
    with pytest.raises(BankError, match="no task named 'zzz'"):
        ab.without("zzz")
    with pytest.raises(BankError, match="already exists"):
        ab.renamed("a", "b")


def _write_raw(path: Path, arrays, meta):
    from safetensors.numpy import save_file

    save_file(arrays, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def test_clear_errors(tmp_path, bank_setup):
    layout, task = bank_setup
    bank = TaskBank.empty(layout).with_task(task("a", 3, 0))
    good = bank.save(tmp_path / "good.safetensors")

    with pytest.raises(BankError, match="not found"):
        TaskBank.load(tmp_path / "missing.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BankError, match=r"truncated\.safetensors.*truncated or corrupt"):
        TaskBank.load(truncated)

    newer = tmp_path / "newer.safetensors"
    _write_raw(newer, bank.arrays, {**bank.metadata(), "format_version": FORMAT_VERSION + 1})
    with pytest.raises(BankError, match="newer than this diki-edge supports"):
        TaskBank.load(newer)

    missing = tmp_path / "missing_array.safetensors"
    _write_raw(missing, {k: v for k, v in bank.arrays.items() if k != "gauss_whiten"}, bank.metadata())
    with pytest.raises(BankError, match="'gauss_whiten' is missing"):
        TaskBank.load(missing)

    bad_shape = tmp_path / "bad_shape.safetensors"
    _write_raw(bad_shape, {**bank.arrays, "bank_k": bank.arrays["bank_k"][:, :1].copy()}, bank.metadata())
    with pytest.raises(BankError, match="'bank_k' has shape"):
        TaskBank.load(bad_shape)

    other = dict(layout.to_json())
    other["backbone"] = {**layout.backbone, "weights_sha256": "0" * 64}
    other_hash = tmp_path / "other_backbone.safetensors"
    _write_raw(other_hash, bank.arrays, {**bank.metadata(), "layout": other})
    with pytest.raises(BankError, match="backbone weights differ"):
        TaskBank.load(other_hash, expect=layout)

    not_bank = tmp_path / "plain.safetensors"
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, str(not_bank))
    with pytest.raises(BankError, match="not a diki-edge bank"):
        TaskBank.load(not_bank)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, bank_setup, monkeypatch):
    layout, task = bank_setup
    path = TaskBank.empty(layout).with_task(task("a", 3, 0)).save(tmp_path / "bank.safetensors")
    before = path.read_bytes()
    bigger = TaskBank.load(path).with_task(task("b", 2, 1))

    import safetensors.numpy as stnp

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(stnp, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        bigger.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]


def test_loading_never_unpickles(tmp_path):
    import pickle

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(BankError, match="evil.safetensors"):
        TaskBank.load(evil)


def test_graph_only_load_is_the_runtimes_lean_view(tmp_path, bank_setup):
    layout, task = bank_setup
    bank = TaskBank.empty(layout).with_task(task("a", 3, 0)).with_task(task("b", 2, 1))
    path = bank.save(tmp_path / "bank.safetensors")
    lean = TaskBank.load(path, expect=layout, graph_only=True)
    assert set(lean.arrays) == {"bank_k", "bank_v", "gauss_mean", "gauss_whiten", "gauss_const", "class_embeds",
                                "class_task", "calib_slope", "calib_bias"}
    from diki_edge_runtime.contract import INPUT_NAMES

    assert tuple(lean.graph_inputs()) == INPUT_NAMES[1:]  # the bank feeds exactly the graph's bank inputs
    for k, v in bank.graph_inputs().items():
        np.testing.assert_array_equal(lean.graph_inputs()[k], v)
    assert lean.class_names == bank.class_names and lean.nbytes() < bank.nbytes()
    with pytest.raises(BankError, match="graph_only"):
        lean.save(tmp_path / "other.safetensors")
    with pytest.raises(BankError, match="graph_only"):
        lean.without("a")
    assert not (tmp_path / "other.safetensors").exists()
