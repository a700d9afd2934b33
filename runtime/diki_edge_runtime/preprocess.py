"""The backbone's image transform in numpy + Pillow, driven by the model folder's ``preprocess.json``.

It reproduces open_clip's inference transform (``open_clip.image_transform_v2(PreprocessCfg(**cfg),
is_train=False)``) step for step on an RGB PIL image, without torch:

=============================  ===========================================================================
``resize_mode``                steps (as open_clip 3.x builds them)
=============================  ===========================================================================
``shortest``, square size      ``Resize(size)``: shortest edge to ``size``, long edge ``int(size*long/short)``
                               (torchvision's rule), then ``CenterCrop`` (zero-padding first if smaller)
``shortest``, non-square       ``ResizeKeepRatio(size)`` (always **bicubic** — open_clip passes no
                               interpolation there), then ``CenterCrop``
``longest``                    ``ResizeKeepRatio(size, longest=1)`` (configured interpolation), then
                               ``CenterCropOrPad(size, fill=fill_color)``
``squash``                     ``Resize((H, W))``
=============================  ===========================================================================

then ``ToTensor`` (``uint8 / 255`` in float32, CHW) and ``Normalize(mean, std)`` in float32. torchvision's
``Resize`` on a PIL image is ``PIL.Image.resize`` (Pillow always antialiases), and it is skipped when the size
already matches — both reproduced here, so the result equals open_clip's to float32 rounding (tests: <= 1e-6).

Memory: ``shortest`` scales the short edge *up* to the target, so a thin image (300000 x 1) would grow to
224 x 67,200,000 pixels before the crop. When the resized image would exceed :data:`RESIZE_PIXEL_BUDGET`, only
the part the center crop keeps is resampled (``Image.resize(..., box=...)``: the same filter, scale and pixel
centres, so the kept pixels equal those of the full resize up to float rounding, at most 2 of 255 levels) and
the rest is never materialised. Only images more than ~80 times longer than wide take this path.

``mean`` and ``std`` must be finite and ``std`` non-zero: a NaN there would make every image's pixels NaN.

``preprocess.json``: ``{"size": [H, W] | int, "mode": "RGB", "mean": [3 floats], "std": [3 floats],
"interpolation": "bicubic" | "bilinear", "resize_mode": "shortest" | "longest" | "squash", "fill_color": int}``.
Everything is checked when the model folder is opened: a size outside 1 .. :data:`MAX_IMAGE_SIDE` or a
``fill_color`` outside 0 .. 255 is a :class:`~diki_edge_runtime.errors.RuntimeSetupError` there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diki_edge_runtime.contract import read_json_file
from diki_edge_runtime.errors import RuntimeSetupError

# open_clip's OPENAI_DATASET_MEAN / _STD: the normalisation a preprocess config falls back to.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Largest image side a preprocessing config may ask for (CLIP backbones take 224-448; checked at open, so an absurd
# config is a setup error rather than a failure of every image).
MAX_IMAGE_SIDE = 8192
# Largest resized image (pixels) materialised before the center crop; larger ones resample the kept part only.
RESIZE_PIXEL_BUDGET = 4_000_000

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """An immutable, thread-safe image transform: ``__call__`` maps an RGB PIL image to a ``[3, H, W]`` array."""

    size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    mode: str = "RGB"

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "preprocess config") -> Preprocess:
        try:
            size = cfg["size"]
            if isinstance(size, (int, float)):
                hw = (int(size), int(size))
            elif isinstance(size, Sequence) and len(size) == 1:
                hw = (int(size[0]), int(size[0]))
            elif isinstance(size, Sequence) and len(size) == 2:
                hw = (int(size[0]), int(size[1]))
            else:
                raise ValueError(f"size must be an int or [H, W], got {size!r}")
            mean = _triple(cfg.get("mean", CLIP_MEAN), "mean")
            std = _triple(cfg.get("std", CLIP_STD), "std")
            interpolation = str(cfg.get("interpolation") or "bicubic")
            if interpolation == "random":  # open_clip: 'random' only matters for training; inference is bicubic
                interpolation = "bicubic"
            resize_mode = str(cfg.get("resize_mode") or "shortest")
            fill = cfg.get("fill_color", 0) or 0
            mode = str(cfg.get("mode", "RGB") or "RGB")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
            raise RuntimeSetupError(f"{source}: malformed preprocessing config: {exc}") from None
        if interpolation not in _RESAMPLE:
            raise RuntimeSetupError(f"{source}: interpolation {interpolation!r} is not one of {sorted(_RESAMPLE)}")
        if resize_mode not in _RESIZE_MODES:
            raise RuntimeSetupError(f"{source}: resize_mode {resize_mode!r} is not one of {list(_RESIZE_MODES)}")
        if mode != "RGB":
            raise RuntimeSetupError(f"{source}: only mode 'RGB' is supported, got {mode!r}")
        if min(hw) < 1 or max(hw) > MAX_IMAGE_SIDE:
            raise RuntimeSetupError(f"{source}: size must be within 1 .. {MAX_IMAGE_SIDE} pixels, got {list(hw)}")
        is_number = isinstance(fill, (int, float)) and not isinstance(fill, bool)
        if not (is_number and 0 <= fill <= 255 and fill == int(fill)):  # range first: int(inf) would raise
            raise RuntimeSetupError(f"{source}: fill_color must be a pixel value, an integer within 0 .. 255, "
                                    f"got {fill!r}")
        fill = int(fill)
        if not all(math.isfinite(v) for v in mean + std):
            raise RuntimeSetupError(f"{source}: mean and std must be finite numbers, got mean {list(mean)}, "
                                    f"std {list(std)}")
        if any(s == 0 for s in std):
            raise RuntimeSetupError(f"{source}: std must not contain zeros")
        return cls(hw, mean, std, interpolation, resize_mode, fill, mode)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Preprocess:
        path = Path(path)
        cfg = read_json_file(path, "preprocessing config")
        if not isinstance(cfg, dict):
            raise RuntimeSetupError(f"{path}: preprocessing config must be a JSON object")
        return cls.from_config(cfg, str(path))

    # ----------------------------------------------------------------- the transform
    @property
    def _resample(self) -> int:
        return _RESAMPLE[self.interpolation]

    def resized_hw(self, width: int, height: int) -> tuple[int, int]:
        """``(H, W)`` an image of ``width`` x ``height`` is resized to before the crop / pad (see the table)."""
        th, tw = self.size
        if self.resize_mode == "squash":
            return th, tw
        if self.resize_mode == "longest":
            return _keep_ratio_size((width, height), (th, tw), longest=1.0)
        if th == tw:
            return _shortest_edge_size((width, height), th)
        return _keep_ratio_size((width, height), (th, tw), longest=0.0)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """``(W, H)``: the smallest size, at the image's own aspect ratio, from which the resize to
        :meth:`resized_hw` still only shrinks, in either orientation (EXIF rotation is applied after decoding).
        JPEG decoding at a reduced DCT scale (``Image.draft``, the predictor's ``fast_decode``) asks for this."""
        scale = 0.0
        for w, h in ((width, height), (height, width)):
            rh, rw = self.resized_hw(w, h)
            scale = max(scale, rw / w, rh / h)
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))

    def geometry(self, image: Image.Image) -> np.ndarray:
        """Resize + crop/pad of an RGB (or gray ``L``) image: ``uint8 [H, W, 3]``, before ``ToTensor``/``Normalize``.

        An ``L`` image is resized as ``L`` and expanded to RGB afterwards: Pillow resamples every band alike, so
        this equals resizing its RGB conversion, at a quarter of the memory."""
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        th, tw = self.size
        hw = self.resized_hw(image.width, image.height)
        if self.resize_mode == "squash":
            return _rgb_pixels(_resize(image, hw, self._resample))
        # open_clip builds ResizeKeepRatio(image_size) for a non-square "shortest" size without passing the
        # interpolation: bicubic there
        keep_ratio_default = self.resize_mode == "shortest" and th != tw
        resample = Image.Resampling.BICUBIC if keep_ratio_default else self._resample
        if self.resize_mode == "shortest" and hw[0] * hw[1] > RESIZE_PIXEL_BUDGET:
            image = _resize_center_crop(image, hw, (th, tw), resample)  # a thin image: never upscaled in full
        else:
            image = _resize(image, hw, resample)
        fill = self.fill_color if self.resize_mode == "longest" else 0
        return _center_crop_or_pad(_rgb_pixels(image), (th, tw), fill)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """``float32 [3, H, W]``: the normalised pixels one image contributes to ``pixel_values``."""
        pixels = self.geometry(image)
        x = pixels.astype(np.float32) / np.float32(255.0)  # ToTensor
        x = np.ascontiguousarray(x.transpose(2, 0, 1))
        mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(3, 1, 1)
        return (x - mean) / std  # Normalize (sub_ then div_, float32)

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, 3, *self.size), np.float32)
        return np.stack([self(im) for im in images])


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = (values,) * 3
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values, got {len(vals)}")
    return vals  # type: ignore[return-value]


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def _resize(image: Image.Image, size_hw: tuple[int, int], resample: int) -> Image.Image:
    h, w = size_hw
    if (image.height, image.width) == (h, w):  # torchvision returns the input unchanged
        return image
    return image.resize((w, h), resample)


def _resize_center_crop(image: Image.Image, size_hw: tuple[int, int], crop_hw: tuple[int, int],
                        resample: int) -> Image.Image:
    """The part of ``image`` resized to ``size_hw`` that a center crop to ``crop_hw`` keeps, resampling only that
    part (an axis shorter than the crop is kept whole; :func:`_center_crop_or_pad` pads it afterwards).

    Pillow resizes in two passes, horizontal first, rounding to 8 bits in between; so does this, each pass with a
    source ``box`` (same filter, scale and pixel centres as the full resize): the kept pixels equal the full
    resize's up to float rounding in the filter weights (at most 2 of 255 levels, on a few % of the pixels:
    ``tests/runtime/test_hostile_images.py``). Only the source rows the vertical pass reads are resampled
    horizontally, so neither pass materialises the upscaled image.
    """
    (h, w), (crop_h, crop_w) = size_hw, crop_hw
    top, out_h = (int(round((h - crop_h) / 2.0)), crop_h) if h >= crop_h else (0, h)
    left, out_w = (int(round((w - crop_w) / 2.0)), crop_w) if w >= crop_w else (0, w)
    sx, sy = image.width / w, image.height / h
    y_in0, y_in1 = top * sy, min((top + out_h) * sy, image.height)
    # rows the vertical filter reads: its support (2 for bicubic, scaled up when downscaling) around the box
    margin = int(math.ceil(2.0 * max(sy, 1.0))) + 2
    y0, y1 = max(0, int(math.floor(y_in0)) - margin), min(image.height, int(math.ceil(y_in1)) + margin)
    strip = image.crop((0, y0, image.width, y1)) if (y0, y1) != (0, image.height) else image
    rows = strip.resize((out_w, strip.height), resample,
                        box=(left * sx, 0, min((left + out_w) * sx, image.width), strip.height))
    return rows.resize((out_w, out_h), resample, box=(0, y_in0 - y0, out_w, y_in1 - y0))


def _shortest_edge_size(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """torchvision ``_compute_resized_output_size`` for a single int: short edge -> size, long edge truncated."""
    w, h = image_size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def _keep_ratio_size(image_size: tuple[int, int], target_hw: tuple[int, int], longest: float) -> tuple[int, int]:
    """open_clip/timm ``ResizeKeepRatio.get_params`` without the (training-only) random factors."""
    w, h = image_size
    target_h, target_w = target_hw
    ratio_h, ratio_w = h / target_h, w / target_w
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h * 1.0 / ratio), round(w * 1.0 / ratio)


def _center_crop_or_pad(pixels: np.ndarray, size_hw: tuple[int, int], fill: int) -> np.ndarray:
    """torchvision ``center_crop`` / open_clip ``center_crop_or_pad`` on ``[H, W, 3] uint8``."""
    crop_h, crop_w = size_hw
    h, w = pixels.shape[:2]
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), constant_values=np.uint8(fill))
        h, w = pixels.shape[:2]
        if (h, w) == (crop_h, crop_w):
            return pixels
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return pixels[top:top + crop_h, left:left + crop_w]
