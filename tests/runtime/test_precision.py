"""Precision choice (precision.py, cpu_features.py) and the bf16 path over OpenVINO (ov_session.py): CPU flags
parsed from fake ``/proc/cpuinfo`` texts, the errors naming what is missing, the bf16 outputs on the golden model
folder against the PyTorch fp32 reference within the derived bf16 bounds (tolerances.bf16_min_cosine), ``auto``'s
probe check and what ``info()`` / ``predict --verbose`` report.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from support import REPO  # tests/support.py

from diki_edge_runtime import Predictor
from diki_edge_runtime import precision as precision_mod
from diki_edge_runtime.cpu_features import CpuFeatures, parse_cpuinfo, read_cpu_features
from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.tolerances import BF16_MIN_COSINE, bf16_min_cosine

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse
"""
ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: fpu sse avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16 i8mm\nCPU implementer\t: 0x41\n"
NO_BF16 = CpuFeatures(frozenset({"avx2", "fma"}), "a CPU without bf16")
HAS_BF16 = read_cpu_features().has_bf16


def test_cpuinfo_flags_are_parsed_from_the_first_processor():
    cpu = parse_cpuinfo(XEON_AMX)
    assert cpu.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.bf16_kernels == ["amx_bf16", "avx512_bf16"] and cpu.has_bf16
    assert cpu.int8_kernels == ["amx_int8", "avx512_vnni", "avx_vnni"] and cpu.has_int8
    assert cpu.kernels()[:2] == ["amx_tile", "amx_bf16"]
    zen3 = parse_cpuinfo(ZEN3)
    assert not zen3.has_bf16 and not zen3.has_int8 and zen3.kernels() == ["avx2", "fma"]
    arm = parse_cpuinfo(ARM)  # ARM's bf16 flag is not an x86 bf16 matrix unit OpenVINO's bf16 path uses
    assert "asimd" in arm.flags and not arm.has_bf16
    assert parse_cpuinfo("").flags == frozenset()


def test_unreadable_cpuinfo_reports_no_kernel(tmp_path):
    assert read_cpu_features(tmp_path / "absent").flags == frozenset()


def test_precision_names_are_checked():
    with pytest.raises(RuntimeSetupError, match="use one of fp32, bf16, auto"):
        precision_mod.check_precision("fp8")
    assert precision_mod.resolve_precision("FP32", "cuda") == "fp32"


def test_bf16_without_the_cpu_flags_names_them(golden, monkeypatch):
    monkeypatch.setattr(precision_mod, "read_cpu_features", lambda: NO_BF16)
    with pytest.raises(RuntimeSetupError, match=r"no bf16 matrix unit .*amx_bf16, avx512_bf16") as exc:
        Predictor(golden.model_dir, precision="bf16")
    assert "Nothing was run at another precision" in str(exc.value)
    auto = Predictor(golden.model_dir, precision="auto")  # auto: fp32, and says so
    assert auto.info()["compute"]["precision"] == "fp32" and auto.info()["compute"]["engine"] == "onnxruntime"


def test_bf16_without_openvino_names_the_package(golden, monkeypatch):
    monkeypatch.setattr(precision_mod, "read_cpu_features", lambda: parse_cpuinfo(XEON_AMX))
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(RuntimeSetupError, match=r"pip install 'diki-edge-runtime\[openvino\]'"):
        Predictor(golden.model_dir, precision="bf16")
    assert Predictor(golden.model_dir, precision="auto").info()["compute"]["precision"] == "fp32"


def test_bf16_is_refused_with_a_gpu_provider():
    with pytest.raises(RuntimeSetupError, match="cannot be combined with the provider 'cuda'"):
        precision_mod.resolve_precision("bf16", "cuda", parse_cpuinfo(XEON_AMX))
    assert precision_mod.resolve_precision("auto", "cuda", parse_cpuinfo(XEON_AMX)) == "fp32"


def test_bf16_bound_follows_the_analysis():
    # ViT-B/16 (12 layers): r = 4 sqrt(48) sqrt(2) 2^-8 = 0.1531, cos >= 1 - r^2/2 = 0.98828; the constant is below
    assert abs(bf16_min_cosine() - (1 - 0.5 * (4 * 48**0.5 * 2**0.5 / 256) ** 2)) < 1e-12
    assert BF16_MIN_COSINE <= bf16_min_cosine() < bf16_min_cosine(layers=2)


def test_bf16_outputs_within_the_bf16_bounds_of_fp32(golden):
    if not HAS_BF16:  # this CPU cannot run bf16: asking for it is the error naming the flags
        with pytest.raises(RuntimeSetupError, match="no bf16 matrix unit"):
            Predictor(golden.model_dir, precision="bf16")
        return
    p = Predictor(golden.model_dir, precision="bf16", threads=2)
    compute = p.info()["compute"]
    assert compute["precision"] == "bf16" and compute["engine"] == "openvino"
    assert compute["cpu_kernels"] and set(compute["cpu_kernels"]) <= {"amx_bf16", "avx512_bf16"}
    results = p.predict([str(f) for f in golden.files], top_k=3, batch_size=4)
    ref = golden.reference("three")
    bank = golden.banks["three"]
    got = np.stack([r.image_embeds for r in results]).astype(np.float64)
    want = ref["image_embeds"].astype(np.float64)
    cos = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= BF16_MIN_COSINE, cos.min()
    assert cos.min() < 1 - 1e-7  # really a different arithmetic, not fp32 under another name
    # the export validation's checks: same task everywhere, top-1 agreement
    assert [r.task_index for r in results] == [int(t) for t in ref["task"]]
    top1 = [r.top_k[0][0] for r in results]
    assert top1 == [bank.class_names[int(np.argmax(row))] for row in ref["logits"]]


def test_auto_keeps_bf16_only_when_the_probe_agrees(golden, monkeypatch):
    if not HAS_BF16:
        assert Predictor(golden.model_dir, precision="auto").info()["compute"]["precision"] == "fp32"
        return
    p = Predictor(golden.model_dir, precision="auto", threads=2)
    compute = p.info()["compute"]
    assert compute["precision"] == "bf16" and compute["requested"] == "auto"
    assert any("agrees with fp32" in n for n in compute["notes"])
    # a bound no bf16 run can meet: auto falls back to fp32 and says why
    import diki_edge_runtime.tolerances as tol

    monkeypatch.setattr(tol, "BF16_MIN_COSINE", 1.5)
    p = Predictor(golden.model_dir, precision="auto", threads=2)
    compute = p.info()["compute"]
    assert compute["precision"] == "fp32" and compute["engine"] == "onnxruntime"
    assert any("disagreed with fp32" in n and "cosine" in n for n in compute["notes"])
    assert p.predict([str(golden.files[0])])[0].ok


def test_default_stays_fp32_and_info_reports_it(golden):
    compute = Predictor(golden.model_dir).info()["compute"]
    assert compute["precision"] == golden.meta.get("precision", "fp32") == "fp32"
    assert compute["requested"] == "fp32" and compute["engine"] == "onnxruntime"
    assert compute["providers"] == ["CPUExecutionProvider"]
    assert compute["cpu_matrix_flags"] == read_cpu_features().kernels()


def test_predict_verbose_says_precision_and_kernels(golden):
    out = subprocess.run([sys.executable, "-m", "diki_edge_runtime", "predict", str(golden.files[0]), "--model",
                          str(golden.model_dir), "--precision", "auto", "--verbose"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    expected = "bf16" if HAS_BF16 else "fp32"
    assert f"precision {expected} (asked: auto)" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "diki_edge_runtime", "predict", str(golden.files[0]), "--model",
                          str(golden.model_dir), "--precision", "fp8"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--precision 'fp8'" in bad.stderr and "Traceback" not in bad.stderr
