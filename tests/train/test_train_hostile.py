"""``train`` under hostile settings and unlucky disks: invalid settings refused before anything loads, a loss that
becomes non-finite stops the run with the bank untouched, an unwritable bank path is found before any image is
read, and a final write that still fails saves the trained task elsewhere and names the file."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diki_edge.errors import TrainError
from diki_edge.train import TrainConfig, train_into_bank
from diki_edge_runtime import files
from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.cli import build_app
from diki_edge_runtime.errors import DikiEdgeError
from diki_edge_runtime.files import WriteError

FAST = TrainConfig(epochs=2, batch_size=16)


def write_digit_folder(root: Path, classes=(0, 1), per_class=6) -> Path:
    """A small image folder: one sub-folder per class ("zero", "one", ...) of random-tinted images."""
    import numpy as np
    from PIL import Image

    names = ["zero", "one", "two", "three"]
    rng = np.random.default_rng(sum(classes))
    for c in classes:
        (root / names[c]).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 64, (24, 24, 3)) + np.array([60 * c, 255 - 60 * c, 128])
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / names[c] / f"{i}.png")
    return root


def _train_cli(*args: str):
    return CliRunner().invoke(build_app(), ["train", *args])


@pytest.mark.parametrize("option, expected", [
    (["--lr", "nan"], "learning rate must be a finite number > 0, got nan"),
    (["--lr", "inf"], "learning rate must be a finite number > 0, got inf"),
    (["--lr", "-5"], "learning rate must be a finite number > 0, got -5"),
    (["--ridge", "inf"], "covariance ridge must be a finite number >= 0, got inf"),
    (["--ridge", "nan"], "covariance ridge must be a finite number >= 0, got nan"),
    (["--template", "{0} {}"], "must hold exactly one '{}'"),
    (["--template", "no placeholder"], "must hold exactly one '{}'"),
    (["--template", "{} and {}"], "must hold exactly one '{}'"),
])
def test_invalid_settings_are_refused_before_anything_loads(tmp_path, option, expected):
    bank = tmp_path / "bank.safetensors"
    done = _train_cli("--bank", str(bank), "--task", "t", "--data", str(tmp_path / "no-such-folder"), *option)
    assert done.exit_code == 2, done.output
    assert expected in done.output.replace("\n", "") and "data folder" not in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)
    assert not bank.exists()


def test_empty_task_names_are_refused(tmp_path):
    for name in ("", "   "):
        with pytest.raises(TrainError, match="task name must be a non-empty string"):
            train_into_bank(tmp_path / "b.safetensors", tmp_path / "no-such-folder", name, quiet=True)
    done = _train_cli("--bank", str(tmp_path / "b.safetensors"), "--task", "", "--data", str(tmp_path))
    assert done.exit_code == 2 and "task name must be a non-empty string" in done.output


@pytest.mark.parametrize("case, expected", [
    ("device", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    ("precision", "--precision 'fp8': expected one of fp32, bf16, fp16"),
    ("no data", "data folder not found"),
    ("data is a file", "is a file, not a folder"),
    ("no checkpoint", "checkpoint file not found"),
    ("pretrained tag with local-dir", "cannot be used with --model"),
    ("unknown model", "unknown open_clip model 'no-such-model'"),
])
def test_train_usage_errors_exit_2_naming_the_option(tmp_path, tiny_model_spec, case, expected):
    """Usage errors exit 2 (the documented convention of every command), a failed run 1: a script can tell a
    wrong command line from a training that went wrong."""
    data = write_digit_folder(tmp_path / "data")
    (tmp_path / "images.zip").write_bytes(b"PK")
    options = {"--data": str(data), "--model": tiny_model_spec, "--device": "cpu"}
    options.update({"device": {"--device": "tpu"}, "precision": {"--precision": "fp8"},
                    "no data": {"--data": str(tmp_path / "missing")},
                    "data is a file": {"--data": str(tmp_path / "images.zip")},
                    "no checkpoint": {"--model": "ViT-B-32", "--pretrained": str(tmp_path / "none.safetensors")},
                    "pretrained tag with local-dir": {"--pretrained": "openai"},
                    "unknown model": {"--model": "no-such-model"}}[case])
    bank = tmp_path / "bank.safetensors"
    done = _train_cli("--bank", str(bank), "--task", "t", "--quiet", *(w for kv in options.items() for w in kv))
    assert done.exit_code == 2, done.output
    assert expected in done.output.replace("\n", "") and "Traceback" not in done.output
    assert not bank.exists()


def test_a_failing_training_still_exits_1(tmp_path, tiny_model_spec):
    bank = tmp_path / "bank.safetensors"
    done = _train_cli("--bank", str(bank), "--task", "t", "--data", str(write_digit_folder(tmp_path / "d")),
                      "--model", tiny_model_spec, "--lr", "1e38", "--epochs", "2", "--batch-size", "4", "--quiet",
                      "--device", "cpu")
    assert done.exit_code == 1, done.output
    assert "training loss became" in done.output.replace("\n", "") and not bank.exists()


@pytest.mark.parametrize("per_class, calibration, warned", [(6, "heldout", True), (6, "paper", True),
                                                            (19, "heldout", False)])
def test_train_warns_when_a_task_has_fewer_images_than_d_plus_5(tmp_path, tiny_model_spec, per_class, calibration,
                                                                 warned):
    """Below D + 5 images (D = 32 here) the task's Gaussian is poorly conditioned: it still trains, and the user
    is told the task, the count, D and what to do, whatever the calibration asked for."""
    bank = tmp_path / "bank.safetensors"
    done = _train_cli("--bank", str(bank), "--task", "tiny", "--data",
                      str(write_digit_folder(tmp_path / "d", per_class=per_class)), "--model", tiny_model_spec,
                      "--epochs", "1", "--batch-size", "8", "--quiet", "--device", "cpu",
                      "--calibration", calibration)
    assert done.exit_code == 0, done.output
    output = " ".join(done.output.split())
    if warned:
        assert (f"warning: task 'tiny' has {2 * per_class} images, fewer than D + 5 = 37 (D = 32, the backbone's "
                "embedding dimension)") in output and "give the task at least 37 images" in output, output
        assert "note:" not in output  # the warning says what the fallback note would
    else:
        assert "warning" not in output and "note:" not in output, output
    assert TaskBank.load(bank).task_names == ["tiny"]


def test_a_non_finite_loss_stops_the_run_and_leaves_the_bank_untouched(tmp_path, tiny_model_spec):
    bank_path = tmp_path / "bank.safetensors"
    train_into_bank(bank_path, write_digit_folder(tmp_path / "a", (0, 1)), "a", model=tiny_model_spec, cfg=FAST,
                    quiet=True)
    before = bank_path.read_bytes()
    huge = TrainConfig(epochs=3, batch_size=16, lr=1e38)  # finite, but the first step overflows the logits
    with pytest.raises(TrainError, match=r"training loss became (nan|inf) at epoch \d+, step \d+ .*nothing was "
                                         r"written"):
        train_into_bank(bank_path, write_digit_folder(tmp_path / "b", (2, 3)), "b", cfg=huge, quiet=True)
    assert bank_path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted(["a", "b", "bank.safetensors", files.lock_path_of(bank_path).name])


def test_an_unwritable_bank_path_is_reported_before_any_image_is_read(tmp_path, tiny_model_spec, monkeypatch):
    import diki_edge.train as train_module

    def no_loading(*args, **kwargs):
        raise AssertionError("images were loaded before the bank path was checked")

    monkeypatch.setattr(train_module, "statistics_pass", no_loading)  # the first read of the images
    data = write_digit_folder(tmp_path / "d", (0, 1))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"file/bank\.safetensors: cannot create the bank: .* is not a folder"):
        train_into_bank(blocker / "bank.safetensors", data, "t", model=tiny_model_spec, cfg=FAST, quiet=True)

    usage = namedtuple("usage", "total used free")
    real = files.shutil.disk_usage

    def nearly_full(path):  # the probe file fits, a bank does not
        return usage(real(path).total, real(path).total - 100_000, 100_000)

    monkeypatch.setattr(files.shutil, "disk_usage", nearly_full)
    with pytest.raises(WriteError, match=r"bank\.safetensors: not enough space for the bank: about [\d.]+ MB needed"):
        train_into_bank(tmp_path / "bank.safetensors", data, "t", model=tiny_model_spec, cfg=FAST, quiet=True)
    assert not (tmp_path / "bank.safetensors").exists()


def test_a_failed_final_write_saves_the_trained_task_and_names_it(tmp_path, tiny_model_spec, monkeypatch):
    bank_path = tmp_path / "bank.safetensors"
    train_into_bank(bank_path, write_digit_folder(tmp_path / "a", (0, 1)), "a", model=tiny_model_spec, cfg=FAST,
                    quiet=True)
    before = bank_path.read_bytes()
    real_save = TaskBank.save

    def disk_full_for_the_bank(self, path):
        if Path(path) == bank_path:
            raise WriteError(f"{path}: cannot write the bank: OSError: [Errno 28] No space left on device")
        return real_save(self, path)

    monkeypatch.setattr(TaskBank, "save", disk_full_for_the_bank)
    with pytest.raises(TrainError) as info:
        train_into_bank(bank_path, write_digit_folder(tmp_path / "b", (2, 3)), "b/new", cfg=FAST, quiet=True)
    message = str(info.value)
    assert "No space left on device" in message and "the trained task 'b/new' was saved to" in message
    rescued = Path(message.split("was saved to ")[1].split(" — ")[0])
    assert rescued.parent == tmp_path and rescued.name.startswith("bank.b_new.rescued-")
    saved = TaskBank.load(rescued)
    assert saved.task_names == ["b/new"] and sorted(saved.tasks[0].classes) == ["three", "two"]
    assert bank_path.read_bytes() == before

    monkeypatch.setattr(TaskBank, "save", real_save)  # the message's merge command works
    merged = tmp_path / "merged.safetensors"
    done = CliRunner().invoke(build_app(), ["bank", "merge", str(merged), str(bank_path), str(rescued)])
    assert done.exit_code == 0, done.output
    assert TaskBank.load(merged).task_names == ["a", "b/new"]


def test_train_config_errors_are_user_errors():
    with pytest.raises(DikiEdgeError):
        TrainConfig(levels=1)
    with pytest.raises(DikiEdgeError):
        TrainConfig(epochs=0)


@pytest.mark.parametrize("classes_txt, message", [
    ("zero: bag\none: \n", "every class name must be a non-empty string"),  # "one: " maps to an empty name
    ("zero: shoe\none: shoe\n", r"duplicate class names \['shoe'\]"),
    ("shoe\nshoe\n", r"duplicate class names \['shoe'\]"),
    ("zero: bag\none: a\x07bell\n", "contains a control character"),
])
def test_bad_class_names_are_refused_before_training(tmp_path, classes_txt, message):
    """A bank with an empty or repeated class name could not be read back (every later command refused the file):
    such names are refused when the data folder is scanned, naming classes.txt, and no bank is written."""
    from diki_edge.data import scan_image_folder
    from diki_edge.errors import DataError

    root = write_digit_folder(tmp_path / "data")
    (root / "classes.txt").write_text(classes_txt, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        scan_image_folder(root)
    bank = tmp_path / "bank.safetensors"
    with pytest.raises(DikiEdgeError, match=message):
        train_into_bank(bank, root, "t", cfg=TrainConfig(epochs=1, batch_size=4), quiet=True)
    assert not bank.exists()


def test_a_classes_file_that_is_not_utf8_is_a_data_error(tmp_path):
    from diki_edge.data import scan_image_folder
    from diki_edge.errors import DataError

    root = write_digit_folder(tmp_path / "data")
    (root / "classes.txt").write_bytes(b"zero: caf\xe9\none: tea\n")
    with pytest.raises(DataError, match=r"classes\.txt: not UTF-8 text"):
        scan_image_folder(root)


def test_a_folder_name_with_a_control_character_is_refused(tmp_path):
    from diki_edge.data import scan_image_folder
    from diki_edge.errors import DataError

    root = write_digit_folder(tmp_path / "data")
    os.rename(root / "one", root / "o\tne")
    with pytest.raises(DataError, match="contains a control character"):
        scan_image_folder(root)


@pytest.mark.parametrize("make_link", ["to_root", "loop", "outside"])
def test_a_class_folder_that_links_out_of_the_data_folder_is_refused_naming_it(tmp_path, make_link):
    """A class folder symlinked to ``/`` once walked the whole disk and ended in a PermissionError traceback."""
    from diki_edge.data import scan_image_folder
    from diki_edge.errors import DataError

    root = write_digit_folder(tmp_path / "data")
    link = root / "two"
    if make_link == "to_root":
        link.symlink_to("/")
    elif make_link == "loop":
        link.symlink_to(link)
    else:
        write_digit_folder(tmp_path / "elsewhere", classes=(2,))
        link.symlink_to(tmp_path / "elsewhere" / "two")
    with pytest.raises(DataError, match=r"two.*symbolic link") as caught:
        scan_image_folder(root)
    assert str(link) in str(caught.value)


def test_links_inside_the_data_folder_are_followed_once_and_sub_folder_loops_end(tmp_path):
    from diki_edge.data import scan_image_folder

    root = write_digit_folder(tmp_path / "data")
    (root / "zero" / "again").symlink_to(root / "zero")  # a loop below a class folder
    (root / "one" / "up").symlink_to("/")  # a sub-folder link out of the data folder is not walked
    folder = scan_image_folder(root)
    assert len(folder.samples) == 12, [str(p) for p, _ in folder.samples]


def test_a_data_path_that_is_a_file_says_so(tmp_path):
    from diki_edge.data import scan_image_folder
    from diki_edge.errors import DataError

    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file, not a folder"):
        scan_image_folder(tmp_path / "images.zip")


def test_non_utf8_names_never_raise_unicode_errors(tmp_path):
    """A folder name in another encoding cannot be a class name (the bank stores UTF-8 JSON): refused naming it; an
    image file named so is trained on (its name only enters the data fingerprint)."""
    from diki_edge.checkpoint import data_fingerprint
    from diki_edge.data import scan_image_folder
    from diki_edge.errors import DataError

    root = write_digit_folder(tmp_path / "data")
    os.rename(root / "zero" / "0.png", os.path.join(os.fsencode(root / "zero"), b"caf\xe9.png"))
    folder = scan_image_folder(root)
    assert len(folder.samples) == 12 and len(data_fingerprint(folder)) == 64
    os.rename(os.fsencode(root / "one"), os.path.join(os.fsencode(root), b"\xffone"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        scan_image_folder(root)
    (root / "classes.txt").write_text("zero\none\n", encoding="utf-8")  # names given by position: fine
    assert scan_image_folder(root).classes == ["zero", "one"]
