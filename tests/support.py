"""Helpers shared by several test folders (``tests`` is on pytest's ``pythonpath``). Torch-free."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The committed exported model folder the runtime's tests run on (scripts/make_golden_model.py writes it).
GOLDEN = REPO / "tests" / "runtime" / "golden"

# What the runtime must never import.
TORCH_MODULES = ("torch", "torchvision", "open_clip")
NOT_RUNTIME = TORCH_MODULES + ("onnx", "onnxscript", "diki_edge", "diki_edge_export")


def block(*modules: str) -> str:
    """Source of a meta-path hook that makes importing ``modules`` (and their submodules) fail with an
    ImportError, to put before anything else runs."""
    return textwrap.dedent(f"""
        import sys
        class _Block:
            BLOCKED = {tuple(modules)!r}
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"blocked import of {{name}} (the runtime must not need it)", name=name)
                return None
        sys.meta_path.insert(0, _Block())
    """)


BLOCK_TORCH = block(*TORCH_MODULES)


def run_blocked(code: str, *args: str, block: str = BLOCK_TORCH, timeout: float = 120) -> subprocess.CompletedProcess:
    script = block + "\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def golden_script():
    """``scripts/make_golden_model.py`` as a module (torch-free at import; only ``make_golden`` needs torch)."""
    spec = importlib.util.spec_from_file_location("make_golden_model", REPO / "scripts" / "make_golden_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
