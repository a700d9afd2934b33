"""``diki-edge predict`` under hostile input: no NaN ever leaves the runtime, every ``--json`` line is strict JSON,
``--threads`` is bounded, ONNX Runtime's log lines follow ``--quiet``/``--verbose``, a non-finite preprocessing
config is refused. Torch-free (the golden model folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hostile import IMAGES, MODEL, REPO, cli, damaged_bank, strict_json

from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.predictor import Prediction, Predictor
from diki_edge_runtime.session import max_threads

PHOTO = IMAGES / "chelsea_0.png"


@pytest.fixture(scope="module")
def extreme_bank(tmp_path_factory):
    """Finite values so large that the Gaussian scores overflow float32 inside the graph."""
    path = tmp_path_factory.mktemp("extreme") / "extreme.safetensors"
    return damaged_bank(path, lambda a, m: a["gauss_whiten"].__imul__(np.float32(1e30)))


def test_non_finite_outputs_are_per_image_inference_errors(extreme_bank):
    predictor = Predictor(MODEL, bank=extreme_bank)
    results = predictor.predict([PHOTO, IMAGES / "noise.png", IMAGES / "missing.png"])
    assert [r.error_kind for r in results] == ["inference", "inference", "not_found"]
    for r in results[:2]:
        assert r.error.startswith(str(r.input)) and "non-finite task_scores" in r.error
        assert r.weight is None and r.top_k == [] and r.task is None

    done = cli("predict", PHOTO, "--model", MODEL, "--bank", extreme_bank, "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stdout.splitlines()
    row = strict_json(line)
    assert row["ok"] is False and row["error"]["kind"] == "inference" and row["weight"] is None


def test_a_normal_bank_still_predicts_finite_values():
    (result,) = Predictor(MODEL).predict([PHOTO])
    assert result.ok and 0.0 <= result.weight <= 1.0 and np.isfinite(result.task_scores).all()
    assert abs(sum(p for _, p in result.top_k) - 1.0) < 1e-6


def test_json_lines_are_strict_for_undecodable_file_names(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not UTF-8
    with open(raw, "wb") as fh:
        fh.write(PHOTO.read_bytes())
    (tmp_path / "empty.png").write_bytes(b"")
    done = cli("predict", tmp_path, "--model", MODEL, "--json")
    assert done.returncode == 1, done.stderr  # the empty file fails, the other predicts
    rows = [strict_json(line) for line in done.stdout.splitlines()]
    assert len(rows) == 2
    named = next(r for r in rows if r["ok"])
    assert named["input"].endswith("/caf\\xe9-\\xff.png")
    assert next(r for r in rows if not r["ok"])["error"]["kind"] == "empty"

    table = cli("predict", tmp_path, "--model", MODEL)  # the table prints the same spelling, no traceback
    assert table.returncode == 1 and "Traceback" not in table.stderr and "caf\\xe9" in table.stdout


def test_prediction_json_survives_lone_surrogates_in_names():
    res = Prediction("a\udcffb.png", 0, task="t\ud800", task_index=0, weight=0.5, top_k=[("c\udfff", 1.0)])
    import json

    row = strict_json(json.dumps(res.to_json(), ensure_ascii=False, allow_nan=False))
    assert row["input"] == "a\\xffb.png" and row["task"] == "t\\ud800" and row["top_k"][0]["class"] == "c\\udfff"


def test_threads_are_bounded_with_a_clear_message():
    start = time.perf_counter()
    done = cli("predict", PHOTO, "--model", MODEL, "--threads", "100000", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--threads 100000 is more than this machine's {os.cpu_count()} cores x 4 = {max_threads()}" in \
        done.stderr.replace("\n", " ")
    assert time.perf_counter() - start < 30  # was: hung creating 100000 threads
    with pytest.raises(RuntimeSetupError, match=f"threads must be at most {max_threads()}"):
        Predictor(MODEL, threads=max_threads() + 1)
    assert Predictor(MODEL, threads=max_threads()).predict([PHOTO])[0].ok
    zero = cli("predict", PHOTO, "--model", MODEL, "--threads", "0")
    assert zero.returncode == 2 and "must be >= 1" in zero.stderr


ORT_ERROR_LOG = textwrap.dedent("""
    import sys
    import numpy as np
    from diki_edge_runtime.predictor import Predictor
    p = Predictor(sys.argv[1], log_severity=int(sys.argv[2]))
    arrays = p.bank.graph_inputs()
    arrays["gauss_mean"] = arrays["gauss_mean"] * np.float32("nan")  # makes ONNX Runtime log a Gather error
    try:
        p.run_arrays(p.pixel_values([sys.argv[3]]), arrays)
    except Exception as exc:
        print("raised", type(exc).__name__)
""")


def test_onnx_runtime_log_lines_follow_the_log_level():
    def stderr_at(level: int) -> str:
        done = subprocess.run([sys.executable, "-c", ORT_ERROR_LOG, str(MODEL), str(level), str(PHOTO)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert "raised" in done.stdout, done.stderr
        return done.stderr

    assert "onnxruntime" in stderr_at(3)  # errors are printed by default
    assert stderr_at(4) == ""  # --quiet: nothing


def test_predict_quiet_and_verbose(tmp_path):
    quiet = cli("predict", PHOTO, tmp_path / "missing.png", "--model", MODEL, "--quiet", "--json")
    assert quiet.returncode == 1 and quiet.stderr == "" and len(quiet.stdout.splitlines()) == 2
    verbose = cli("predict", PHOTO, "--model", MODEL, "--verbose")
    assert verbose.returncode == 0 and "[I:onnxruntime" in verbose.stderr
    both = cli("predict", PHOTO, "--model", MODEL, "--verbose", "--quiet")
    assert both.returncode == 2 and "contradict" in both.stderr


@pytest.mark.parametrize("field, value", [("mean", [0.5, "NaN", 0.5]), ("std", [0.2, 0.2, 1e999]),
                                          ("std", [0.2, 0.0, 0.2])])
def test_non_finite_preprocessing_is_refused(tmp_path, field, value):
    import json

    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    cfg = json.loads((folder / "preprocess.json").read_text())
    cfg[field] = [float(v) if isinstance(v, str) else v for v in value]
    (folder / "preprocess.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeSetupError, match=r"preprocess\.json: .*(must be finite|must not contain zeros)"):
        Predictor(folder)
    done = cli("predict", PHOTO, "--model", folder)
    assert done.returncode == 2 and "preprocess.json" in done.stderr and "Traceback" not in done.stderr


def test_a_reader_that_leaves_early_is_not_a_traceback(tmp_path):
    for i in range(400):  # ~120 KB of JSON lines: more than a pipe buffer holds
        (tmp_path / f"{i:03d}.png").write_bytes(PHOTO.read_bytes())
    proc = subprocess.Popen([sys.executable, "-m", "diki_edge_runtime", "predict", str(tmp_path), "--model", str(MODEL),
                             "--json", "--quiet", "-b", "16"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    stderr = proc.communicate(timeout=120)[1].decode()
    assert strict_json(first.decode())["ok"] and "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_a_model_path_that_is_a_file_says_so(tmp_path):
    not_a_folder = tmp_path / "model"
    not_a_folder.write_text("x")
    with pytest.raises(RuntimeSetupError, match="model: is not a folder"):
        Predictor(not_a_folder)


def test_a_huge_batch_size_is_refused_naming_the_cap_before_any_image_is_read():
    from diki_edge_runtime.cli_predict import MAX_BATCH_SIZE

    huge = cli("predict", PHOTO, "--model", MODEL, "--batch-size", "10000000")
    assert huge.returncode == 2 and "Traceback" not in huge.stderr, huge.stderr
    flat = huge.stderr.replace("\n", " ")
    assert "--batch-size 10000000" in flat and str(MAX_BATCH_SIZE) in flat, flat
    assert cli("predict", PHOTO, "--model", MODEL, "--batch-size", str(MAX_BATCH_SIZE)).returncode == 0
