"""Damaged and hostile bank files: non-finite values, inconsistent class tables, metadata of the wrong JSON type,
paths that are not regular files. Every one is refused with one line naming the file and the problem, by the
loader, ``bank show`` and ``predict --bank``; nothing reaches a traceback. Torch-free (the golden bank)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from hostile import BANK, IMAGES, MODEL, cli, damaged_bank, golden_bank, write_bank

from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.errors import BankError
from diki_edge_runtime.schema import MetadataError

FLOAT_ARRAYS = ["bank_k", "bank_v", "text_k", "text_v", "gauss_mean", "gauss_whiten", "gauss_const", "stats_sum",
                "stats_outer", "class_embeds"]
GRAPH_FLOATS = ["bank_k", "bank_v", "gauss_mean", "gauss_whiten", "gauss_const", "class_embeds"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", FLOAT_ARRAYS)
def test_non_finite_arrays_are_refused_on_load(tmp_path, name, value):
    def edit(arrays, meta):
        arrays[name].reshape(-1)[-1] = value

    path = damaged_bank(tmp_path / "bad.safetensors", edit)
    with pytest.raises(BankError) as info:
        TaskBank.load(path)
    message = str(info.value)
    assert str(path) in message and repr(name) in message and "non-finite" in message and "\n" not in message
    if name in GRAPH_FLOATS:  # the runtime's lean view checks what it loads
        with pytest.raises(BankError, match=f"'{name}' holds 1 non-finite"):
            TaskBank.load(path, graph_only=True)


def test_non_finite_banks_are_refused_on_save_and_by_the_predictor(tmp_path):
    bank = TaskBank.load(BANK)
    bank.arrays["gauss_const"][1] = np.inf
    target = tmp_path / "out.safetensors"
    with pytest.raises(BankError, match=r"out\.safetensors: refusing to save.*'gauss_const'"):
        bank.save(target)
    assert not target.exists() and os.listdir(tmp_path) == []

    from diki_edge_runtime.predictor import Predictor

    predictor = Predictor(MODEL)
    before = predictor.tasks
    with pytest.raises(BankError, match="non-finite"):
        predictor.load_bank(bank)
    assert predictor.tasks == before  # the previous bank stays in use

    path = damaged_bank(tmp_path / "nan.safetensors", lambda a, m: a["gauss_mean"].__setitem__((0, 0), np.nan))
    done = cli("predict", BANK.parent.parent / "images" / "chelsea_0.png", "--model", MODEL, "--bank", path, "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert "nan.safetensors" in done.stderr and "'gauss_mean'" in done.stderr and "Traceback" not in done.stderr


def _permute_classes(arrays, meta):
    counts = [len(t["classes"]) for t in meta["tasks"]]
    # every count kept, the order changed: the first task's class columns now sit at the end
    arrays["class_task"] = np.concatenate([np.full(c, i) for i, c in enumerate(counts)][1:] + [np.zeros(counts[0])]
                                          ).astype(np.int64)


def _empty_task(arrays, meta):
    first = len(meta["tasks"][0]["classes"])
    meta["tasks"][0]["classes"] = []
    arrays["class_task"] = arrays["class_task"][first:].copy()
    arrays["class_embeds"] = arrays["class_embeds"][:, first:].copy()


def _out_of_range(arrays, meta):
    arrays["class_task"][-1] = 7


@pytest.mark.parametrize("edit, expected", [
    (_permute_classes, "class_task must give each class its task index in task order"),
    (_out_of_range, "class_task must give each class its task index in task order"),
    (_empty_task, r"tasks\[0\]\.classes must be a list of at least 1 item"),
])
def test_class_task_must_match_the_tasks(tmp_path, edit, expected):
    path = damaged_bank(tmp_path / "bad.safetensors", edit)
    for graph_only in (False, True):
        with pytest.raises(BankError, match=expected) as info:
            TaskBank.load(path, graph_only=graph_only)
        assert str(path) in str(info.value)


def test_a_bank_built_in_memory_needs_classes_and_names():
    bank = TaskBank.load(BANK)
    first = len(bank.tasks[0].classes)
    arrays = {**bank.arrays, "class_task": bank.arrays["class_task"][first:] ,
              "class_embeds": bank.arrays["class_embeds"][:, first:]}
    tasks = [type(bank.tasks[0])(bank.tasks[0].name, [])] + bank.tasks[1:]
    with pytest.raises(BankError, match=r"tasks \['pets'\] have no classes"):
        TaskBank(bank.layout, tasks, arrays)
    with pytest.raises(BankError, match="empty name"):
        bank.renamed("pets", " ")


def _set(*keys_value):
    *keys, value = keys_value

    def edit(arrays, meta):
        node = meta
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


# (edit, field named in the error, what the error says was expected)
METADATA_CASES = [
    (_set("layout", "backbone", "ViT-B-16"), "layout.backbone", "a JSON object"),
    (_set("tasks", 0, "classes", [1, 2, 3]), "tasks[0].classes[0]", "a non-empty string"),
    (_set("tasks", 1, "name", ["drinks"]), "tasks[1].name", "a non-empty string"),
    (_set("tasks", 1, "name", ""), "tasks[1].name", "a non-empty string"),
    (_set("layout", "calibration_levels", ["0", "1"]), "layout.calibration_levels[0]", "a finite number"),
    (_set("layout", "calibration_levels", [1.0, 0.5, 0.0]), "layout.calibration_levels", "strictly increasing"),
    (_set("layout", "ridge", -1e-3), "layout.ridge", "a finite number >= 0.0"),
    (_set("layout", "logit_scale", 0), "layout.logit_scale", "a finite number > 0.0"),
    (_set("layout", "embed_dim", "32"), "layout.embed_dim", "an integer >= 1"),
    (_set("layout", "image_layers", True), "layout.image_layers", "an integer >= 1"),
    (_set("tasks", {"name": "x"}), "tasks", "a list"),
    (_set("tasks", 2, "template", 5), "tasks[2].template", "a non-empty string"),
    (_set("tasks", 2, "num_samples", -3), "tasks[2].num_samples", "an integer >= 0"),
    (_set("tasks", 2, "extra", []), "tasks[2].extra", "a JSON object"),
    (_set("format_version", "1"), "format_version", "an integer >= 1"),
    (lambda a, m: m["layout"].pop("ridge"), "layout.ridge", "present"),
]


@pytest.mark.parametrize("edit, field, expected", METADATA_CASES, ids=[c[1] for c in METADATA_CASES])
def test_metadata_of_the_wrong_type_is_a_typed_named_error(tmp_path, edit, field, expected):
    path = damaged_bank(tmp_path / "meta.safetensors", edit)
    with pytest.raises(MetadataError) as info:
        TaskBank.load(path)
    err = info.value
    assert (err.source, err.field) == (str(path), field) and expected in err.expected
    assert str(err).startswith(f"{path}: metadata field {field} must be ") and "\n" not in str(err)

    shown = cli("bank", "show", path)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert field in shown.stderr and "meta.safetensors" in shown.stderr.replace("\n", "")


@pytest.mark.parametrize("raw, expected", [
    ("not json", "not valid JSON"),
    ('{"format_version": NaN}', "not valid JSON"),
    ("[1, 2]", r"metadata field \(top level\) must be a JSON object"),
    ("[" * 100000, "not valid JSON"),
])
def test_metadata_that_is_not_a_json_object(tmp_path, raw, expected):
    arrays, meta = golden_bank()
    path = write_bank(tmp_path / "raw.safetensors", arrays, meta, raw_meta=raw)
    with pytest.raises(BankError, match=expected):
        TaskBank.load(path)


def test_bank_paths_that_are_not_regular_files(tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = {folder: "is a directory", loop: "symlink loop", Path("/dev/zero"): "not a regular file",
             dangling: r"not found \(dangling symlink"}
    for path, expected in cases.items():
        with pytest.raises(BankError, match=expected):
            TaskBank.load(path)
    for path, expected in [(folder, "is a directory"), (Path("/dev/zero"), "not a regular file")]:
        done = cli("predict", "x.png", "--model", MODEL, "--bank", path, timeout=60)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr
    shown = cli("bank", "show", loop)
    assert shown.returncode == 1 and "symlink loop" in shown.stderr


def test_infinite_metadata_numbers_are_refused_when_saving(tmp_path):
    bank = TaskBank.load(BANK)
    bank.tasks[0].extra = {"lr": math.inf}
    with pytest.raises(BankError, match="metadata holds NaN or an infinity"):
        bank.save(tmp_path / "x.safetensors")


def test_non_finite_statistics_and_ridges_are_refused():
    from diki_edge_runtime.gaussian import GaussianScoring, GaussianStats

    embeddings = np.random.default_rng(0).normal(size=(20, 4))
    stats = GaussianStats.empty(4).update(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True))
    with pytest.raises(ValueError, match="NaN or infinite"):
        GaussianStats.empty(4).update(np.full((3, 4), np.nan))
    for ridge in (math.inf, math.nan, -1e-3):
        with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
            stats.finalize(ridge)
    with pytest.raises(ValueError, match="NaN or infinite"):
        GaussianScoring.from_moments(np.zeros(4), np.full((4, 4), np.inf))
    assert np.isfinite(stats.finalize(1e-7).whiten).all()

    bank = TaskBank.load(BANK)
    task = bank.task_slice("pets")
    task.stats.outer[0, 0] = np.inf
    with pytest.raises(BankError, match="task 'pets': cannot finalise its Gaussian: the statistics hold NaN"):
        bank.with_task(task)


@pytest.mark.parametrize("bad_name", ["", "two\nlines", "dupe"])
def test_a_bank_an_older_version_wrote_with_a_bad_class_name_can_be_shown_and_repaired(tmp_path, bad_name):
    """Older versions wrote empty, multi-line or repeated class names; every command then refused the whole file.
    The repair commands (show, remove, rename) load such a bank leniently, name the bad task, and keep the others
    reachable; predict still refuses it."""
    def edit(arrays, meta):
        classes = meta["tasks"][-1]["classes"]
        classes[0] = classes[1] if bad_name == "dupe" else bad_name

    path = damaged_bank(tmp_path / "old.safetensors", edit)
    names = [t["name"] for t in golden_bank()[1]["tasks"]]
    bad, other = names[-1], names[0]
    shown = cli("bank", "show", path)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    warned = shown.stderr.replace("\n", "")  # rich wraps at a space and keeps the space
    assert f"task {bad!r}" in warned and f"bank remove {path} {bad}" in warned, shown.stderr
    if bad_name == "two\nlines":  # the table spells the newline out instead of breaking its row
        assert "two\\nlines" in shown.stdout and "two\nlines" not in shown.stdout, shown.stdout
    kept = cli("bank", "remove", path, other, "--out", tmp_path / "kept.safetensors")
    assert kept.returncode == 0, kept.stderr
    fixed = cli("bank", "remove", path, bad, "--out", tmp_path / "fixed.safetensors")
    assert fixed.returncode == 0, fixed.stderr
    assert TaskBank.load(tmp_path / "fixed.safetensors").task_names == names[:-1]  # strict load: repaired
    if bad_name == "":  # a bank a runtime cannot use is still refused there, naming the file
        predicted = cli("predict", "--model", MODEL, "--bank", path, IMAGES)
        assert predicted.returncode == 2 and str(path) in predicted.stderr and "Traceback" not in predicted.stderr
