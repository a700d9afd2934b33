"""Smoke test of the benchmark harness (``python -m benchmarks --tiny``): every measurement runs end to end on the
tiny random backbone and writes JSON of the documented schema. No timing assertions: the figures of a tiny model
on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("open_clip")

from benchmarks.__main__ import OWN  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

MACHINE_KEYS = {"cpu_model", "usable_cores", "logical_cpus", "memory_gib", "python", "torch_version",
                "onnxruntime_version", "numpy_version", "open_clip_version", "loadavg_at_start"}
RESULT_KEYS = {"schema_version", "name", "title", "target", "columns", "rows", "met", "contended", "notes",
               "number", "seconds", "machine", "config", "command", "finished"}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    cache = tmp_path_factory.mktemp("bench-cache")
    t0 = time.perf_counter()
    # In its own process: the run loads OpenVINO and torch's bf16 kernels with their thread pools, and later tests
    # fork (DataLoader workers); a fork of a process holding those pools crashed the whole test session.
    code = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out), "--cache", str(cache)],
                          cwd=REPO, stdout=subprocess.DEVNULL).returncode
    return out, code, time.perf_counter() - t0


def test_tiny_run_completes(tiny_results):
    out, code, seconds = tiny_results
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["results"]] == [n for n, _, _ in OWN]
    assert summary["config"]["tiny"] is True
    assert MACHINE_KEYS <= set(summary["machine"])
    failed = [r["name"] for r in summary["results"] if r["target"] == "(failed)"]
    assert not failed, failed


@pytest.mark.parametrize("name", [n for n, _, _ in OWN])
def test_result_schema(tiny_results, name):
    out, _, _ = tiny_results
    res = json.loads((out / f"{name}.json").read_text())
    assert RESULT_KEYS <= set(res), RESULT_KEYS - set(res)
    assert res["schema_version"] == 1 and res["name"] == name
    assert res["met"] in (True, False, None)
    assert isinstance(res["columns"], list) and res["columns"]
    assert isinstance(res["rows"], list) and res["rows"]
    for row in res["rows"]:
        assert set(res["columns"]) <= set(row), (name, set(res["columns"]) - set(row))
        assert row["met"] in (True, False, None)
    assert MACHINE_KEYS <= set(res["machine"])
    assert res["command"].startswith("python -m benchmarks")
    assert all(isinstance(n, str) for n in res["notes"])


def test_timings_carry_min_median_max(tiny_results):
    out, _, _ = tiny_results
    res = json.loads((out / "latency.json").read_text())
    for row in res["rows"]:
        for side in ("onnxruntime", "pytorch"):
            t = row["data"][side]
            assert t["unit"] == "ms" and t["n"] == len(t["samples"]) >= 1
            assert t["min"] <= t["median"] <= t["max"]


def test_runtime_does_not_import_torch(tiny_results):
    out, _, _ = tiny_results
    res = json.loads((out / "cold_start.json").read_text())
    check = [r for r in res["rows"] if r["path"].startswith("runtime vs PyTorch")][0]
    assert check["data"]["heavy_imports"] == []
    rss = [r for r in res["rows"] if r["path"].startswith("peak RSS")][0]
    assert rss["data"]["rss_ratio"] > 0


def test_params_figure_matches_issue():
    from benchmarks.bench_params import count

    assert count("ViT-B-16", 11)["per_task"] == 163_840


def test_roofline_counts_and_peaks(tiny_results):
    from benchmarks.roofline import cpu_flags, has_bf16_units

    """The roofline benchmark on the tiny model: both peaks measured, every path's work counted from its graph, and
    PyTorch's own counter agrees with the ONNX count of the calibrated graph (the same computation on both sides)."""
    out, _, _ = tiny_results
    res = json.loads((out / "roofline.json").read_text())
    assert all(g > 0 for k in ("fp32", "int8") for g in res["peaks"][k]["gflops_by_block"])
    # bf16 is measured exactly where the CPU reports bf16 units, and the features it was decided on are recorded
    assert ("bf16" in res["peaks"]) == has_bf16_units() and res["cpu_features"] == list(cpu_flags())
    counts = next(iter(res["gflop_per_image"].values()))
    onnx_familiar = counts["calibrated fp32, familiar"]
    torch_familiar = next(v for k, v in counts.items() if k.startswith("PyTorch"))
    assert torch_familiar == pytest.approx(onnx_familiar, rel=1e-3)
    # familiar images run pass 2, unfamiliar ones skip it: about twice the work of the plain encoder
    assert onnx_familiar == pytest.approx(2 * counts["plain encoder (rewrite)"], rel=0.05)
    assert counts["calibrated fp32, unfamiliar"] == pytest.approx(counts["plain encoder (rewrite)"], rel=0.05)
    for row in res["rows"]:
        d = row["data"]
        if "fraction_of_peak" in d:
            assert d["peak_gflops"] in res["peaks"][d["peak"]]["gflops_by_block"]
            assert d["fraction_of_peak"] == pytest.approx(d["gflops"] / d["peak_gflops"])
        assert row["load"].startswith(("quiet", "CONTENDED"))


def test_latency_records_pytorch_settings(tiny_results):
    out, _, _ = tiny_results
    res = json.loads((out / "latency.json").read_text())
    for row in res["rows"]:
        eager = row["data"]["pytorch_eager"]
        assert eager["chosen"] in eager["trial"] and row["pytorch setting"] == eager["chosen"]
        assert eager["threads"]["intra_op_threads"] == row["data"]["threads"]
        assert row["met"] is None  # the ratio to PyTorch is reported, not targeted


def test_peers_compares_validated_runtime_paths_with_pytorch(tiny_results):
    """The peers measurement on the tiny model: at each batch the runtime's paths, PyTorch's fastest eager (and bf16
    autocast where the CPU has bf16 units) and OpenVINO's plain encoder ran in the same rounds; the summary ratio is
    the smaller of the batches' fastest-validated-runtime / fastest-PyTorch throughput ratios."""
    from benchmarks.roofline import has_bf16_units

    out, _, _ = tiny_results
    res = json.loads((out / "peers.json").read_text())
    for batch in (1, 8):
        rows = [r for r in res["rows"] if r["batch"] == batch]
        paths = {r["path"] for r in rows}
        assert {"runtime fp32 (ORT)", "runtime int8 (ORT MatMulInteger)"} <= paths
        assert any(p.startswith("PyTorch fp32") for p in paths)
        assert any(p.startswith("PyTorch bf16 autocast") for p in paths) == has_bf16_units()
        assert ("runtime bf16 (OpenVINO)" in paths) == has_bf16_units()
        assert any(p.startswith("OpenVINO plain encoder") for p in paths)
        ips = {r["path"]: r["data"]["images_per_s"] for r in rows}
        best_rt = next(r["path"] for r in rows if r["fastest"] == "runtime")
        best_torch = next(r["path"] for r in rows if r["fastest"] == "torch")
        assert next(r for r in rows if r["path"] == best_rt)["validated"] == "yes"
        assert res["summary"]["by_batch"][str(batch)] == pytest.approx(ips[best_rt] / ips[best_torch])
        for r in rows:
            assert r["load"].startswith(("quiet", "CONTENDED"))
            if r["data"]["fraction_of_peak"] is not None:
                assert r["data"]["peak"] in ("int8", "bf16") and r["data"]["fraction_of_peak"] > 0
    assert res["summary"]["fastest_vs_torch_fastest"] == min(res["summary"]["by_batch"].values())
