"""Writes that respect the file (``diki_edge_runtime.files``): the previous mode is kept, new files follow the umask,
symlinked banks are written through, temporaries of killed runs are collected, folders are swapped crash-safely,
and unwritable or full places are reported before any work. Torch-free."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
from hostile import BANK, REPO, cli

from diki_edge_runtime import files
from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.files import WriteError, atomic_write, check_writable, replace_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def bank() -> TaskBank:
    return TaskBank.load(BANK)


def test_rewrite_keeps_the_mode_and_new_files_follow_the_umask(tmp_path, bank):
    old = os.umask(0o027)
    try:
        path = bank.save(tmp_path / "new.safetensors")
        assert _mode(path) == 0o640
        for mode in (0o644, 0o604, 0o600):
            os.chmod(path, mode)
            bank.without("space").save(path)
            assert _mode(path) == mode
    finally:
        os.umask(old)


def test_a_symlinked_bank_is_written_through_to_its_target(tmp_path, bank):
    target = tmp_path / "store" / "bank.safetensors"
    target.parent.mkdir()
    bank.save(target)
    os.chmod(target, 0o644)
    link = tmp_path / "current.safetensors"
    link.symlink_to(Path("store") / "bank.safetensors")
    bank.without("space").save(link)
    assert link.is_symlink() and os.readlink(link) == os.path.join("store", "bank.safetensors")
    assert TaskBank.load(target).task_names == ["pets", "drinks"] and _mode(target) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["current.safetensors", "store"]

    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "made.safetensors")
    bank.save(dangling)
    assert dangling.is_symlink() and TaskBank.load(tmp_path / "made.safetensors").num_tasks == 3

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(WriteError, match="symlink loop"):
        bank.save(loop)


def test_non_files_are_never_replaced(tmp_path, bank):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(WriteError, match="is a directory"):
        bank.save(folder)
    with pytest.raises(WriteError, match="not a regular file"):
        atomic_write("/dev/null", lambda tmp: None)
    assert folder.is_dir() and os.listdir(folder) == []


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import safetensors.numpy as stnp
    from diki_edge_runtime.bank import TaskBank
    real = stnp.save_file
    def killed(arrays, path, metadata=None):
        real(arrays, path, metadata=metadata)
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 after the temp file is complete, before the rename
    stnp.save_file = killed
    TaskBank.load(sys.argv[1]).without("space").save(sys.argv[2])
""")


def test_temporaries_of_a_killed_save_are_removed_by_the_next_save(tmp_path, bank):
    path = bank.save(tmp_path / "bank.safetensors")
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(BANK), str(path)], cwd=REPO, timeout=120)
    assert done.returncode == -9
    leftovers = [n for n in os.listdir(tmp_path) if n != "bank.safetensors"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".bank.safetensors.diki-tmp-")
    assert path.read_bytes() == before  # the killed run changed nothing

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a temporary of a run still alive is left alone
        alive = tmp_path / f".bank.safetensors{files.TEMP_MARK}{files._host()}-{live.pid}-0000"
        alive.write_bytes(b"in progress")
        bank.without("drinks").save(path)
        assert sorted(os.listdir(tmp_path)) == sorted(["bank.safetensors", alive.name])
        assert TaskBank.load(path).task_names == ["pets", "space"]
    finally:
        live.kill()
        live.wait()


def test_check_writable_names_the_problem_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"file/sub/bank\.safetensors: cannot create the bank: .*file is not a folder"):
        check_writable(blocker / "sub" / "bank.safetensors", what="bank")
    made = check_writable(tmp_path / "a" / "b" / "bank.safetensors", 10)
    assert made.parent.is_dir() and os.listdir(made.parent) == []  # the probe file is gone

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 5000, 5000))
    with pytest.raises(WriteError, match=r"not enough space for the bank: about 3\.0 MB needed, 0\.0 MB free"):
        check_writable(tmp_path / "bank.safetensors", 2_000_000, what="bank")


def test_bank_commands_refuse_an_unwritable_output_before_loading(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args in (["merge", blocker / "out.safetensors", BANK, BANK],
                 ["rename", BANK, "pets", "cats", "--out", blocker / "out.safetensors"],
                 ["remove", BANK, "pets", "--out", blocker / "out.safetensors"]):
        done = cli("bank", *args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "out.safetensors" in done.stderr and "not a folder" in done.stderr


def _model_folder(path: Path, tag: str) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(tag)
    (path / "model.onnx").write_text(tag * 100)
    return path


def test_replace_dir_swaps_in_one_step(tmp_path, monkeypatch):
    out = _model_folder(tmp_path / "model", "old")
    new = _model_folder(tmp_path / "staged", "new")

    def no_two_step_rename(src, dst):
        raise AssertionError("replace_dir renamed the old folder aside instead of exchanging in one step")

    monkeypatch.setattr(files.os, "replace", no_two_step_rename)  # Linux: renameat2(RENAME_EXCHANGE) only
    replace_dir(new, out)
    assert (out / "manifest.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"]


KILLED_REPLACE = textwrap.dedent("""
    import os, signal, sys
    from diki_edge_runtime import files
    files._exchange = lambda a, b: False      # a platform without renameat2(RENAME_EXCHANGE)
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if files.ASIDE_MARK in os.fspath(dst):
            os.kill(os.getpid(), signal.SIGKILL)  # killed between the two renames
    os.replace = replace
    files.replace_dir(sys.argv[1], sys.argv[2])
""")


def test_a_replace_killed_between_renames_is_repaired_by_the_next_run(tmp_path):
    out = _model_folder(tmp_path / "model", "old")
    new = _model_folder(tmp_path / "staged", "new")
    done = subprocess.run([sys.executable, "-c", KILLED_REPLACE, str(new), str(out)], cwd=REPO, timeout=60)
    assert done.returncode == -9 and not out.exists()
    files.remove_stale_temporaries(out)  # what the next export to the same path does first
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["model", "staged"]


def test_bank_show_prints_names_as_text_not_markup(tmp_path, bank):
    bank = bank.renamed("pets", "[bold]pets[/] [/broken")
    path = bank.save(tmp_path / "markup.safetensors")
    shown = cli("bank", "show", path)
    assert shown.returncode == 0 and "[/broken" in shown.stdout.replace("\n", "")
