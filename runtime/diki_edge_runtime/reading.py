"""Reading the small files the runtime is given: a model folder's metadata and the command line's option files.

Two rules, for ``manifest.json``, ``preprocess.json``, ``tokenizer.json``, ``--labels-file`` and
``--provider-options``:

* **Regular files only, read with a size cap.** A path that is a folder, a FIFO, a device (``/dev/zero``) or a
  socket is refused before it is opened, so nothing hangs on a FIFO or reads an endless device; a file larger than
  its cap is refused before it is read (the caps are far above what the exporter writes: see
  :data:`METADATA_MAX_BYTES`, :data:`TEXT_TABLE_MAX_BYTES`).
* **File names from a manifest stay in the model folder** (:func:`folder_file`): a name is a relative path without
  ``..``, and the file it names, symlinks followed, lies inside the folder.

Problems raise :class:`~diki_edge_runtime.errors.RuntimeSetupError` naming the path and what it should have been.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from diki_edge_runtime.errors import RuntimeSetupError

# JSON metadata (manifest, preprocess.json, provider options): the exporter writes a few KB.
METADATA_MAX_BYTES = 16 * 2**20
# Tables of text (tokenizer.json, a labels file): CLIP's tokenizer.json is ~1.7 MB, 100k labels ~3 MB.
TEXT_TABLE_MAX_BYTES = 256 * 2**20


def read_limited_bytes(path: str | os.PathLike, what: str, max_bytes: int, missing_hint: str = "") -> bytes:
    """The bytes of the regular file ``path`` (``what`` names it in errors), at most ``max_bytes`` of them."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RuntimeSetupError(f"{path}: {what} not found{missing_hint}") from None
    except OSError as exc:
        raise RuntimeSetupError(f"{path}: cannot read the {what}: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise RuntimeSetupError(f"{path}: the {what} must be a regular file; this is {kind}")
    if info.st_size > max_bytes:
        raise RuntimeSetupError(f"{path}: the {what} is {info.st_size:,} bytes, more than the {max_bytes:,} a "
                                f"{what} may have")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise RuntimeSetupError(f"{path}: the {what} must be a regular file")
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise RuntimeSetupError(f"{path}: cannot read the {what}: {exc}") from None
    if len(data) > max_bytes:  # grew since the stat
        raise RuntimeSetupError(f"{path}: the {what} is more than the {max_bytes:,} bytes a {what} may have")
    return data


def read_limited_text(path: str | os.PathLike, what: str, max_bytes: int = METADATA_MAX_BYTES,
                      missing_hint: str = "", encoding: str = "utf-8") -> str:
    """:func:`read_limited_bytes` decoded; undecodable bytes are a :class:`RuntimeSetupError` naming the file."""
    data = read_limited_bytes(path, what, max_bytes, missing_hint)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise RuntimeSetupError(f"{path}: cannot read the {what}: {exc}") from None


def name_problem(name: object) -> str | None:
    """Why a manifest file name cannot name a file inside the model folder (syntax only), or None."""
    if not isinstance(name, str) or not name or "\0" in name:
        return f"must be a non-empty file name, not {name!r}"
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.drive or flavour.root:
            return f"{name!r} is an absolute path; names are relative to the model folder"
        if ".." in flavour.parts:
            return f"{name!r} leads out of the model folder ('..')"
    return None


def folder_file(folder: str | os.PathLike, name: str, source: str) -> Path:
    """``folder / name`` for a file name read from ``source`` (the manifest), refused if it leaves the folder:
    an absolute name, a ``..`` part, or a symlink whose target lies outside the folder."""
    problem = name_problem(name)
    if problem:
        raise RuntimeSetupError(f"{source}: file name {problem}")
    folder = Path(folder)
    path = folder / name
    root, target = os.path.realpath(folder), os.path.realpath(path)
    if os.path.commonpath([root, target]) != root:
        raise RuntimeSetupError(f"{source}: file {name!r} resolves to {target}, outside the model folder {folder} "
                                "(a symlink out of the folder)")
    return path


def file_identity(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """``(device, inode, size, mtime_ns)`` of a file (symlinks followed), or None if it cannot be read: two equal
    identities are the same unchanged file (a re-export writes new files, so the identity changes)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns
