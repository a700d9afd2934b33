"""Helpers shared by several test folders (``tests`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A meta-path hook that makes importing torch, torchvision or open_clip fail, installed before anything else runs.
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        BLOCKED = ("torch", "torchvision", "open_clip")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"blocked import of {name} (the runtime must not need it)")
            return None
    sys.meta_path.insert(0, _Block())
""")


def run_blocked(code: str, *args: str, block: str = BLOCK_TORCH, timeout: float = 120) -> subprocess.CompletedProcess:
    script = block + "\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
