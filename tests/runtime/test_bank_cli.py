"""``diki-edge bank show | merge | remove | rename`` through the real CLI, without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diki_edge_runtime.bank import TaskBank
from diki_edge.layout import layout_for
from diki_edge.model import DikiCLIP
from diki_edge.synthetic import synthetic_task


@pytest.fixture()
def two_banks(tmp_path, tiny_backbone):
    diki = DikiCLIP(tiny_backbone.model)
    layout = layout_for(tiny_backbone, diki)
    paths = []
    for i, name in enumerate(["pets", "cars"]):
        imgs = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        task = synthetic_task(diki, tiny_backbone.tokenizer, name, [f"{name} {j}" for j in range(2 + i)], imgs,
                              layout.calibration_levels, seed=i)
        paths.append(TaskBank.empty(layout).with_task(task).save(tmp_path / f"{name}.safetensors"))
    return paths


def run(*args):
    env = {**os.environ, "COLUMNS": "150"}
    return subprocess.run([sys.executable, "-m", "diki_edge_runtime", *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_show_merge_remove_rename(tmp_path, two_banks):
    pets, cars = two_banks
    shown = run("bank", "show", pets)
    assert shown.returncode == 0 and "pets" in shown.stdout and "pets 1" in shown.stdout
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
    code = ("import sys, runpy; sys.argv=['diki-edge','bank','show',%r];"
            "import diki_edge_runtime.cli as c;\n"
            "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'") % str(two_banks[0])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


NO_TORCH = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
from diki_edge_runtime.cli import main
main()
"""


def test_training_commands_on_a_runtime_only_install_say_which_extra(tmp_path):
    """Without torch (the base + cpu install), train/export name the distribution to install instead of a traceback."""
    for args in (["train", "--bank", str(tmp_path / "b.safetensors"), "--task", "t", "--data", str(tmp_path)],
                 ["export", "--bank", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "m")]):
        r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 2, r.stderr
        assert "needs 'torch', which is not installed" in r.stderr and "pip install diki-edge" in r.stderr
        assert "Traceback" not in r.stderr
