"""Portability without a second machine: the numerically sensitive tests under every kernel setting this machine can
switch to, one pytest process per setting, and a table of setting -> pass/fail.

Another CPU family (AMD EPYC vs Intel Xeon with AMX) changes which GEMM / reduction kernels run and so how results
round. Here the same kernels are switched by: thread counts (PyTorch via ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``;
ONNX Runtime's intra-op pool via ``scripts/portability/sitecustomize.py``, which every Python process of the run
loads), oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``), PyTorch's own vectorised kernels (``ATEN_CPU_CAPABILITY``) and
MKL's code path (``MKL_ENABLE_INSTRUCTIONS``). ONNX Runtime's MLAS picks its kernels from CPUID with no override, so
for it only the thread count (which changes how GEMMs and reductions are split) is varied. Results and what was run:
docs/portability.md.

    .venv/bin/python scripts/check_portability.py            # every setting, the default tests
    .venv/bin/python scripts/check_portability.py --only threads-1 --tests tests/runtime/test_tolerances.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK_DIR = REPO / "scripts" / "portability"

# The tests whose bounds come from diki_edge_runtime.tolerances or compare two implementations' floats: the golden
# outputs, export validation (graph vs PyTorch), the bounds themselves, the Gaussian scoring and the calibrated model.
SENSITIVE_TESTS = [
    "tests/runtime/test_tolerances.py",
    "tests/runtime/test_gaussian.py",
    "tests/export/test_golden.py",
    "tests/train/test_calibrated.py",
    "tests/export/test_export.py::test_same_graph_any_bank_and_batch",
    "tests/export/test_export.py::test_per_sample_mixing_equals_each_image_alone",
]


def _threads(n: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "DIKI_PORTABILITY_ORT_THREADS": str(n)}


SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "threads-1": _threads(1),
    "threads-2": _threads(2),
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn-avx512-core": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def _existing(tests: list[str]) -> list[str]:
    """The selected tests that exist here (a node id is checked by its file)."""
    return [t for t in tests if (REPO / t.split("::")[0]).is_file()]


def run_setting(name: str, env_extra: dict[str, str], tests: list[str], timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    env["PYTHONPATH"] = os.pathsep.join([str(HOOK_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        rc, tail = None, [f"timed out after {timeout:.0f}s"]
    return {"setting": name, "env": env_extra, "passed": rc == 0, "returncode": rc, "summary": tail[0],
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(SETTINGS), help="run only this setting (repeatable)")
    ap.add_argument("--tests", nargs="+", default=None, help=f"pytest targets (default: {' '.join(SENSITIVE_TESTS)})")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per setting")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    tests = _existing(args.tests or SENSITIVE_TESTS)
    if not tests:
        print("no selected test exists", file=sys.stderr)
        return 2
    results = []
    print(f"tests: {' '.join(tests)}", flush=True)
    print(f"{'setting':22s} {'result':6s} {'seconds':>8s}  pytest summary / environment", flush=True)
    for name in args.only or list(SETTINGS):
        r = run_setting(name, SETTINGS[name], tests, args.timeout)
        results.append(r)
        env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "(unchanged)"
        print(f"{name:22s} {'pass' if r['passed'] else 'FAIL':6s} {r['seconds']:8.1f}  {r['summary']}  [{env}]",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"tests": tests, "results": results}, indent=2) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
