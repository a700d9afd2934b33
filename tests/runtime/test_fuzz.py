"""Property-based tests (hypothesis) of everything that reads untrusted input: the bank loader, the image path and
the predict command's options. Properties: no exception other than the documented user error, no hang (every
call under a time bound), no NaN in what is returned, every error names its input.

The corpus is reproducible: ``derandomize=True`` makes hypothesis draw the same examples on every run (no example
database, no time-dependent seed); ``pytest --hypothesis-seed=N`` is ignored by derandomized tests, so CI and a
developer's machine run exactly the same inputs. Example counts keep the file's runtime near a minute on 2 cores.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hostile import BANK, IMAGES, MODEL, golden_bank, strict_json
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.errors import BankError
from diki_edge_runtime.images import ImageError, describe_input, load_rgb
from diki_edge_runtime.preprocess import Preprocess

SECONDS_PER_CALL = 10.0


def fuzz_settings(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@contextmanager
def time_bound(seconds: float = SECONDS_PER_CALL):
    """Fail (instead of hanging) when the body runs longer than ``seconds`` (SIGALRM: main thread, POSIX)."""
    def expired(signum, frame):
        raise TimeoutError(f"call took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------- bank loader
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)

DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "U8", "I8", "BOOL", "F8_E4M3", "C64", "XYZ", 7]
ARRAY_NAMES = ["bank_k", "bank_v", "gauss_mean", "gauss_whiten", "gauss_const", "class_embeds", "class_task",
               "stats_count", "stats_sum", "stats_outer", "text_k", "text_v", "other"]


@st.composite
def raw_safetensors(draw) -> bytes:
    """Arbitrary header lengths, JSON headers with random dtypes, shapes and offsets, and random data."""
    kind = draw(st.sampled_from(["random", "header", "json"]))
    if kind == "random":
        length = draw(st.integers(0, 2 ** 64 - 1))
        return struct.pack("<Q", length) + draw(st.binary(max_size=64))
    data = draw(st.binary(max_size=256))
    if kind == "json":
        header = json.dumps(draw(json_values)).encode()
    else:
        entries = {}
        for name in draw(st.lists(st.sampled_from(ARRAY_NAMES), max_size=5, unique=True)):
            start = draw(st.integers(-4, len(data) + 8))
            entries[name] = {"dtype": draw(st.sampled_from(DTYPES)),
                             "shape": draw(st.lists(st.integers(-2, 6), max_size=4)),
                             "data_offsets": [start, draw(st.integers(-4, len(data) + 8))]}
        meta = draw(st.one_of(st.none(), json_values.map(lambda v: json.dumps(v)), st.text(max_size=20), json_values))
        if meta is not None:
            entries["__metadata__"] = {"diki_edge": meta}
        header = json.dumps(entries).encode()
    length = draw(st.one_of(st.just(len(header)), st.integers(0, len(header) + 16)))
    return struct.pack("<Q", length) + header + data


def _golden_with(meta_edit) -> tuple[dict[str, np.ndarray], str]:
    arrays, meta = golden_bank()
    return arrays, meta_edit(meta)


@st.composite
def mutated_metadata(draw) -> str:
    """The golden bank's metadata with one value replaced by an arbitrary JSON value (or removed)."""
    _, meta = golden_bank()
    paths = [("format_version",), ("layout",), ("tasks",)]
    paths += [("layout", k) for k in meta["layout"]] + [("layout", "backbone", "weights_sha256")]
    paths += [("tasks", i, k) for i in range(len(meta["tasks"])) for k in meta["tasks"][i]]
    paths += [("tasks", 0, "classes", 0), ("layout", "calibration_levels", 3)]
    path = draw(st.sampled_from(paths))
    node = meta
    for key in path[:-1]:
        node = node[key]
    if draw(st.booleans()) and isinstance(node, dict):
        node.pop(path[-1])
    else:
        node[path[-1]] = draw(json_values)
    return json.dumps(meta)


def _assert_loads_or_names_the_file(path: Path) -> None:
    for graph_only in (False, True):
        try:
            with time_bound():
                bank = TaskBank.load(path, graph_only=graph_only)
        except BankError as exc:
            event(f"refused: {type(exc).__name__}")
            message = str(exc)
            assert message.startswith(f"{path}:") and "\n" not in message, message
            continue
        for name, arr in bank.arrays.items():
            assert not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all(), name


@fuzz_settings(300)
@given(blob=raw_safetensors())
def test_fuzz_bank_loader_on_arbitrary_files(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    _assert_loads_or_names_the_file(path)


@fuzz_settings(200)
@given(meta=mutated_metadata())
def test_fuzz_bank_loader_on_mutated_metadata(tmp_path, meta):
    from safetensors.numpy import save_file

    arrays, _ = golden_bank()
    path = tmp_path / "meta.safetensors"
    save_file(arrays, str(path), metadata={"diki_edge": meta})
    _assert_loads_or_names_the_file(path)


@fuzz_settings(60)
@given(name=st.sampled_from(["bank_k", "gauss_mean", "gauss_whiten", "gauss_const", "class_embeds", "class_task",
                             "stats_outer"]),
       dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8]),
       shape=st.lists(st.integers(0, 4), max_size=4), value=st.sampled_from([0.0, np.nan, np.inf, 1e30, -1.0]))
def test_fuzz_bank_loader_on_wrong_arrays(tmp_path, name, dtype, shape, value):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    arrays, _ = golden_bank()
    with safe_open(str(BANK), framework="numpy") as fh:
        meta = fh.metadata()
    with np.errstate(invalid="ignore", over="ignore"):
        arrays[name] = np.full(shape, value).astype(dtype)
    path = tmp_path / "arrays.safetensors"
    save_file(arrays, str(path), metadata=meta)
    _assert_loads_or_names_the_file(path)


# ---------------------------------------------------------------------------------------------- images
MAGIC = {
    "png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff\xe0", "gif": b"GIF89a", "bmp": b"BM", "tiff-le": b"II*\x00",
    "tiff-be": b"MM\x00*", "webp": b"RIFF\x00\x00\x00\x00WEBP", "ppm": b"P6\n", "ico": b"\x00\x00\x01\x00",
}
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "LA", "YCbCr", "HSV", "LAB", "PA"]
FORMATS = {"png": "PNG", "tiff": "TIFF", "bmp": "BMP", "gif": "GIF", "jpeg": "JPEG", "webp": "WEBP", "ppm": "PPM"}
TRANSFORM = Preprocess.from_config({"size": 32})


def _assert_image_path(item, label: str) -> None:
    try:
        with time_bound():
            pixels = TRANSFORM(load_rgb(item, max_pixels=2_000_000, keep_gray=True))
    except ImageError as exc:
        event(f"refused: {exc.kind}")
        assert exc.message.startswith(label) and exc.kind, exc.message
        return
    event("decoded")
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32 and np.isfinite(pixels).all()


@fuzz_settings(300)
@given(magic=st.sampled_from(sorted(MAGIC)), tail=st.binary(max_size=2048))
def test_fuzz_image_files_with_valid_magic_numbers(tmp_path, magic, tail):
    path = tmp_path / f"fuzz.{magic}"
    path.write_bytes(MAGIC[magic] + tail)
    _assert_image_path(path, str(path))


@st.composite
def encoded_images(draw) -> tuple[bytes, str]:
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    thin = draw(st.sampled_from([None, "wide", "tall"]))  # one side long, the other 1 or 2 pixels
    if thin:
        long, short = draw(st.integers(500, 4000)), draw(st.integers(1, 2))
        width, height = (long, short) if thin == "wide" else (short, long)
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(raw, "RGBA")
    try:
        image = image.convert(mode)
    except ValueError:
        image = image.convert("RGB")
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    buffer = io.BytesIO()
    try:
        image.save(buffer, FORMATS[fmt])
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: store it as TIFF
        fmt = "tiff"
        buffer = io.BytesIO()
        try:
            image.save(buffer, "TIFF")
        except (OSError, ValueError):
            image.convert("RGB").save(buffer, "TIFF")
    data = buffer.getvalue()
    cut = draw(st.one_of(st.just(len(data)), st.integers(0, len(data))))
    flips = draw(st.lists(st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(0, 255)), max_size=3))
    blob = bytearray(data[:cut])
    for pos, value in flips:
        if pos < len(blob):
            blob[pos] = value
    return bytes(blob), fmt


@fuzz_settings(300)
@given(encoded=encoded_images())
def test_fuzz_encoded_images_of_random_sizes_modes_and_damage(tmp_path, encoded):
    blob, fmt = encoded
    path = tmp_path / f"image.{fmt}"
    path.write_bytes(blob)
    _assert_image_path(path, str(path))


@fuzz_settings(80)
@given(dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.int64, np.bool_, np.float16]),
       shape=st.lists(st.integers(0, 6), min_size=0, max_size=4), index=st.integers(0, 9))
def test_fuzz_numpy_inputs(dtype, shape, index):
    array = (np.arange(int(np.prod(shape)) if shape else 1) % 251).astype(dtype).reshape(shape or ())
    try:
        with time_bound():
            pixels = TRANSFORM(load_rgb(array, index=index, keep_gray=True))
    except ImageError as exc:
        assert exc.message.startswith(describe_input(array, index)), exc.message
        return
    assert np.isfinite(pixels).all()


# ---------------------------------------------------------------------------------------------- predict options
@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    (root / "photo.png").write_bytes((IMAGES / "chelsea_0.png").read_bytes())
    (root / "empty.png").write_bytes(b"")
    (root / "folder").mkdir()
    (root / "folder" / "noise.png").write_bytes((IMAGES / "noise.png").read_bytes())
    (root / "bankdir").mkdir()
    return root


OPTION_VALUES = {
    "--top-k": st.integers(-2, 40).map(str) | st.sampled_from(["1e9", "x", "999999999999"]),
    "--batch-size": st.integers(-1, 12).map(str) | st.sampled_from(["1000000", "0", "nan"]),
    "--threads": st.integers(-1, 10).map(str) | st.sampled_from(["100000", "99999999999", "2.5"]),
    "--provider": st.sampled_from(["cpu", "CPU", "cuda", "tpu", "", "cpu;rm"]),
}


@st.composite
def predict_arguments(draw, root: Path) -> list[str]:
    names = draw(st.lists(st.sampled_from(["photo.png", "empty.png", "folder", "missing.png", "*.png", "folder/*.jpg",
                                           "bankdir"]), min_size=0, max_size=4))
    args = [str(root / n) for n in names] + ["--model", str(MODEL)]
    for option, values in OPTION_VALUES.items():
        if draw(st.booleans()):
            args += [option, draw(values)]
    bank = draw(st.sampled_from([None, str(BANK), str(root / "bankdir"), "/dev/zero", str(root / "nope.st")]))
    if bank:
        args += ["--bank", bank]
    for flag in ("--json", "--quiet", "--verbose"):
        if draw(st.booleans()):
            args.append(flag)
    return args


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_predict_options(inputs_dir, data):
    from support import cli_in_process  # tests/support.py: through cli.main, the one place that prints errors

    args = data.draw(predict_arguments(inputs_dir))
    start = time.perf_counter()
    with time_bound(30):
        result = cli_in_process("predict", *args)
    assert time.perf_counter() - start < 30
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    event(f"exit {result.exit_code}")
    if "--json" in args and result.exit_code in (0, 1):
        rows = [strict_json(line) for line in result.stdout.splitlines()]
        assert rows, args
        for row in rows:
            assert row["ok"] == (row["error"] is None)
            if not row["ok"]:
                assert row["error"]["message"].startswith(row["input"]), row
    if result.exit_code == 2:
        assert result.stderr.strip(), args
