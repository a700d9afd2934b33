"""scripts/check_cuda.py on a machine without a GPU: it refuses clearly before any long work, parses its
arguments, and its dry run (the CPU halves) writes the JSON record. The full dry run of every part is what
``python scripts/check_cuda.py --dry-run`` does (minutes: it exports fp16)."""

from __future__ import annotations

import importlib.util
import json
import sys

import onnxruntime as ort
import pytest
from support import REPO  # tests/support.py


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("check_cuda", REPO / "scripts" / "check_cuda.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_without_cuda_it_refuses_before_any_work(script, tmp_path, capsys):
    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # this machine: the CPU build
    assert script.main(["--out", str(tmp_path), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "no usable CUDA execution provider here" in err and "onnxruntime-gpu" in err and "--dry-run" in err
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


def test_arguments(script):
    args = script.parse_args(["--parts", "parity, latency", "--repeats", "3", "--photos", "64"])
    assert args.parts == ["parity", "latency"] and args.repeats == 3 and args.photos == 64 and not args.dry_run
    assert list(script.PARTS) == ["env", "parity", "io_binding", "fp16", "latency", "tensorrt", "training"]
    for bad in (["--parts", "parity,nope"], ["--repeats", "0"], ["--photos", "500"]):
        with pytest.raises(SystemExit) as exc:
            script.parse_args(bad)
        assert exc.value.code == 2


def test_dry_run_records_every_check(script, tmp_path):
    assert script.main(["--dry-run", "--parts", "env,tensorrt", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")]) == 0
    record = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert record["dry_run"] is True and record["ok"] is True and list(record["parts"]) == ["env", "tensorrt"]
    env = record["parts"]["env"]
    assert env["checks"] == {"cuda_provider_offered": None}  # not a pass: not run here
    assert "CPUExecutionProvider" in env["figures"]["available"]
    assert record["parts"]["tensorrt"]["checks"] == {"tensorrt": None}
