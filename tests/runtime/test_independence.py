"""The runtime stands alone: every module of ``diki_edge_runtime`` imports with torch, open_clip, onnx and the other
two distributions blocked."""

from __future__ import annotations

import json
from pathlib import Path

from support import NOT_RUNTIME, block, run_blocked  # tests/support.py

import diki_edge_runtime

IMPORT_ALL = """
    import importlib, json, pkgutil, sys
    import diki_edge_runtime
    imported = []
    for info in pkgutil.walk_packages(diki_edge_runtime.__path__, "diki_edge_runtime."):
        if info.name.endswith(".__main__"):  # runs the command: import it as `python -m` would, with --help
            sys.argv = ["diki-edge", "--help"]
            try:
                importlib.import_module(info.name)
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
        else:
            importlib.import_module(info.name)
        imported.append(info.name)
    blocked = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[-1].split(","))
    print(json.dumps({"imported": imported, "blocked_loaded": blocked}))
"""


def _expected_modules() -> set[str]:
    root = Path(diki_edge_runtime.__file__).parent
    names = set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:  # the package itself is imported first, by the script
            names.add(".".join(("diki_edge_runtime", *parts)))
    return names


def test_every_runtime_module_imports_with_torch_onnx_and_the_other_distributions_blocked():
    res = run_blocked(IMPORT_ALL, ",".join(NOT_RUNTIME), block=block(*NOT_RUNTIME))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(report["imported"]) == _expected_modules()  # nothing skipped: the walk saw every file
    assert report["blocked_loaded"] == []


def test_the_block_covers_what_it_names():
    for module in ("torch", "open_clip", "onnx", "diki_edge", "diki_edge_export", "diki_edge.model"):
        res = run_blocked(f"import {module}", block=block(*NOT_RUNTIME))
        assert res.returncode != 0 and f"blocked import of {module.split('.')[0]}" in res.stderr, module
    assert run_blocked("import onnxruntime, diki_edge_runtime", block=block(*NOT_RUNTIME)).returncode == 0

