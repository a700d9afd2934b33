"""The full install's plugin commands where torch itself is missing: they name what to install, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from support import TORCH_MODULES  # tests/support.py

# Importing torch fails the way a missing package does (ModuleNotFoundError naming it), so the training core's
# and the exporter's entry points load but their commands fail when they reach for torch.
NO_TORCH = f"""
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TORCH_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
from diki_edge_runtime.cli import main
main()
"""


def test_training_commands_without_torch_say_which_extra(tmp_path):
    for args in (["train", "--bank", str(tmp_path / "b.safetensors"), "--task", "t", "--data", str(tmp_path)],
                 ["export", "--bank", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "m")]):
        r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 2, r.stderr
        assert "needs 'torch', which is not installed" in r.stderr and "pip install diki-edge" in r.stderr
        assert "Traceback" not in r.stderr
