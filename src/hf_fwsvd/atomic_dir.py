"""Publish a checkpoint directory atomically and read one without ever seeing a missing or mixed folder.

Writers build the new checkpoint in a staging folder next to the output (``.NAME.tmp-*``), then swap it with the
output in one step: `renameat2(RENAME_EXCHANGE)` on Linux (the path always names a complete checkpoint, old or new).
Where the kernel or filesystem lacks the exchange, two renames are used (``NAME -> .NAME.old-*``, staging -> ``NAME``)
and the short gap between them is covered: a reader waits for the writer, and a crash inside the gap is repaired by
the next save or load, which renames the backup back.

Readers (`pinned_directory`) open the output folder once and load everything through that open handle
(``/proc/self/fd/N``), so a swap during the load cannot mix files of two checkpoints: the reader keeps the folder it
opened. It also holds a shared `flock` on that folder; writers delete a replaced folder only when they can lock it
exclusively, and otherwise leave it for the next save (or load) to remove. Every hidden folder a process is still
using carries a lock; one nobody locks is left over from a killed process and is removed (or restored) then.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator

from filelock import FileLock, Timeout

__all__ = ["exchange", "pinned_directory", "publish", "recover", "staging_directory", "writer_lock"]

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(first: str, second: str) -> bool:
    """Atomically swap two existing paths; `False` when this system cannot (the caller falls back to renames)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), first, None, second)


def _siblings(directory: str, kind: str) -> list[str]:
    parent, base = os.path.split(directory)
    prefix = f".{base}.{kind}-"
    try:
        return sorted(os.path.join(parent, name) for name in os.listdir(parent) if name.startswith(prefix))
    except OSError:
        return []


def lock_path(directory: str) -> str:
    parent, base = os.path.split(directory)
    return os.path.join(parent, f".{base}.fwsvd.lock")


@contextlib.contextmanager
def writer_lock(directory: str) -> Iterator[None]:
    """Serialise writers of one output folder across processes (the lock file lives next to it)."""
    lock = FileLock(lock_path(directory))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning(
            "Another process is saving into %s; waiting for it to finish (lock %s).", directory, lock.lock_file
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _lock_fd(path: str, mode: int) -> int | None:
    """An open descriptor of folder `path` holding `flock(mode)`, or `None` when it is gone or locked (non-blocking
    modes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, mode)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_if_unused(path: str) -> bool:
    fd = _lock_fd(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        return False
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)
    return not os.path.exists(path)


def _restore_backup(directory: str) -> bool:
    """Rename the newest complete ``.NAME.old-*`` back to `directory` (a crash between the fallback's two renames)."""
    candidates = [path for path in _siblings(directory, "old") if os.path.isfile(os.path.join(path, "config.json"))]
    if os.path.lexists(directory) or not candidates:
        return False
    newest = max(candidates, key=lambda path: os.stat(path).st_ctime)
    os.rename(newest, directory)
    logger.warning("Restored the checkpoint %s from %s, left behind by an interrupted save.", directory, newest)
    return True


def _clean(directory: str) -> None:
    """Restore a missing `directory` from its backup, then remove the hidden folders nobody uses (call under the
    writer lock)."""
    _restore_backup(directory)
    removed = [path for path in _siblings(directory, "tmp") + _siblings(directory, "old") if _remove_if_unused(path)]
    if removed:
        logger.info("Removed %d folder(s) left by interrupted saves of %s.", len(removed), directory)


def recover(directory: str | os.PathLike, wait: bool = True) -> None:
    """Repair what a killed writer left next to `directory` (best effort; never raises for lack of permission).

    A missing `directory` with a backup is restored; unused staging and backup folders are removed. When a writer
    holds the lock, nothing is touched, and with `wait` the call first waits for that writer to finish (a reader
    that found the folder missing during the fallback's rename gap then sees the new folder).
    """
    directory = os.path.abspath(os.fspath(directory))
    if not _siblings(directory, "tmp") and not _siblings(directory, "old"):
        return
    lock = FileLock(lock_path(directory))
    try:
        lock.acquire(timeout=-1 if wait and not os.path.lexists(directory) else 0)
    except (Timeout, OSError):
        return
    try:
        _clean(directory)
    except OSError as error:
        logger.debug("Could not clean up after interrupted saves of %s: %s", directory, error)
    finally:
        lock.release()


@contextlib.contextmanager
def pinned_directory(directory: str | os.PathLike, attempts: int = 100) -> Iterator[str]:
    """A path naming the folder `directory` is now, for the whole `with` block, whatever writers do meanwhile.

    On Linux it is ``/proc/self/fd/N`` of an open handle holding a shared lock (writers do not delete the folder
    while it is held); elsewhere `directory` itself.
    """
    directory = os.fspath(directory)
    recover(directory)
    if not os.path.isdir("/proc/self/fd"):
        yield directory
        return
    for _ in range(attempts):
        fd = _lock_fd(directory, fcntl.LOCK_SH)
        if fd is None:
            break
        try:
            current = os.stat(directory)
            pinned = os.fstat(fd)
        except OSError:
            current = None
        if current is not None and (current.st_ino, current.st_dev) == (pinned.st_ino, pinned.st_dev):
            try:
                yield f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
            return
        os.close(fd)  # swapped between open and lock: pin the new folder instead
        time.sleep(0.001)
    yield directory


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_directory(directory: str) -> Iterator[str]:
    """A new hidden folder ``.NAME.tmp-*`` next to `directory`, locked by this process while the block runs, and
    removed if the block fails (a successful `publish` has already moved it)."""
    parent, base = os.path.split(directory)
    with writer_lock(directory):  # creation and cleanup never interleave: a fresh staging folder is never removed
        _clean(directory)
        staging = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        fd = _lock_fd(staging, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def publish(staging: str, directory: str) -> None:
    """Make the finished folder `staging` the folder at `directory`, atomically, and remove the replaced one when no
    reader holds it. Modes: an existing folder keeps its mode, a new one gets ``0o777 & ~umask``."""
    mode = stat.S_IMODE(os.stat(directory).st_mode) if os.path.isdir(directory) else 0o777 & ~_umask()
    os.chmod(staging, mode)
    _fsync_tree(staging)
    parent = os.path.dirname(directory)
    with writer_lock(directory):
        _restore_backup(directory)
        if not os.path.lexists(directory):
            os.replace(staging, directory)
            _fsync_dir(parent)
            return
        if exchange(staging, directory):
            _fsync_dir(parent)
            _remove_if_unused(staging)  # `staging` now names the previous folder
            return
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
        os.replace(directory, backup)  # onto the empty folder just made
        try:
            os.replace(staging, directory)
        except BaseException:
            os.replace(backup, directory)
            raise
        _fsync_dir(parent)
        _remove_if_unused(backup)
