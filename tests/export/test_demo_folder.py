"""`diki-edge demo --out DIR` empties only its own output folder: any other folder is refused untouched."""

from __future__ import annotations

import os

import pytest

from diki_edge_export.demo import DEMO_MARKER, prepare_demo_folder
from diki_edge_export.errors import ExportError


def test_a_folder_that_is_not_a_demo_output_is_refused_and_kept(tmp_path):
    (tmp_path / "thesis.txt").write_text("four years of work")
    with pytest.raises(ExportError, match=r"not a demo output folder .*thesis\.txt.*nothing was removed"):
        prepare_demo_folder(tmp_path)
    assert (tmp_path / "thesis.txt").read_text() == "four years of work"


def test_the_working_directory_is_refused_and_kept(tmp_path, monkeypatch):
    (tmp_path / "notes.md").write_text("keep")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match="not a demo output folder"):
        prepare_demo_folder(type(tmp_path)("."))
    assert sorted(os.listdir(tmp_path)) == ["notes.md"]


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    with pytest.raises(ExportError, match="must be a folder"):
        prepare_demo_folder(target)
    assert target.read_text() == "x"


def test_new_empty_and_earlier_demo_folders_are_prepared(tmp_path, monkeypatch):
    new = tmp_path / "new" / "demo"
    prepare_demo_folder(new)
    assert sorted(os.listdir(new)) == [DEMO_MARKER]
    (new / "model").mkdir()
    (new / "model" / "model.onnx").write_bytes(b"old")
    (new / "bank.safetensors").write_bytes(b"old")
    prepare_demo_folder(new)  # an earlier demo's output: emptied, marker kept
    assert sorted(os.listdir(new)) == [DEMO_MARKER]
    monkeypatch.chdir(new)  # --out . inside an earlier demo's output empties it without removing the folder
    (new / "samples").mkdir()
    prepare_demo_folder(type(tmp_path)("."))
    assert sorted(os.listdir(new)) == [DEMO_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_demo_folder(empty)
    assert sorted(os.listdir(empty)) == [DEMO_MARKER]
