"""Runtime preprocessing and image decoding, torch-free: the golden folder's images against open_clip's stored
output, the geometry of every resize mode, EXIF orientation, image modes, bad files and configs.

The comparison with open_clip's transform itself on many photographs, modes and formats needs torch and lives
in tests/export/test_preprocess_parity.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from diki_edge_runtime.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from diki_edge_runtime.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

MEAN, STD = list(CLIP_MEAN), list(CLIP_STD)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, photograph-like ``uint8 [H, W, 3]`` image (gradients, a disc, a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float64)
    channels = [np.sin(6 * x + seed) * 0.5 + 0.5, y, disc * 0.8 + 0.1 * np.cos(9 * y)]
    img = np.stack(channels, axis=-1) * 230 + rng.normal(scale=6, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


PHOTO = _photo(300, 451)  # landscape
GRAY = _photo(256, 256, seed=1)[..., 0].copy()


def test_golden_images_match_open_clips_stored_transform(golden):
    """The exported folder's preprocess.json, applied by the runtime, gives open_clip's pixels (stored by
    scripts/make_golden_model.py in golden.npz) for the folder's images, RGB and grayscale."""
    pre = Preprocess.from_file(golden.model_dir / "preprocess.json")
    got = pre.batch([load_rgb(path) for path in golden.files])
    want = golden.outputs["pixel_values"]
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("size,mode", [((32, 32), "shortest"), ((48, 64), "shortest"), ((40, 56), "longest"),
                                       ((64, 48), "squash")])
def test_every_resize_mode_gives_the_configured_size(size, mode):
    pre = Preprocess.from_config({"size": list(size), "mean": MEAN, "std": STD, "resize_mode": mode})
    for h, w in ((300, 451), (451, 300), (13, 21), (size[0], size[1])):
        out = pre(Image.fromarray(_photo(h, w)))
        assert out.shape == (3, *size) and out.dtype == np.float32 and np.isfinite(out).all()


def test_normalisation_is_to_tensor_then_mean_std():
    """An image already at the target size is not resampled: the output is exactly (x / 255 - mean) / std."""
    pixels = _photo(32, 32, seed=3)
    pre = Preprocess.from_config({"size": 32, "mean": MEAN, "std": STD})
    want = (pixels.astype(np.float32).transpose(2, 0, 1) / np.float32(255) - np.float32(MEAN)[:, None, None]) \
        / np.float32(STD)[:, None, None]
    np.testing.assert_array_equal(pre(Image.fromarray(pixels)), want)


def test_longest_pads_with_the_fill_colour_and_shortest_crops_the_centre():
    wide = Image.fromarray(np.full((20, 80, 3), 200, np.uint8))
    padded = Preprocess.from_config({"size": [40, 40], "mean": [0, 0, 0], "std": [1, 1, 1], "resize_mode": "longest",
                                     "fill_color": 128}).geometry(wide)
    assert padded.shape == (40, 40, 3)
    assert (padded[:15] == 128).all() and (padded[-15:] == 128).all() and (padded[15:25] == 200).all()  # 40 x 10
    stripes = np.zeros((10, 30, 3), np.uint8)
    stripes[:, 10:20] = 255  # only the middle third is white
    cropped = Preprocess.from_config({"size": 10, "mean": [0, 0, 0], "std": [1, 1, 1]}).geometry(
        Image.fromarray(stripes))
    assert cropped.shape == (10, 10, 3) and (cropped == 255).all()


def _jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_honoured(tmp_path, orientation):
    img = Image.fromarray(PHOTO)  # landscape: a 90 degree turn changes the aspect ratio
    path = tmp_path / f"rot{orientation}.jpg"
    path.write_bytes(_jpeg_with_orientation(img, orientation))
    rgb = load_rgb(path)
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation
        transposed = ImageOps.exif_transpose(raw)
        if orientation in (6, 8):
            assert rgb.size == (raw.height, raw.width)
        expected_pixels = np.asarray(transposed.convert("RGB"))
    assert np.array_equal(np.asarray(rgb), expected_pixels)
    pre = Preprocess.from_config({"size": 32, "mean": MEAN, "std": STD})
    np.testing.assert_array_equal(pre(load_rgb(path)), pre(Image.fromarray(expected_pixels)))


def test_image_modes_convert_to_the_same_rgb(tmp_path):
    """Palette, RGBA (alpha dropped), CMYK and grayscale files decode to 8-bit RGB with the right pixels."""
    img = Image.fromarray(PHOTO)
    img.save(tmp_path / "rgb.png")
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    rgba.save(tmp_path / "rgba.png")
    img.convert("L").save(tmp_path / "gray.png")
    palette = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(tmp_path / "palette.png")
    img.convert("CMYK").save(tmp_path / "cmyk.tiff")
    for name in ("rgb", "rgba", "gray", "palette", "cmyk"):
        rgb = load_rgb(tmp_path / f"{name}.{'tiff' if name == 'cmyk' else 'png'}")
        assert rgb.mode == "RGB" and rgb.size == img.size, name
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "rgba.png")), PHOTO)  # colour kept as stored
    gray = np.asarray(load_rgb(tmp_path / "gray.png"))
    assert np.array_equal(gray[..., 0], gray[..., 2]) and np.array_equal(gray[..., 0], np.asarray(img.convert("L")))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "palette.png")), np.asarray(palette.convert("RGB")))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gray16 = (GRAY.astype(np.uint32) * 257).astype(np.uint16)  # exact 8 -> 16 bit expansion
    path = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # Pillow opens it as a 16/32-bit integer image
    rgb = np.asarray(load_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (*gray16.shape, 3)
    assert np.array_equal(rgb[..., 0], GRAY)  # not clipped to white
    arr_rgb = np.asarray(load_rgb(gray16))
    assert np.array_equal(arr_rgb[..., 0], GRAY)


def test_numpy_inputs():
    astro = PHOTO
    assert np.array_equal(np.asarray(load_rgb(astro)), astro)
    gray = GRAY
    assert np.array_equal(np.asarray(load_rgb(gray))[..., 1], gray)
    assert np.array_equal(np.asarray(load_rgb(gray[..., None]))[..., 2], gray)
    rgba = np.dstack([astro, np.full(astro.shape[:2], 7, np.uint8)])
    assert np.array_equal(np.asarray(load_rgb(rgba)), astro)
    for bad in (astro.astype(np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 3, 4, 3), np.uint8)):
        with pytest.raises(ImageError) as exc:
            load_rgb(bad)
        assert exc.value.kind == "unsupported"


def test_bad_files_get_clear_errors(tmp_path):
    good = Image.fromarray(PHOTO)
    jpg = tmp_path / "good.jpg"
    good.save(jpg)
    data = jpg.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.png").write_text("not an image at all\n")
    (tmp_path / "folder.jpg").mkdir()
    cases = {
        "missing.jpg": "not_found",
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "text.png": "not_an_image",
        "folder.jpg": "unreadable",
    }
    for name, kind in cases.items():
        with pytest.raises(ImageError) as exc:
            load_rgb(tmp_path / name)
        assert exc.value.kind == kind, (name, exc.value)
        assert name in str(exc.value)
    assert load_rgb(jpg).size == good.size


def test_pixel_limit_refuses_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(big)  # 6 MP, tiny on disk
    with pytest.raises(ImageError) as exc:
        load_rgb(big, max_pixels=5_000_000)
    assert exc.value.kind == "too_large" and "5000000" in str(exc.value)
    assert load_rgb(big, max_pixels=DEFAULT_MAX_PIXELS).size == (3000, 2000)
    with pytest.raises(ImageError):
        load_rgb(np.zeros((3000, 2000, 3), np.uint8), max_pixels=1_000_000)
    with pytest.raises(ImageError):
        load_rgb(Image.new("RGB", (3000, 2000)), max_pixels=1_000_000)


def test_bad_configs_are_refused():
    from diki_edge_runtime.errors import RuntimeSetupError

    for cfg in ({"size": 32, "resize_mode": "crop"}, {"size": 32, "interpolation": "lanczos"},
                {"size": [1, 2, 3]}, {"mean": MEAN}, {"size": 32, "mode": "L"}):
        with pytest.raises(RuntimeSetupError):
            Preprocess.from_config(cfg)
