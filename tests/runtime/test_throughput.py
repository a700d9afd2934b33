"""Pipelined decoding, fast JPEG decoding, provider choice and memory settings on the committed golden model
folder (tests/runtime/golden): the Predictor and the ``predict`` command (the command through a subprocess where
torch cannot be imported). Speed itself is measured in benchmarks/bench_throughput.py, not here.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import run_blocked  # tests/support.py

from diki_edge_runtime import Predictor
from diki_edge_runtime.images import load_rgb
from diki_edge_runtime.preprocess import Preprocess


@pytest.fixture(scope="module")
def model_dir(golden) -> Path:
    return golden.model_dir


def _photo(golden, name: str, size: tuple[int, int]) -> Image.Image:
    return golden.image(name).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def photos(golden, tmp_path_factory) -> dict[str, Path]:
    """The golden photographs as large JPEGs (1600 x 1200, where fast decoding matters), a small PNG, and an
    EXIF-rotated JPEG."""
    tmp = tmp_path_factory.mktemp("photos")
    files = {}
    for name in ("chelsea_0", "coffee_0", "astronaut_0", "rocket_0"):
        files[name] = tmp / f"{name}.jpg"
        _photo(golden, name, (1600, 1200)).save(files[name], quality=90)
    files["small_png"] = golden.root / "images" / "chelsea_1.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90 degrees clockwise)
    files["rotated"] = tmp / "rotated.jpg"
    _photo(golden, "coffee_1", (1600, 900)).save(files["rotated"], quality=90, exif=exif)
    return files


def _mixed_inputs(golden, photos: dict[str, Path], tmp: Path) -> list:
    (tmp / "empty.jpg").write_bytes(b"")
    data = photos["coffee_0"].read_bytes()
    (tmp / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (tmp / "notes.txt").write_text("not an image")
    return [str(photos["chelsea_0"]), str(tmp / "missing.jpg"), str(photos["small_png"]), str(tmp / "empty.jpg"),
            str(tmp / "trunc.jpg"), np.asarray(_photo(golden, "rocket_1", (64, 48))), str(tmp / "notes.txt"),
            _photo(golden, "astronaut_1", (320, 240)), 42, str(photos["rotated"]), str(photos["coffee_0"])]


def test_workers_keep_the_order_and_the_per_image_errors(golden, model_dir, photos, tmp_path):
    inputs = _mixed_inputs(golden, photos, tmp_path)
    serial = Predictor(model_dir, threads=1, workers=0).predict(inputs, batch_size=3)
    for workers in (1, 3):
        pooled = Predictor(model_dir, threads=1, workers=workers).predict(inputs, batch_size=3)
        assert [r.input for r in pooled] == [r.input for r in serial]
        assert [r.index for r in pooled] == list(range(len(inputs)))
        assert [(r.error_kind, r.error) for r in pooled] == [(r.error_kind, r.error) for r in serial]
        for a, b in zip(serial, pooled):
            if a.ok:
                assert a.task == b.task and a.top_k == b.top_k
                np.testing.assert_array_equal(a.image_embeds, b.image_embeds)
    kinds = [r.error_kind for r in serial]
    assert kinds == [None, "not_found", None, "empty", "truncated", None, "not_an_image", None, "unsupported",
                     None, None]


def test_decoding_runs_in_the_worker_threads(model_dir, photos):
    p = Predictor(model_dir, threads=1, workers=3)
    names = set()
    real = p.preprocess

    class Recording:
        def __call__(self, image):
            names.add(threading.current_thread().name)
            return real(image)

    p.preprocess = Recording()
    p.predict([str(f) for f in photos.values()], batch_size=2)
    assert names and all(n.startswith("diki-edge-decode") for n in names)


def test_memory_does_not_grow_with_the_number_of_inputs(golden, model_dir):
    """An endless generator of inputs: never more than the batch being answered plus batch_size + 2 * workers in
    the decode pool taken and not yet answered, however many inputs come."""
    p = Predictor(model_dir, threads=1, workers=2)
    image = np.asarray(_photo(golden, "chelsea_1", (96, 64)))
    taken = 0

    def endless():
        nonlocal taken
        while True:
            taken += 1
            yield image

    answered = 0
    worst = 0
    results = p.iter_predict(endless(), batch_size=4)
    for res in results:
        assert res.ok and res.index == answered
        answered += 1
        worst = max(worst, taken - answered)
        if answered == 20:
            early = worst
        if answered == 80:
            break
    results.close()
    assert worst <= 2 * 4 + 2 * 2 and worst == early


def test_fast_decode_reads_jpegs_at_a_reduced_scale_and_stays_close(model_dir, photos):
    exact = Predictor(model_dir, threads=1)
    fast = Predictor(model_dir, threads=1, fast_decode=True)
    assert not exact.info()["fast_decode"] and fast.info()["fast_decode"]
    pre = fast.preprocess
    with Image.open(photos["chelsea_0"]) as im:
        full = im.size
    short = min(pre.size)
    reduced = load_rgb(photos["chelsea_0"], draft=pre.draft_size)
    scale = 1200 // short  # the largest DCT scale (of 1/2, 1/4, 1/8) that keeps the short edge >= the target
    scale = max(a for a in (1, 2, 4, 8) if a <= scale)
    assert scale > 1 and reduced.size == (-(-full[0] // scale), -(-full[1] // scale))
    assert min(reduced.size) >= short
    assert load_rgb(photos["chelsea_0"]).size == full
    rotated = load_rgb(photos["rotated"], draft=pre.draft_size)  # stored 1600 x 900, EXIF-rotated after decoding
    assert rotated.size[0] < rotated.size[1] and rotated.size[0] < 900 and min(rotated.size) >= short
    files = [str(photos[n]) for n in ("chelsea_0", "coffee_0", "astronaut_0", "rocket_0", "rotated")]
    a, b = exact.pixel_values(files), fast.pixel_values(files)
    assert np.abs(a - b).max() > 0  # the pixels do change (why it is off by default) ...
    assert np.abs(a - b).mean() < 0.05  # ... but little (normalised units)
    ra, rb = exact.predict(files), fast.predict(files)
    for x, y in zip(ra, rb):
        cosine = float(x.image_embeds @ y.image_embeds)
        assert cosine > 0.99 and x.task == y.task
    png = [str(photos["small_png"])]
    np.testing.assert_array_equal(exact.pixel_values(png), fast.pixel_values(png))  # not a JPEG: untouched


@pytest.mark.parametrize("cfg", [
    {"size": 224},
    {"size": [224, 160]},
    {"size": [160, 224], "resize_mode": "longest"},
    {"size": [224, 224], "resize_mode": "squash"},
])
def test_draft_size_never_makes_the_resize_enlarge(cfg):
    pre = Preprocess.from_config(cfg)
    for width, height in [(1600, 1200), (1200, 1600), (4000, 900), (640, 480), (225, 3000)]:
        dw, dh = pre.draft_size(width, height)
        assert dw <= width and dh <= height or (dw, dh) == (width, height) or min(dw - width, dh - height) <= 1
        for w, h in ((dw, dh), (dh, dw)):  # either orientation (EXIF rotation comes after decoding)
            rh, rw = pre.resized_hw(w, h)
            assert rw <= w + 1 and rh <= h + 1, (cfg, width, height, w, h, rw, rh)


def test_info_reports_providers_memory_and_decoding(golden, model_dir):
    p = Predictor(model_dir, provider="openvino,cpu", threads=1, low_memory=True, workers=2)
    info = p.info()
    assert info["providers"] == ["CPUExecutionProvider"] and info["requested_providers"] == ["openvino", "cpu"]
    assert len(info["provider_notes"]) == 1 and info["provider_notes"][0].startswith("openvino skipped")
    assert info["memory"] == {"low_memory": True, "cpu_mem_arena": False, "mem_pattern": False}
    assert info["workers"] == 2 and info["fast_decode"] is False
    image = np.asarray(_photo(golden, "coffee_1", (120, 90)))
    low, default = p.predict([image])[0], Predictor(model_dir, threads=1).predict([image])[0]
    assert low.task == default.task
    np.testing.assert_allclose(low.image_embeds, default.image_embeds, atol=1e-6)


def test_bad_workers_are_a_setup_error(model_dir):
    from diki_edge_runtime.errors import RuntimeSetupError

    with pytest.raises(RuntimeSetupError, match="workers must be an integer >= 0"):
        Predictor(model_dir, workers=-1)


# ---------------------------------------------------------------------------- the command, without torch
CLI = """
import sys
from diki_edge_runtime.cli import main
main(["predict", *sys.argv[1:]])
"""


def test_cli_provider_the_build_lacks_exits_2_and_runs_nothing(model_dir, photos):
    res = run_blocked(CLI, str(photos["chelsea_0"]), "--model", str(model_dir), "--provider", "tensorrt", "--json")
    assert res.returncode == 2 and res.stdout == ""
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert "the tensorrt execution provider (TensorrtExecutionProvider) is not in the installed" in err
    assert "onnxruntime-gpu" in err and "Nothing was run on another provider" in err


def test_cli_user_written_chain_workers_fast_decode_low_memory(model_dir, photos, tmp_path):
    files = [str(photos[n]) for n in ("coffee_0", "chelsea_0", "small_png", "rocket_0")]
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"openvino": {"device_type": "GPU"}}))
    res = run_blocked(CLI, *files, "--model", str(model_dir), "--provider", "openvino,cpu", "--provider-options",
                      str(options), "--provider-option", "openvino:precision=FP16", "--workers", "3",
                      "--fast-decode", "--low-memory", "--json", "--batch-size", "2")
    assert res.returncode == 0, res.stderr
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert "providers: CPUExecutionProvider" in err
    assert "note: openvino skipped: not in this ONNX Runtime build (provided by onnxruntime-openvino" in err
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [line["input"] for line in lines] == files and all(line["ok"] for line in lines)


@pytest.mark.parametrize("args,message", [
    (["--provider-option", "cuda:device_id=0"], "provider options given for cuda, which the provider choice (cpu)"),
    (["--provider-option", "device_id"], "write NAME:KEY=VALUE"),
    (["--provider-options", "nowhere.json"], "nowhere.json: provider options file not found"),
    (["--provider", "tpu"], "unknown execution provider 'tpu'"),
])
def test_cli_bad_provider_settings_exit_2(model_dir, photos, args, message):
    res = run_blocked(CLI, str(photos["chelsea_0"]), "--model", str(model_dir), *args)
    assert res.returncode == 2 and res.stdout == ""
    assert message in " ".join(res.stderr.split()), res.stderr


def test_cli_negative_workers_exit_2(model_dir, photos):
    res = run_blocked(CLI, str(photos["chelsea_0"]), "--model", str(model_dir), "--workers", "-1")
    assert res.returncode == 2 and "--workers" in res.stderr
