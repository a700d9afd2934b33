"""Decoding runtime inputs (file paths, PIL images, numpy arrays) into 8-bit RGB PIL images.

Every input goes through the same steps, which are also what training applies to its images
(``diki_edge.data.open_rgb``), so that the runtime sees exactly what the backbone was fitted on:

1. decode (paths only): ``Image.open`` reads the header, the pixel count is checked against ``max_pixels``
   *before* any pixel is decoded (decompression bombs), then the pixels are decoded in full (a truncated file is
   an error, never silently padded) — or, for JPEG files when asked (``draft``: the predictor's ``fast_decode``),
   at a reduced DCT scale that still leaves the resize only shrinking;
2. EXIF orientation is applied (``ImageOps.exif_transpose``) — open_clip's transform does not do this itself;
3. conversion to 8-bit RGB:

   ==========================  =====================================================================
   mode                        conversion
   ==========================  =====================================================================
   ``RGB``                     unchanged
   ``L``, ``1``, ``CMYK``,     ``Image.convert("RGB")`` (CMYK by Pillow's conversion)
   ``YCbCr``, ``LAB``, ``HSV``
   ``RGBA``, ``LA``, ``PA``,   through ``RGBA``, alpha dropped (the colour channels are kept as stored, as
   ``P`` (palette), ``RGBa``   ``convert("RGB")`` does; a palette is expanded before any resampling)
   ``I;16*`` (16-bit)          scaled to 8 bits: ``round(v / 257)`` (Pillow's own conversion would clip
                               every value above 255 to white)
   ``I`` (32-bit int)          as 16-bit when any value exceeds 255, else taken as 8-bit values
   ``F`` (float)               ``[0, 1]`` scaled by 255, otherwise clipped to ``[0, 255]``
   ==========================  =====================================================================

numpy inputs are ``HWC`` (or ``HW``) arrays: ``uint8`` (1, 3 or 4 channels: gray, RGB, RGBA) or ``uint16``
(scaled as above). Anything else is refused with a clear message.

Failures raise :class:`ImageError`, whose ``kind`` is one of :data:`ERROR_KINDS`; the predictor records it for that
image and carries on with the others.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diki_edge_runtime.errors import DikiEdgeError

# 50 megapixels: far above any photo a CLIP model needs (it resizes to ~224 px), below Pillow's own warning
# threshold (~89.5 MP). Larger files are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 50_000_000

ERROR_KINDS = (
    "not_found",  # the path does not exist (or a pattern matched nothing)
    "unreadable",  # the path exists but cannot be read (a directory, permissions, I/O error)
    "empty",  # a zero-byte file
    "not_an_image",  # the bytes are not an image format Pillow knows
    "truncated",  # the header is fine but the pixel data ends early or is corrupt
    "too_large",  # more pixels than the limit (decompression bomb guard)
    "unsupported",  # an image mode, array dtype or shape that has no sensible RGB conversion
    "inference",  # the graph failed on this image
)

_EXIF_ORIENTATION = 0x0112

ImageInput = str | os.PathLike | Image.Image | np.ndarray
# (stored width, stored height) -> the smallest (width, height) a reduced-scale JPEG decode may return
DraftSize = Callable[[int, int], tuple[int, int]]

# File suffixes taken as images when a folder is scanned (predict's directory inputs, training's class folders).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                            ".pbm", ".jfif"})


class ImageError(DikiEdgeError):
    """One input could not be turned into an image; ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def describe_input(item: Any, index: int) -> str:
    """A short, stable label for an input: the path as given, or ``<PIL RGB 640x480 #3>`` / ``<array ... #3>``."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, Image.Image):
        return f"<PIL {item.mode} {item.width}x{item.height} #{index}>"
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype} {'x'.join(map(str, item.shape))} #{index}>"
    return f"<{type(item).__name__} #{index}>"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def _check_pixels(width: int, height: int, max_pixels: int | None, label: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError("unsupported", f"{label}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError("too_large", f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of "
                                      f"{max_pixels} pixels (decompression-bomb guard; raise max_pixels to allow)")


def open_path(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
              draft: DraftSize | None = None) -> Image.Image:
    """Decode one file fully (checked against ``max_pixels`` first); returns the image in its own mode.

    ``draft``: for JPEG files, decode at the smallest reduced DCT scale (1/2, 1/4, 1/8) whose size is at least
    ``draft(width, height)`` (Pillow's draft mode): several times faster on large photos, slightly different pixels.
    """
    p = Path(path)
    label = os.fspath(path)
    if not p.exists():
        if p.is_symlink():
            try:
                os.stat(p)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ImageError("unreadable", f"{label}: symlink loop") from None
            raise ImageError("not_found", f"{label}: file not found (dangling symlink to {os.readlink(p)})")
        raise ImageError("not_found", f"{label}: file not found")
    if not p.is_file():
        what = "a directory" if p.is_dir() else "a device, FIFO or socket"
        raise ImageError("unreadable", f"{label}: not a regular file ({what})")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ImageError("unreadable", f"{label}: cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageError("empty", f"{label}: empty file (0 bytes)")
    try:
        im = Image.open(p)  # header only; Pillow itself refuses > 2 x Image.MAX_IMAGE_PIXELS here
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"{label}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"{label}: not an image (unknown or corrupt format)") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error (permissions, I/O)
            raise ImageError("unreadable", f"{label}: cannot read: {exc.strerror or exc}") from None
        raise ImageError("not_an_image", f"{label}: corrupt image header ({_short(exc)})") from None
    except Exception as exc:  # Pillow's format plugins raise ValueError, SyntaxError, struct.error, ... on bad headers
        raise ImageError("not_an_image", f"{label}: corrupt image header ({_short(exc)})") from None
    try:
        _check_pixels(im.width, im.height, max_pixels, label)
        if draft is not None and im.format == "JPEG":
            im.draft(im.mode, draft(im.width, im.height))
        try:
            im.load()
        except ImageError:
            raise
        except Exception as exc:  # any decoder failure is this file's problem, whatever type the plugin raises
            raise ImageError("truncated", f"{label}: image data is truncated or corrupt ({_short(exc)})") from None
        return im
    except BaseException:
        im.close()
        raise


def _to_rgb_pil(im: Image.Image, label: str, keep_gray: bool = False) -> Image.Image:
    """8-bit RGB (see the module docstring); with ``keep_gray`` a single-channel result stays ``L`` instead."""
    mode = im.mode
    if mode == "RGB" or (keep_gray and mode == "L"):
        return im
    if mode.startswith("I;16") or mode == "I":
        _, high = im.getextrema()
        if mode == "I" and high <= 255:
            return _gray(_chunked_to_gray(im, lambda a: np.clip(a, 0, 255)), keep_gray)
        # round(v / 257) == floor((v + 128) / 257) for every integer v (no ties): exact in integers
        return _gray(_chunked_to_gray(im, lambda a: np.clip((a.astype(np.int64) + 128) // 257, 0, 255)), keep_gray)
    if mode == "F":
        low, high = im.getextrema()
        scale = 255.0 if 0.0 <= low and high <= 1.0 else 1.0

        def float_band(a: np.ndarray) -> np.ndarray:
            a = a.astype(np.float64)
            if not np.isfinite(a).all():  # getextrema does not see NaN
                raise ImageError("unsupported", f"{label}: float image holds NaN or infinite values")
            return np.clip(np.rint(a * scale), 0, 255)

        return _gray(_chunked_to_gray(im, float_band), keep_gray)
    if mode in ("P", "PA", "RGBA", "LA", "RGBa", "La") or "A" in im.getbands():
        return im.convert("RGBA").convert("RGB")
    try:
        return im.convert("RGB")
    except Exception as exc:
        raise ImageError("unsupported", f"{label}: cannot convert image mode {mode!r} to RGB ({_short(exc)})") from None


def _gray(im: Image.Image, keep: bool) -> Image.Image:
    return im if keep else im.convert("RGB")


# Rows of a wide-integer or float image converted at a time, so that no full-size float64 copy is ever made.
_CONVERT_CHUNK_PIXELS = 1 << 20


def _chunked_to_gray(im: Image.Image, to_uint8) -> Image.Image:
    """An ``L`` image from a single-channel ``I``/``I;16``/``F`` image, ``to_uint8`` applied a band of rows at a
    time (peak memory: the output plus one band, instead of several float64 copies of the whole image)."""
    w, h = im.size
    out = np.empty((h, w), np.uint8)
    rows = max(1, _CONVERT_CHUNK_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        band = np.asarray(im.crop((0, y, w, min(h, y + rows))))
        out[y:y + band.shape[0]] = to_uint8(band)
    return Image.fromarray(out, "L")


def _array_to_pil(arr: np.ndarray, label: str) -> Image.Image:
    a = arr
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError("unsupported", f"{label}: expected an HWC array with 1, 3 or 4 channels (or HW), "
                                        f"got shape {list(arr.shape)}")
    if a.dtype == np.uint16:  # round(v / 257) in integers, as for 16-bit files (_to_rgb_pil)
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError("unsupported", f"{label}: array dtype {a.dtype} is not supported (use uint8, or uint16)")
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return Image.fromarray(a, "L")
    return Image.fromarray(a, "RGB" if a.shape[2] == 3 else "RGBA")


def load_rgb(item: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, index: int = 0,
             draft: DraftSize | None = None, *, keep_gray: bool = False) -> Image.Image:
    """Any supported input -> 8-bit RGB PIL image, EXIF orientation applied. Raises :class:`ImageError`.

    ``draft``: reduced-scale JPEG decoding of files (see :func:`open_path`). ``keep_gray``: a gray image stays
    ``L`` (its RGB would be the same plane three times; ``Preprocess`` resizes it as ``L`` and expands it after,
    with identical results) — a quarter of the memory for large gray or 16-bit images; the predictor asks for it.
    """
    label = describe_input(item, index)
    if isinstance(item, (str, os.PathLike)):
        im = open_path(item, max_pixels, draft)
        try:
            return to_rgb(im, label, keep_gray=keep_gray)
        finally:
            im.close()
    if isinstance(item, Image.Image):
        _check_pixels(item.width, item.height, max_pixels, label)
        try:
            item.load()
        except Exception as exc:
            raise ImageError("truncated", f"{label}: image data is truncated or corrupt ({_short(exc)})") from None
        return to_rgb(item, label, keep_gray=keep_gray)
    if isinstance(item, np.ndarray):
        if item.ndim >= 2:
            _check_pixels(int(item.shape[1]), int(item.shape[0]), max_pixels, label)
        return _to_rgb_pil(_array_to_pil(item, label), label, keep_gray)
    raise ImageError("unsupported", f"{label}: unsupported input type {type(item).__name__} "
                                    "(give a path, a PIL image or a numpy HWC uint8 array)")


def to_rgb(im: Image.Image, label: str = "image", *, keep_gray: bool = False) -> Image.Image:
    """EXIF orientation, then 8-bit RGB (see the module docstring; ``keep_gray`` as in :func:`load_rgb`). The
    result never aliases a lazily-read file."""
    try:
        # exif_transpose copies the whole image even when there is nothing to turn: ask first
        turned = im.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
        oriented = ImageOps.exif_transpose(im) if turned else im
    except Exception:  # a malformed EXIF block must not cost the image: keep the stored orientation
        oriented = im
    rgb = _to_rgb_pil(oriented if oriented is not None else im, label, keep_gray)
    return rgb.copy() if rgb is im else rgb
