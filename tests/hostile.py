"""Helpers for the hostile-input tests (tests/runtime/test_hostile_*.py, test_safe_writes.py, test_fuzz.py): damaged
variants of the committed golden bank, written without the bank's own checks (safetensors directly), a strict JSON
parser and the CLI in a subprocess. Torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from support import GOLDEN, REPO

MODEL = GOLDEN / "model"
BANK = MODEL / "bank.safetensors"
IMAGES = GOLDEN / "images"


def golden_bank() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The golden model's bank: (arrays, metadata JSON), fresh copies."""
    with safe_open(str(BANK), framework="numpy") as fh:
        meta = json.loads(fh.metadata()["diki_edge"])
    return {k: v.copy() for k, v in load_file(str(BANK)).items()}, meta


def write_bank(path: Path, arrays: dict[str, np.ndarray], meta: Any, raw_meta: str | None = None) -> Path:
    save_file(arrays, str(path), metadata={"diki_edge": raw_meta if raw_meta is not None else json.dumps(meta)})
    return path


def damaged_bank(path: Path, edit: Callable[[dict[str, np.ndarray], dict[str, Any]], None]) -> Path:
    arrays, meta = golden_bank()
    edit(arrays, meta)
    return write_bank(path, arrays, meta)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(line: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity (which Python's parser accepts, strict parsers do not) and lone
    surrogates."""
    line.encode("utf-8")  # raises on a lone surrogate
    value = json.loads(line, parse_constant=_no_constants)

    def walk(v: Any) -> None:
        if isinstance(v, str):
            v.encode("utf-8")
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(value)
    return value


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``diki-edge ARGS`` in a subprocess (``python -m diki_edge_runtime``), bytes-safe output decoding."""
    proc = subprocess.run([sys.executable, "-m", "diki_edge_runtime", *map(str, args)], cwd=REPO,
                          capture_output=True, timeout=timeout, env=env)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8"),
                                       proc.stderr.decode("utf-8", "replace"))
