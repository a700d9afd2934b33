"""``diki-edge bank show | merge | remove | rename`` through the real CLI, without torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from support import NOT_RUNTIME, block  # tests/support.py

from diki_edge_runtime.bank import TaskBank


@pytest.fixture()
def two_banks(tmp_path, layout, make_task):
    return [TaskBank.empty(layout).with_task(make_task(name, 2 + i, seed=i)).save(tmp_path / f"{name}.safetensors")
            for i, name in enumerate(["pets", "cars"])]


def run(*args):
    env = {**os.environ, "COLUMNS": "150"}
    return subprocess.run([sys.executable, "-m", "diki_edge_runtime", *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_show_merge_remove_rename(tmp_path, two_banks):
    pets, cars = two_banks
    shown = run("bank", "show", pets)
    assert shown.returncode == 0 and "pets" in shown.stdout and "pets class 1" in shown.stdout
    merged = tmp_path / "merged.safetensors"
    assert run("bank", "merge", merged, pets, cars).returncode == 0
    info = json.loads(run("bank", "show", merged, "--json").stdout)
    assert [t["name"] for t in info["tasks"]] == ["pets", "cars"] and [t["classes"] for t in info["tasks"]] == [2, 3]
    again = run("bank", "merge", merged, pets, cars)
    assert again.returncode == 1 and "exists" in again.stderr
    clash = run("bank", "merge", tmp_path / "x.safetensors", pets, pets)
    assert clash.returncode == 1 and "exist in both" in clash.stderr and "Traceback" not in clash.stderr
    assert run("bank", "rename", merged, "cars", "vehicles").returncode == 0
    assert TaskBank.load(merged).task_names == ["pets", "vehicles"]
    assert run("bank", "remove", merged, "pets").returncode == 0
    assert TaskBank.load(merged).task_names == ["vehicles"]
    missing = run("bank", "remove", merged, "pets")
    assert missing.returncode == 1 and "no task named 'pets'" in missing.stderr


def test_bank_commands_do_not_import_torch(two_banks):
    code = (f"import sys, runpy; sys.argv=['diki-edge','bank','show',{str(two_banks[0])!r}];"
            "import diki_edge_runtime.cli as c;\n"
            "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_training_commands_on_a_runtime_only_install_name_what_to_install(tmp_path):
    """Where only the runtime is importable (the training core and the exporter are blocked here; a runtime-only
    venv has no entry points for them at all), train/export/eval name what to install, exit 2, no traceback."""
    script = block(*NOT_RUNTIME) + "from diki_edge_runtime.cli import main\nmain()\n"
    for args in (["train", "--bank", str(tmp_path / "b.safetensors"), "--task", "t", "--data", str(tmp_path)],
                 ["export", "--bank", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "m")],
                 ["eval", "--help"]):
        r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 2, (args, r.stderr)
        assert f"`diki-edge {args[0]}` is not part of this install" in r.stderr
        assert re.search(r"pip install '?diki-edge", r.stderr) and "Traceback" not in r.stderr
    help_text = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    listed = set(re.findall(r"^\W+([a-z]+)\s", help_text.stdout, re.MULTILINE))  # rows of the Commands panel
    assert help_text.returncode == 0 and {"predict", "bank"} <= listed
    assert not listed & {"train", "export", "eval", "demo"}, listed


@pytest.mark.parametrize("field, first, second", [
    ("ridge", 1e-2, 1e-7), ("calibration_levels", [0.0, 1 / 3, 2 / 3, 1.0], [0.0, 0.25, 0.5, 1.0])])
def test_merge_refuses_banks_finalised_differently_naming_both_values_and_files(tmp_path, layout, make_task, field,
                                                                                 first, second):
    import dataclasses

    paths = []
    for i, value in enumerate([first, second]):
        own = dataclasses.replace(layout, **{field: value})
        paths.append(TaskBank.empty(own).with_task(make_task(f"t{i}", 2, seed=i)).save(tmp_path / f"b{i}.safetensors"))
    out = tmp_path / "merged.safetensors"
    result = run("bank", "merge", out, *paths)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(paths[0]) in result.stderr and str(paths[1]) in result.stderr, result.stderr
    if field == "ridge":
        assert "ridge" in result.stderr and "0.01" in result.stderr and "1e-07" in result.stderr, result.stderr
    else:
        assert "calibration levels" in result.stderr and "0.25" in result.stderr and "0.3333" in result.stderr
    assert not out.exists()
