"""Writing files and folders safely: atomic, mode-preserving, through symlinks, checked before long work.

Every bank the runtime, training and the exporter write goes through :func:`atomic_write`; every model folder
the exporter writes goes through :func:`staging_dir` + :func:`replace_dir`. The rules:

* **Atomic.** Data is written to a temporary sibling, fsynced, then renamed over the target: a reader (or a
  crash) sees the old file or the new one, never half of one.
* **The file keeps its mode.** A rewritten file gets the previous file's permission bits (another user of the
  runtime keeps read access); a new file follows the umask, as ``open()`` would create it.
* **Symlinks are written through.** When the path is a symlink, its final target is rewritten and the link
  stays a link (``os.path.realpath``); a symlink loop is refused.
* **Stale temporaries are collected.** Temporaries are named ``.NAME.diki-tmp-HOST-PID-RANDOM``; the next write
  to the same path removes those whose process (on this host) is gone — a ``kill -9`` leaves nothing behind for
  longer than the next run.
* **Folders swap in one step.** :func:`replace_dir` exchanges the new and the old folder with Linux's
  ``renameat2(RENAME_EXCHANGE)``, so at every instant one complete folder is at the path. Where that call does
  not exist, the old folder is renamed aside first; a run killed between the two renames leaves the old folder
  aside under a name the next run on the same path recognises and puts back.
* **Checked first.** :func:`check_writable` (the directory exists or can be made, a probe file can be created,
  the file system has room for the expected size) runs before training, export or bank edits start.

Failures raise :class:`WriteError` naming the path and the problem.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from diki_edge_runtime.errors import DikiEdgeError

TEMP_MARK = ".diki-tmp-"
ASIDE_MARK = ".diki-old-"  # an old folder renamed aside by replace_dir's fallback
# Headroom over the expected size when checking free space (file system metadata, the safetensors header).
SPACE_MARGIN_BYTES = 1 << 20


class WriteError(DikiEdgeError):
    """A file or folder cannot be written where asked (not writable, no space, not a regular file, ...)."""


def _host() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:32] or "host"


def _temp_name(target: Path, mark: str = TEMP_MARK) -> str:
    return f".{target.name}{mark}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_gone(name: str, prefix: str) -> bool:
    """Whether the temporary ``name`` (``prefix`` + ``HOST-PID-RANDOM``) belongs to a dead process on this host."""
    try:
        host, pid, _ = name[len(prefix):].rsplit("-", 2)
        return host == _host() and not _pid_alive(int(pid))
    except ValueError:
        return False


def _stale(target: Path, mark: str) -> list[Path]:
    prefix = f".{target.name}{mark}"
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / n for n in names if n.startswith(prefix) and _owner_gone(n, prefix)]


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``target`` left by killed runs on this host (files and folders); returns them.

    An old folder that :func:`replace_dir`'s fallback set aside is put back at ``target`` when nothing is there
    (the run died between its two renames), otherwise removed.
    """
    target = Path(target)
    removed = []
    for path in _stale(target, ASIDE_MARK):
        if not os.path.lexists(target):
            os.replace(path, target)
            continue
        _remove(path)
        removed.append(path)
    for path in _stale(target, TEMP_MARK):
        _remove(path)
        removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` really replaces: ``path`` itself, or a symlink's final target.

    Refuses a symlink loop and anything that exists but is not a regular file (a folder, a device, a FIFO).
    """
    path = Path(path)
    if path.is_symlink():
        try:
            target = Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:  # a dangling link: create its target
            target = Path(os.path.realpath(path))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise WriteError(f"{path}: symlink loop; cannot write through it") from None
            raise WriteError(f"{path}: cannot resolve the symlink: {exc.strerror or exc}") from None
    else:
        target = path
    try:
        st = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # missing (check_writable names a parent that is a file)
        return target
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WriteError(f"{path}: symlink loop; cannot write through it") from None
        raise WriteError(f"{path}: cannot inspect: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise WriteError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise WriteError(f"{path}: is not a regular file (a device, FIFO or socket); refusing to replace it")
    return target


def _nearest_existing(folder: Path) -> Path:
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(path: str | os.PathLike, expected_bytes: int = 0, *, what: str = "file",
                   is_dir: bool = False) -> Path:
    """Check, before long work, that ``path`` can be written with about ``expected_bytes``; returns the target.

    The folder must exist or be creatable, a probe file must be creatable in it, and its file system must have
    ``expected_bytes`` (plus a small margin) free. ``is_dir``: ``path`` is a folder to be created or replaced.
    Raises :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    if is_dir:
        if os.path.lexists(path) and not path.is_dir():
            raise WriteError(f"{path}: exists and is not a folder; cannot write the {what} there")
        target = path
    else:
        target = write_target(path)
    folder = target.parent
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise WriteError(f"{path}: cannot create the {what}: {existing} is not a folder")
    if existing != folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(f"{path}: cannot create folder {folder}: {exc.strerror or exc}") from None
    probe = folder / _temp_name(target)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(f"{path}: cannot write the {what} in {folder}: {exc.strerror or exc}") from None
    free = shutil.disk_usage(folder).free
    need = int(expected_bytes) + SPACE_MARGIN_BYTES
    if expected_bytes and free < need:
        raise WriteError(f"{path}: not enough space for the {what}: about {need / 1e6:.1f} MB needed, "
                         f"{free / 1e6:.1f} MB free in {folder}")
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file atomically through ``write(temp_path)``; see the module docstring. Returns the target written.

    ``write`` fills the temporary file (it exists, empty) or replaces it (safetensors writes a new file); the
    mode is set after ``write`` returns, so either way the result has the previous file's mode or the umask's.
    """
    target = write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = None
    tmp = target.parent / _temp_name(target)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies, as for open()
        os.close(fd)
        if mode is None:
            mode = stat.S_IMODE(tmp.stat().st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A new, empty sibling folder of ``target`` (mode per the umask) removed again unless moved into place.

    Stale staging folders of killed runs on the same target are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / _temp_name(target)
    tmp.mkdir(0o777)  # the umask applies
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _libc_renameat2() -> Callable[[str, str], bool] | None:
    """``renameat2(..., RENAME_EXCHANGE)`` through libc, or None where the C library lacks it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: str, b: str) -> bool:
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported by this kernel / file system
            return False
        raise OSError(err, os.strerror(err), a)

    return exchange


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the platform or file system cannot."""
    fn = _libc_renameat2()
    return bool(fn and fn(os.fspath(a), os.fspath(b)))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the folder ``new`` at ``target``, replacing a folder there crash-safely (see the module docstring)."""
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if target.is_dir() and not target.is_symlink() and _exchange(new, target):
        _remove(new)  # ``new`` now holds the old folder
        return
    aside = target.parent / _temp_name(target, ASIDE_MARK)
    os.replace(target, aside)
    os.replace(new, target)
    _remove(aside)


LOCK_SUFFIX = ".lock"  # the lock of ``bank.safetensors`` is ``.bank.safetensors.lock``: hidden, like the temp files
LOCK_WAIT_SECONDS = 60.0  # a bank's read-modify-write takes seconds; a holder past this is stuck or another long job


def lock_path_of(path: str | os.PathLike) -> Path:
    """The lock file :func:`locked` takes for ``path``."""
    target = Path(path)
    return target.with_name("." + target.name + LOCK_SUFFIX)


@contextmanager
def locked(path: str | os.PathLike, *, what: str = "bank", wait: float | None = None) -> Iterator[Path]:
    """Hold the advisory lock of ``path`` (``fcntl.flock`` on the hidden ``.<name>.lock`` beside it) for a
    read-modify-write.

    Every writer of a bank takes it and re-reads the bank inside it, so two writers never both start from the same
    old bank (the second would drop the first one's task). Waits up to ``wait`` seconds (:data:`LOCK_WAIT_SECONDS`)
    for another holder, then raises a :class:`WriteError` naming the lock file. The lock file is left in place:
    removing it would let a third writer lock a new file while the second still holds the old one. The kernel
    releases the lock when the holder exits, however it exits.
    """
    target = Path(path)
    lock_path = lock_path_of(target)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteError(f"{lock_path}: cannot create the {what}'s lock file ({exc.strerror})") from None
    try:
        deadline = time.monotonic() + (LOCK_WAIT_SECONDS if wait is None else wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WriteError(f"{target}: another process is writing this {what} (it holds {lock_path}); "
                                     "try again when it has finished") from None
                time.sleep(0.05)
        yield lock_path
    finally:
        os.close(fd)  # also releases the lock
