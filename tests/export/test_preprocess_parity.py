"""Runtime preprocessing (numpy/Pillow, ``diki_edge_runtime.preprocess``) against open_clip's own transform on real
photographs, every resize mode, image mode and file format.

It lives with the exporter's tests because it needs open_clip (torch); the exporter writes the
``preprocess.json`` the runtime reads. The runtime's own, torch-free preprocessing tests are in
tests/runtime/test_preprocess.py (including the golden folder's images against open_clip's stored output).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from skimage import data as skdata

from diki_edge_runtime.images import load_rgb
from diki_edge_runtime.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

MEAN, STD = list(CLIP_MEAN), list(CLIP_STD)

CONFIGS = [
    {"size": 224, "interpolation": "bicubic", "resize_mode": "shortest"},
    {"size": [32, 32], "interpolation": "bicubic", "resize_mode": "shortest"},
    {"size": [48, 64], "interpolation": "bilinear", "resize_mode": "shortest"},  # non-square: ResizeKeepRatio
    {"size": [224, 224], "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 0},
    {"size": [40, 56], "interpolation": "bicubic", "resize_mode": "longest", "fill_color": 128},
    {"size": [64, 48], "interpolation": "bicubic", "resize_mode": "squash"},
]


def _real_images() -> dict[str, Image.Image]:
    astro = Image.fromarray(skdata.astronaut())  # 512x512 RGB
    chelsea = Image.fromarray(skdata.chelsea())  # 451x300 RGB, landscape
    coffee = Image.fromarray(skdata.coffee())  # 600x400
    camera = Image.fromarray(skdata.camera())  # 512x512 L
    rocket = Image.fromarray(skdata.rocket())  # 427x640 portrait
    return {
        "astronaut": astro,
        "chelsea": chelsea,
        "coffee_tall_crop": coffee.crop((100, 0, 260, 400)),  # 160x400, very tall
        "rocket": rocket,
        "camera_gray": camera,
        "chelsea_small": chelsea.resize((21, 13), Image.Resampling.BICUBIC),  # smaller than the target: upscale
        "astro_tiny": astro.resize((7, 31), Image.Resampling.BILINEAR),
        "coffee_odd": coffee.resize((333, 217), Image.Resampling.LANCZOS),
        "exact_size": astro.resize((32, 32)),  # torchvision skips resize when sizes match
    }


def _mode_variants(img: Image.Image) -> dict[str, Image.Image]:
    rgba = img.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(img.size)
    rgba.putalpha(alpha)
    return {
        "rgb": img.convert("RGB"),
        "gray": img.convert("L"),
        "rgba": rgba,
        "palette": img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "cmyk": img.convert("CMYK"),
    }


def _open_clip_transform(cfg: dict):
    full = {"mean": MEAN, "std": STD, **cfg}
    return image_transform_v2(PreprocessCfg(**full), is_train=False)


def _training_rgb(im: Image.Image) -> Image.Image:
    """What training feeds open_clip (diki_edge.data.open_rgb), for an already-open image."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if "A" in im.getbands() or im.mode == "P" else im.convert("RGB")
    return im


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['resize_mode']}-{c['size']}-{c['interpolation']}")
def test_matches_open_clip_on_real_images(cfg):
    ours = Preprocess.from_config({"mean": MEAN, "std": STD, **cfg})
    theirs = _open_clip_transform(cfg)
    worst = 0.0
    for name, img in _real_images().items():
        for mode, variant in _mode_variants(img).items():
            expected = theirs(_training_rgb(variant)).numpy()
            got = ours(load_rgb(variant))
            assert got.shape == expected.shape, (name, mode)
            assert got.dtype == np.float32
            err = float(np.abs(got - expected).max())
            worst = max(worst, err)
            assert err <= 1e-6, (name, mode, err)
    assert worst <= 1e-6


def test_rgb_and_gray_equal_open_clip_without_conversion():
    """For RGB and L inputs open_clip's own order (resize, then convert) gives the same pixels as ours."""
    cfg = CONFIGS[0]
    ours = Preprocess.from_config({"mean": MEAN, "std": STD, **cfg})
    theirs = _open_clip_transform(cfg)
    for img in (Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.camera())):
        assert np.abs(ours(load_rgb(img)) - theirs(img).numpy()).max() <= 1e-6


def _jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_oriented_files_match_open_clip_on_the_transposed_image(tmp_path, orientation):
    img = Image.fromarray(skdata.chelsea())  # landscape: a 90 degree turn changes the aspect ratio
    path = tmp_path / f"rot{orientation}.jpg"
    path.write_bytes(_jpeg_with_orientation(img, orientation))
    rgb = load_rgb(path)
    with Image.open(path) as raw:
        if orientation in (6, 8):
            assert rgb.size == (raw.height, raw.width)
    for cfg in (CONFIGS[0], CONFIGS[2], CONFIGS[3]):
        ours = Preprocess.from_config({"mean": MEAN, "std": STD, **cfg})
        with Image.open(path) as raw:
            expected = _open_clip_transform(cfg)(_training_rgb(raw)).numpy()
        assert np.abs(ours(load_rgb(path)) - expected).max() <= 1e-6


def test_files_of_several_formats_match_open_clip(tmp_path):
    img = Image.fromarray(skdata.coffee())
    cfg = CONFIGS[0]
    ours = Preprocess.from_config({"mean": MEAN, "std": STD, **cfg})
    theirs = _open_clip_transform(cfg)
    files = {
        "a.png": lambda p: img.save(p),
        "b.jpg": lambda p: img.save(p, quality=85),
        "c_gray.png": lambda p: img.convert("L").save(p),
        "d_palette.gif": lambda p: img.convert("P", palette=Image.Palette.ADAPTIVE).save(p),
        "e_rgba.png": lambda p: _mode_variants(img)["rgba"].save(p),
        "f_cmyk.jpg": lambda p: img.convert("CMYK").save(p),
        "g.webp": lambda p: img.save(p, lossless=True),
        "h.bmp": lambda p: img.save(p),
        "i.tiff": lambda p: img.save(p),
    }
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        with Image.open(path) as raw:
            expected = theirs(_training_rgb(raw)).numpy()
        assert np.abs(ours(load_rgb(path)) - expected).max() <= 1e-6, name
