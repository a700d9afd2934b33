"""Hostile model folders and runtime setup: what ``Predictor`` and ``diki-edge predict`` refuse before any image is
read, and the CLI's output streams under a terminal. Torch-free (copies of the golden model folder)."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import IMAGES, MODEL, REPO, strict_json
from support import cli_in_process

from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.errors import BankError, RuntimeSetupError
from diki_edge_runtime.predictor import Predictor
from diki_edge_runtime.reading import METADATA_MAX_BYTES, read_limited_text

PHOTO = IMAGES / "chelsea_0.png"


def test_json_lines_reach_stdout_when_stderr_is_a_terminal(tmp_path):
    # the progress bar (more than one batch) draws on the terminal; the JSON lines must still go to stdout
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "diki_edge_runtime", "predict", str(PHOTO),
                               str(IMAGES / "rocket_0.png"), "--model", str(MODEL), "--json", "-b", "1"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=follower, timeout=120,
                              env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
    finally:
        os.close(follower)
        os.close(leader)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and len(lines) == 2
    assert [strict_json(line)["ok"] for line in lines] == [True, True]


# ---------------------------------------------------------------------------- model folder helpers
def model_copy(tmp_path: Path, edit_manifest=None, edit_preprocess=None) -> Path:
    """A copy of the golden model folder, its manifest / preprocess.json passed through the edit functions."""
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    for name, edit in (("manifest.json", edit_manifest), ("preprocess.json", edit_preprocess)):
        if edit is not None:
            data = json.loads((folder / name).read_text())
            edit(data)
            (folder / name).write_text(json.dumps(data))
    return folder


def setup_error_of(folder: Path, *args: str) -> str:
    """``diki-edge predict`` on ``folder``: asserts a setup error (exit 2, one line, no traceback); its stderr."""
    done = cli_in_process("predict", PHOTO, "--model", folder, *args)
    assert done.exit_code == 2 and "Traceback" not in done.stderr and done.stdout == "", done
    return " ".join(done.stderr.split())


# ---------------------------------------------------------------------------- metadata files: regular, capped
@pytest.mark.parametrize("name", ["manifest.json", "preprocess.json", "tokenizer.json"])
def test_metadata_that_is_a_device_or_a_fifo_is_refused_without_reading_it(tmp_path, name):
    folder = model_copy(tmp_path)
    (folder / name).unlink()
    (folder / name).symlink_to("/dev/zero")
    args = ("--labels", "cat,dog") if name == "tokenizer.json" else ()
    message = setup_error_of(folder, *args)
    # tokenizer.json is named by the manifest: a link out of the folder is refused before its kind is looked at
    assert f"{name}: the " in message and "not a regular file" in message or \
        name == "tokenizer.json" and "outside the model folder" in message, message
    (folder / name).unlink()
    os.mkfifo(folder / name)  # nobody writes to it: opening it for reading would wait forever
    assert "not a regular file" in setup_error_of(folder, *args)


def test_an_oversized_metadata_file_is_refused_before_it_is_read(tmp_path):
    folder = model_copy(tmp_path)
    with open(folder / "preprocess.json", "ab") as fh:  # a sparse file: no disk is used
        fh.truncate(METADATA_MAX_BYTES + 1)
    assert "more than the" in setup_error_of(folder)


def test_option_files_that_are_not_regular_files_are_usage_errors(tmp_path):
    fifo = tmp_path / "labels.fifo"
    os.mkfifo(fifo)
    for option in ("--labels-file", "--provider-options"):
        for path in (fifo, Path("/dev/zero"), tmp_path):
            message = setup_error_of(MODEL, option, str(path))
            assert str(path) in message and ("not a regular file" in message or "a folder" in message), message
    with pytest.raises(RuntimeSetupError, match="must be a regular file"):
        read_limited_text(fifo, "labels file")


# ---------------------------------------------------------------------------- manifest checks
@pytest.mark.parametrize("field, value, message", [
    ("context_length", 64, "does not take that many tokens per prompt"),  # the graph's positional embedding: 16
    ("context_length", 10**9, "context_length must be within 2 .. 4096"),
    ("eot_token_id", 10**6, "eot_token_id 1000000 is outside this tokenizer's vocabulary"),
    ("sot_token_id", -1, "sot_token_id -1 is outside"),
])
def test_tokenizer_description_out_of_range_is_a_setup_error(tmp_path, field, value, message):
    folder = model_copy(tmp_path, edit_manifest=lambda m: m["text"]["tokenizer"].__setitem__(field, value))
    assert message in setup_error_of(folder, "--labels", "cat,dog")
    with pytest.raises(RuntimeSetupError, match=message):
        Predictor(folder, threads=1).encode_text(["a cat"])


@pytest.mark.parametrize("name, message", [
    ("/etc/passwd", "is an absolute path"),
    ("../model/text.onnx", "leads out of the model folder"),
    ("C:\\\\text.onnx", "is an absolute path"),
])
def test_manifest_file_names_stay_in_the_model_folder(tmp_path, name, message):
    folder = model_copy(tmp_path, edit_manifest=lambda m: m["text"]["files"].__setitem__("model", name))
    with pytest.raises(RuntimeSetupError, match=message):
        Predictor(folder, threads=1)
    folder = model_copy(tmp_path / "image", edit_manifest=lambda m: m["files"].__setitem__("bank", name))
    assert message in setup_error_of(folder)


def test_a_manifest_file_symlinked_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    folder = model_copy(tmp_path)
    (folder / "tokenizer.json").rename(outside / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(RuntimeSetupError, match="outside the model folder"):
        Predictor(folder, threads=1)
    (folder / "tokenizer.json").unlink()
    (folder / "sub").mkdir()
    (outside / "tokenizer.json").rename(folder / "sub" / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(Path("sub") / "tokenizer.json")  # a link inside the folder is fine
    assert Predictor(folder, threads=1).predict([str(PHOTO)], labels=["cat", "dog"])[0].ok


@pytest.mark.parametrize("fill, size", [(1e20, 224), (-1, 224), (256, 224), (0.5, 224), ("white", 224),
                                        (0, 10**9), (0, 1e400)])
def test_absurd_preprocessing_is_a_setup_error_at_open(tmp_path, fill, size):
    def edit(cfg):
        cfg["fill_color"] = fill
        cfg["resize_mode"] = "longest"  # the mode that pads with fill_color
        if size != 224:
            cfg["size"] = size

    folder = model_copy(tmp_path, edit_preprocess=edit)
    with pytest.raises(RuntimeSetupError,
                       match=r"preprocess\.json: .*(fill_color|size|cannot convert float infinity)"):
        Predictor(folder, threads=1)


# ---------------------------------------------------------------------------- banks
def test_a_bank_with_other_calibration_levels_is_a_bank_error_naming_them(tmp_path, golden):
    three = golden.banks["three"]
    layout = dataclasses.replace(three.layout, calibration_levels=[0.0, 0.25, 0.5, 0.75, 1.0])
    problem = three.layout.compatibility_problem(layout)
    assert "the bank has 5 levels [0, 0.25, 0.5, 0.75, 1]" in problem
    assert f"expected {len(three.layout.calibration_levels)} levels" in problem
    arrays = dict(three.arrays)
    arrays["class_embeds"] = three.arrays["class_embeds"][:5]
    other = TaskBank(layout, three.tasks, arrays)
    path = other.save(tmp_path / "five.safetensors") or tmp_path / "five.safetensors"
    p = Predictor(MODEL, threads=1)
    with pytest.raises(BankError, match="the bank has 5 levels"):
        p.load_bank(path)
    with pytest.raises(BankError, match="the bank has 5 levels"):
        p.load_bank(other)
    assert "the bank has 5 levels" in setup_error_of(MODEL, "--bank", str(path))


def test_a_loaded_task_bank_is_a_snapshot(golden):
    bank = TaskBank.load(golden.bank_path)
    p = Predictor(MODEL, threads=1, bank=bank)
    before = p.predict([str(PHOTO)])[0]
    for arr in bank.arrays.values():  # the caller edits its own bank in place afterwards
        if arr.dtype.kind == "f":
            arr[...] = 0
    bank.tasks[0].classes[0] = "edited"
    after = p.predict([str(PHOTO)])[0]
    assert after.top_k == before.top_k and after.task == before.task and after.weight == before.weight
    with pytest.raises(ValueError, match="read-only"):
        p.bank.arrays["gauss_mean"][0, 0] = 1.0  # the predictor's own view cannot be edited either


# ---------------------------------------------------------------------------- the text graph opened later
def test_a_text_graph_replaced_after_open_is_refused(tmp_path):
    folder = model_copy(tmp_path)
    p = Predictor(folder, threads=1)
    replacement = folder / "text.onnx.new"
    shutil.copyfile(folder / "text.onnx", replacement)
    os.replace(replacement, folder / "text.onnx")  # what a re-export does: new files under the same names
    with pytest.raises(RuntimeSetupError, match="changed since this predictor opened the model folder"):
        p.predict([str(PHOTO)], labels=["cat", "dog"])
    fresh = Predictor(folder, threads=1)
    assert fresh.predict([str(PHOTO)], labels=["cat", "dog"])[0].ok


def test_a_text_graph_problem_exits_2_before_any_image_is_read(tmp_path):
    folder = model_copy(tmp_path)
    (folder / "text.onnx").write_bytes(b"not an onnx file")
    # batches of one, the first a missing file: had the text graph been opened with the first image, that failed
    # input's JSON line would already be on stdout (setup_error_of asserts stdout stays empty)
    done = cli_in_process("predict", tmp_path / "missing.png", PHOTO, "--model", folder, "--labels", "cat,dog",
                          "--json", "-b", "1")
    assert done.exit_code == 2 and done.stdout == "" and "text.onnx" in done.stderr, done


def test_a_model_file_that_is_a_folder_says_so(tmp_path):
    folder = model_copy(tmp_path)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()
    with pytest.raises(RuntimeSetupError, match="model.onnx: is a folder, not an ONNX model file"):
        Predictor(folder, threads=1)


# ---------------------------------------------------------------------------- ONNX Runtime's start-up lines
def test_onnx_runtime_start_up_warnings_follow_quiet(tmp_path):
    env = {**os.environ, "HOME": "/dev/null"}  # no writable cache: ONNX Runtime may warn at import (build-dependent)
    env.pop("XDG_CACHE_HOME", None)
    base = [sys.executable, "-m", "diki_edge_runtime", "predict", str(PHOTO), "--model", str(MODEL), "--json"]
    quiet = subprocess.run(base + ["-q"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert quiet.returncode == 0 and quiet.stderr == "" and strict_json(quiet.stdout)["ok"]


_FAKE_ORT = """import os
os.write(2, b"2026-01-01 [W:onnxruntime:Default, telemetry.cc:613 f] a start-up warning\\n")
os.write(2, b"2026-01-01 [E:onnxruntime:Default, x.cc:1 f] a start-up error\\n")
os.write(2, b"not a log line of ONNX Runtime\\n")
"""


@pytest.mark.parametrize("severity, kept", [(4, ["not a log line"]),
                                            (3, ["start-up error", "not a log line"]),
                                            (2, ["start-up warning", "start-up error", "not a log line"])])
def test_the_import_filter_drops_only_log_lines_below_the_severity(tmp_path, severity, kept):
    # whether the real ONNX Runtime warns at import depends on its build and the machine's cache folders, so the
    # filter is driven by a stand-in module that writes the three kinds of line to descriptor 2 at import
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text(_FAKE_ORT)
    code = f"from diki_edge_runtime.session import import_onnxruntime; import_onnxruntime({severity})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [k for k in ["start-up warning", "start-up error", "not a log line"] if any(k in x for x in lines)] == kept
    assert len(lines) == len(kept), lines


# ---------------------------------------------------------------------------- long label-table builds
def _labels_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"label number {i}\n" for i in range(n)))
    return path


def test_a_long_label_table_build_reports_progress_off_a_terminal(tmp_path):
    labels = _labels_file(tmp_path, 600)  # at least two levels of 600 prompts: a build above LABEL_PROGRESS_MIN
    done = cli_in_process("predict", PHOTO, "--model", MODEL, "--labels-file", labels, "--json", "-k", "1")
    assert done.exit_code == 0 and strict_json(done.stdout)["ok"]
    assert "encoding 1,200 label prompts" in done.stderr or "encoding 1,800 label prompts" in done.stderr
    assert re.search(r"\n  [\d,]+ / [\d,]+ label prompts \(\d+%\)\n", done.stderr) and "label prompts in" in done.stderr
    quiet = cli_in_process("predict", PHOTO, "--model", MODEL, "--labels-file", labels, "--json", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    few = cli_in_process("predict", PHOTO, "--model", MODEL, "--labels", "cat,dog", "--json")
    assert few.exit_code == 0 and "label prompts" not in few.stderr  # seconds at most: not reported


def test_a_long_label_table_build_on_a_terminal_keeps_json_on_stdout(tmp_path):
    labels = _labels_file(tmp_path, 600)
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "diki_edge_runtime", "predict", str(PHOTO),
                               str(IMAGES / "rocket_0.png"), "--model", str(MODEL), "--json", "-b", "1",
                               "--labels-file", str(labels)], cwd=REPO, stdout=subprocess.PIPE, stderr=follower,
                              timeout=120, env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
    finally:
        os.close(follower)
        os.close(leader)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and [strict_json(line)["ok"] for line in lines] == [True, True]
