"""Training data: an image-folder layout (one sub-folder per class), its class names and decoding (streamed by
:mod:`diki_edge.loader`; :func:`load_tensors` reads a small folder into memory).

``root/<class folder>/<image>``: the folder name gives the class name used in the prompt (underscores become
spaces), unless ``root/classes.txt`` maps them — one line per class, either ``folder: class name`` or just the
class names in the sorted order of the folders. A file that cannot be decoded is skipped with a warning; it
never stops the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from diki_edge.errors import DataError, DataUsageError
from diki_edge_runtime.images import IMAGE_SUFFIXES


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]  # names that go into the prompt, index = label
    samples: list[tuple[Path, int]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def _class_names(root: Path, folders: list[str]) -> list[str]:
    """The class names of ``folders``, checked as the bank stores them (non-empty, no control characters, each once)
    before any image is read: a bank with a bad name could not be read back."""
    from diki_edge_runtime.labels import check_class_names

    names = _named_classes(root, folders)
    try:
        check_class_names(names)
    except ValueError as exc:
        source = root / "classes.txt" if (root / "classes.txt").is_file() else root
        raise DataError(f"{source}: {exc}") from None
    return names


def _named_classes(root: Path, folders: list[str]) -> list[str]:
    mapping_file = root / "classes.txt"
    if not mapping_file.is_file():
        return [f.replace("_", " ") for f in folders]
    try:
        text = mapping_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{mapping_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if all(":" in ln for ln in lines):
        mapping = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise DataError(f"{mapping_file}: no class name for folders {missing}")
        return [mapping[f] for f in folders]
    if len(lines) != len(folders):
        raise DataError(f"{mapping_file}: {len(lines)} class names for {len(folders)} class folders")
    return lines


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _class_folders(root: Path) -> list[str]:
    """The class sub-folders of ``root``. A symbolic link among them must stay inside the data folder: one to ``/``
    (or a loop) would otherwise walk the whole disk, and images from elsewhere would silently join the task."""
    real_root = root.resolve()
    folders = []
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            try:
                target = entry.resolve(strict=True)
            except (OSError, RuntimeError) as exc:  # a loop or a dangling link
                raise DataError(f"{entry}: class folder is a symbolic link that cannot be followed "
                                f"({type(exc).__name__}: {exc})") from None
            if target.is_dir() and not _is_within(target, real_root):
                raise DataError(f"{entry}: class folder is a symbolic link to {target}, outside the data folder "
                                f"{root}; copy or move those images into the data folder")
        if entry.is_dir():
            folders.append(entry.name)
    return sorted(folders)


def _class_images(root: Path, folder: Path) -> list[Path]:
    """The image files below ``folder``; linked sub-folders are followed only inside the data folder, each real
    folder once (a link loop ends)."""
    real_root, seen, found = root.resolve(), set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen or not _is_within(real, real_root):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        found.extend(Path(dirpath) / n for n in filenames if Path(n).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in found if p.is_file())


def scan_image_folder(root: str | Path) -> ImageFolder:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataUsageError(f"{root}: is a file, not a folder (the data folder holds one sub-folder per class)")
    if not root.is_dir():
        raise DataUsageError(f"{root}: data folder not found")
    folders = _class_folders(root)
    if len(folders) < 2:
        raise DataError(f"{root}: expected one sub-folder per class (at least 2), found {len(folders)}")
    classes = _class_names(root, folders)
    samples = []
    for label, folder in enumerate(folders):
        files = _class_images(root, root / folder)
        if not files:
            raise DataError(f"{root / folder}: class folder has no images")
        samples.extend((p, label) for p in files)
    return ImageFolder(root, classes, samples)


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB with its EXIF orientation applied — the runtime's own conversion, so
    training and inference see identical pixels."""
    from diki_edge_runtime.images import to_rgb

    with Image.open(path) as im:
        return to_rgb(im, str(path))


def load_tensors(folder: ImageFolder, transform: Callable[[Image.Image], torch.Tensor],
                 on_image: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and transform every sample into memory (a bad file is skipped and recorded). For small sets only:
    training streams folders through :mod:`diki_edge.loader`; this is the in-memory reference it is tested and
    benchmarked against."""
    images, labels = [], []
    for path, label in folder.samples:
        try:
            images.append(transform(open_rgb(path)))
            labels.append(label)
        except Exception as exc:  # one bad image never stops the others
            folder.skipped.append((path, f"{type(exc).__name__}: {exc}"))
        if on_image:
            on_image()
    if len(images) < 2:
        raise DataError(f"{folder.root}: fewer than 2 readable images")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

