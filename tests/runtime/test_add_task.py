"""Label-only tasks added on the device: ``diki-edge bank add-task`` without torch, on
real photographs: the golden folder's bank lacks the ``portraits`` task; ``examples/portraits`` holds 48 crops of
its photograph (never used elsewhere) and ``images/astronaut_*`` two unseen crops."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
from support import cli_in_process, run_blocked  # tests/support.py

from diki_edge_runtime import Predictor, files
from diki_edge_runtime.bank import TaskBank


def _bank_app(*args: str):
    return cli_in_process("bank", *args)


def _examples(golden):
    return golden.root / "examples" / "portraits"


def test_add_task_without_torch_then_the_new_domain_selects_it(golden, tmp_path):
    labels = golden.meta["classes"]["portraits"]
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(golden.bank_path.read_bytes())
    examples = tmp_path / "examples"
    shutil.copytree(_examples(golden), examples)
    (examples / "broken.jpg").write_bytes(b"not an image")
    code = f"""
import sys
from typer.testing import CliRunner
from diki_edge_runtime.cli_bank import bank_app
res = CliRunner().invoke(bank_app, ["add-task", {str(bank)!r}, "portraits", "--labels", {", ".join(labels)!r},
                                    "--images", {str(examples)!r}, "--model", {str(golden.model_dir)!r}])
print(res.stdout, res.stderr)
bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip")]
sys.exit(res.exit_code or (3 if bad else 0))
"""
    res = run_blocked(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken.jpg" in res.stdout and "48 example images" in res.stdout
    assert "warning" not in res.stdout  # 48 >= D + 5 = 37

    three = golden.banks["three"]
    new = TaskBank.load(bank)
    assert new.task_names == three.task_names + ["portraits"]
    sl = new.task_slice("portraits")
    assert sl.info.classes == labels and sl.info.num_samples == 48 and sl.info.extra == {"label_only": True}
    for arr in (sl.image_k, sl.image_v, sl.text_k, sl.text_v):
        assert not arr.any()  # V_r = 0 (and K_r = 0): the branch adds exactly nothing
    before_p = Predictor(golden.model_dir, threads=1)
    frozen = before_p.encode_text([f"a photo of a {c}." for c in labels])
    for level in sl.class_embeds:  # the frozen label embeddings at every level
        np.testing.assert_array_equal(level, frozen)
    for name in three.task_names:  # the other tasks' slices are untouched
        a, b = three.task_slice(name), new.task_slice(name)
        assert np.array_equal(a.image_v, b.image_v) and np.array_equal(a.class_embeds, b.class_embeds)

    files = [str(f) for f in golden.files]
    before, after = before_p.predict(files), Predictor(golden.model_dir, threads=1, bank=bank).predict(files)
    moved = kept = 0
    for name, b, a in zip(golden.names, before, after):
        task = golden.meta["familiar_task"].get(name)
        if task == "portraits":  # unseen crops of the new domain: the new task, among its labels
            assert a.task == "portraits" and a.weight > 0.05 and b.task != "portraits", (name, a.task, a.weight)
            assert {c for c, _ in a.top_k} <= set(labels) and len(a.top_k) == 3
            moved += 1
        elif task is not None:  # images of the other tasks keep their predictions
            assert (a.task, a.top_k[0][0]) == (b.task, b.top_k[0][0])
            assert abs(a.weight - b.weight) <= 1e-6
            assert np.abs(np.array([p for _, p in a.top_k]) - np.array([p for _, p in b.top_k])).max() <= 1e-5
            kept += 1
    assert moved == 2 and kept == 6


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_input_is_a_clear_error_and_the_bank_is_untouched(golden, tmp_path):
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(golden.bank_path.read_bytes())
    before = _digest(bank)
    examples = str(_examples(golden))
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "blank.txt").write_text("\n  \n")
    cases = {
        "no images": (["new", "--labels", "a,b", "--images", str(tmp_path / "empty")], "no example images"),
        "unreadable only": (["new", "--labels", "a,b", "--images", str(junk)], "0 of 3 example images could be read"),
        "empty label list": (["new", "--labels-file", str(tmp_path / "blank.txt"), "--images", examples],
                             "holds no labels"),
        "duplicate labels": (["new", "--labels", "cat,dog,cat", "--images", examples], "duplicate labels"),
        "name in the bank": (["pets", "--labels", "a,b", "--images", examples], "already in the bank"),
        "no labels": (["new", "--images", examples], "--labels or --labels-file"),
    }
    for case, (args, message) in cases.items():
        res = _bank_app("add-task", str(bank), *args, "--model", str(golden.model_dir))
        assert res.exit_code != 0 and message in res.stderr, (case, res.stderr)
        assert "Traceback" not in res.stderr, case
        assert _digest(bank) == before, case
    res = _bank_app("add-task", str(bank), "new", "--labels", "a,b", "--images", examples)  # not in a model folder
    assert res.exit_code != 0 and "pass --model" in res.stderr and _digest(bank) == before


def test_add_task_in_a_model_folder_finds_the_model_by_itself(golden, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(golden.model_dir, folder)
    examples = _examples(golden)
    res = _bank_app("add-task", str(folder / "bank.safetensors"), "portraits", "--labels", "astronaut,pilot",
                    "--images", str(examples / "0*.png"), "--images", str(examples / "1*.png"))
    assert res.exit_code == 0, res.stderr
    assert "20 example images" in res.stderr
    warning = " ".join(res.stderr.split())  # 20 < D + 5 = 37 (D = 32): the task is added, and the user told why
    assert ("warning: task 'portraits' has 20 images, fewer than D + 5 = 37 (D = 32, the backbone's embedding "
            "dimension)") in warning and "give the task at least 37 images" in warning, res.stderr
    p = Predictor(folder, threads=1)
    assert p.tasks[-1] == "portraits" and p.predict([str(golden.files[0])])[0].ok


def test_an_unwritable_output_fails_before_any_image_is_encoded(golden, tmp_path, monkeypatch):
    import diki_edge_runtime.label_task as label_task

    def must_not_run(*args, **kwargs):
        raise AssertionError("add-task encoded images although its output cannot be written")

    monkeypatch.setattr(label_task, "add_label_task", must_not_run)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output's folder should be")
    out = blocker / "bank.safetensors"
    res = _bank_app("add-task", str(golden.bank_path), "new", "--labels", "a,b", "--images",
                    str(_examples(golden)), "--model", str(golden.model_dir), "--out", str(out))
    assert res.exit_code == 1, res.stderr
    assert str(blocker) in res.stderr and "Traceback" not in res.stderr


def test_parallel_writers_to_one_bank_lose_no_task(golden, tmp_path):
    """Four `bank add-task` processes at once on one bank (each read-modify-write holds the bank's lock and re-reads
    the bank inside it): every task is in the final bank. Without the lock the last writer's bank, read before the
    others wrote, dropped their tasks in every try."""
    import subprocess
    import sys

    labels = golden.meta["classes"]["portraits"]
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(golden.bank_path.read_bytes())
    names = [f"portraits{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "diki_edge_runtime", "bank", "add-task", str(bank), name,
                               "--labels", ", ".join(labels), "--images", str(_examples(golden)),
                               "--model", str(golden.model_dir), "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in names]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    final = TaskBank.load(bank)
    assert sorted(final.task_names) == sorted(golden.banks["three"].task_names + names), outputs
    assert files.lock_path_of(tmp_path / "bank.safetensors").exists()  # left in place on purpose (see files.locked)


def test_a_held_lock_is_waited_for_then_named(golden, tmp_path, monkeypatch):
    import pytest

    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(golden.bank_path.read_bytes())
    monkeypatch.setattr(files, "LOCK_WAIT_SECONDS", 0.2)
    with files.locked(bank):
        with pytest.raises(files.WriteError, match=r"another process is writing this bank \(it holds .*\.lock\)"):
            with files.locked(bank, wait=0.2):
                pass
        done = _bank_app("rename", str(bank), golden.banks["three"].task_names[0], "renamed")
    assert done.exit_code == 1 and "another process is writing this bank" in done.stderr, done
    assert TaskBank.load(bank).task_names == golden.banks["three"].task_names  # untouched
    with files.locked(bank, wait=0):  # released
        pass
