"""Bounded memory for any image: thin images are not upscaled in full, 16-bit and float images are converted a band
at a time and gray images stay one plane until after the resize — with results identical to the plain path.
Torch-free."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hostile import MODEL, REPO
from PIL import Image

from diki_edge_runtime import preprocess as pp
from diki_edge_runtime.images import load_rgb, to_rgb
from diki_edge_runtime.preprocess import Preprocess

PEAK_RSS_LIMIT_MB = 300

MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "wide":
        Image.new("L", (300000, 1), 128).save(path)
    elif kind == "tall":
        Image.new("RGB", (1, 300000), (10, 200, 30)).save(path)
    else:  # a 7000 x 7000 16-bit gradient (Pillow mode I;16), small as a PNG file
        row = (np.arange(7000, dtype=np.uint32) * 9).astype(np.uint16)
        Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (7000, 7000)))).save(path)
    from diki_edge_runtime.predictor import Predictor
    predictor = Predictor(sys.argv[3])
    result = predictor.predict([path])[0]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) forking pytest process
    status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    print(json.dumps({"peak_mb": int(status["VmHWM"].split()[0]) / 1024, "ok": result.ok,
                      "kind": result.error_kind, "weight": result.weight}))
""")


@pytest.mark.parametrize("kind", ["wide", "tall", "deep"])
def test_hostile_image_sizes_predict_in_bounded_memory(tmp_path, kind):
    """300000 x 1, 1 x 300000 and 7000 x 7000 16-bit PNGs: the whole predicting process (ONNX Runtime and the
    model included) peaks under 300 MB and either predicts or answers too_large (was: 3.1 GB and 1.4 GB)."""
    import json

    done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(tmp_path / f"{kind}.png"), str(MODEL)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ok"] or out["kind"] == "too_large", out
    assert out["peak_mb"] < PEAK_RSS_LIMIT_MB, out


@pytest.mark.parametrize("size", [(300, 50), (50, 301), (1000, 7), (7, 999), (2000, 3), (640, 480)])
@pytest.mark.parametrize("cfg", [
    {"size": 224, "interpolation": "bicubic"},
    {"size": 224, "interpolation": "bilinear"},
    {"size": [224, 160], "interpolation": "bilinear"},  # non-square: ResizeKeepRatio, always bicubic
])
def test_resampling_only_the_kept_part_matches_the_full_resize(monkeypatch, size, cfg):
    rng = np.random.default_rng(sum(size))
    noise = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    smooth = noise.resize((max(1, size[0] // 4), max(1, size[1] // 4))).resize(size, Image.Resampling.BILINEAR)
    transform = Preprocess.from_config(cfg)
    for image in (noise, smooth):
        monkeypatch.setattr(pp, "RESIZE_PIXEL_BUDGET", 0)  # always the cropped path
        cropped = transform.geometry(image).astype(int)
        monkeypatch.setattr(pp, "RESIZE_PIXEL_BUDGET", 10 ** 12)  # the plain path: full resize, then crop
        full = transform.geometry(image).astype(int)
        assert cropped.shape == full.shape == (*transform.size, 3)
        diff = np.abs(cropped - full)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.05 and diff.mean() < 0.05


def test_a_thin_image_takes_the_cropped_path_and_keeps_its_content():
    stripes = np.zeros((2, 60000, 3), np.uint8)
    stripes[:, 29000:31000] = 255  # a white band in the middle, which the center crop keeps
    image = Image.fromarray(stripes, "RGB")
    transform = Preprocess.from_config({"size": 224})
    assert 224 * 224 * 30000 > pp.RESIZE_PIXEL_BUDGET
    pixels = transform.geometry(image)
    assert pixels.shape == (224, 224, 3) and pixels.min() == 255  # 2000 source px = 224,000 px wide: all white


def test_gray_images_stay_one_plane_with_identical_pixels(tmp_path):
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (300, 500), dtype=np.uint8), "L")
    for cfg in ({"size": 224}, {"size": 224, "resize_mode": "longest", "fill_color": 7},
                {"size": [200, 180], "resize_mode": "squash"}, {"size": [224, 160]}):
        transform = Preprocess.from_config(cfg)
        assert np.array_equal(transform(gray), transform(gray.convert("RGB")))
    deep = Image.fromarray(rng.integers(0, 65536, (64, 80), dtype=np.uint16))
    path = tmp_path / "deep.png"
    deep.save(path)
    kept = load_rgb(path, keep_gray=True)
    assert kept.mode == "L" and load_rgb(path).mode == "RGB"
    assert np.array_equal(np.asarray(kept.convert("RGB")), np.asarray(load_rgb(path)))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_banded_conversion_matches_the_formula(monkeypatch, mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        values = rng.integers(0, 65536, (37, 53)).astype(np.uint16)
        expected = np.clip(np.rint(values / 257.0), 0, 255)
        image = Image.fromarray(values)
    elif mode == "I":
        values = rng.integers(-5000, 90000, (37, 53)).astype(np.int32)
        expected = np.clip(np.rint(values / 257.0), 0, 255)
        image = Image.fromarray(values, "I")
    else:
        values = rng.random((37, 53)).astype(np.float32)
        expected = np.clip(np.rint(values.astype(np.float64) * 255), 0, 255)
        image = Image.fromarray(values, "F")
    from diki_edge_runtime import images

    monkeypatch.setattr(images, "_CONVERT_CHUNK_PIXELS", 100)  # many bands, the last one short
    out = np.asarray(to_rgb(image))
    assert out.shape == (37, 53, 3) and np.array_equal(out[..., 0], expected.astype(np.uint8))


def test_image_paths_that_are_not_regular_files_say_what_they_are(tmp_path):
    from diki_edge_runtime.images import ImageError

    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    cases = {loop: ("unreadable", "symlink loop"), dangling: ("not_found", "dangling symlink to"),
             tmp_path: ("unreadable", "not a regular file (a directory)"),
             Path("/dev/zero"): ("unreadable", "not a regular file (a device, FIFO or socket)")}
    for path, (kind, text) in cases.items():
        with pytest.raises(ImageError) as info:
            load_rgb(path)
        assert info.value.kind == kind and info.value.message.startswith(str(path)) and text in info.value.message
