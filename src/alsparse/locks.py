"""Inter-process locks, so that two runs on one machine never write the same thing at once.

A lock is an OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on a small lock file beside
what it protects. The OS drops it when the holding process exits, however it exits, so a lock file
left behind by a killed run never blocks anyone; lock files are therefore never deleted (deleting
one would let two processes lock two different files of the same name). The file holds the
holder's pid and the time it took the lock, only to name it in the error of the process that is
refused. (A child made by ``fork`` inherits the descriptor and with it the lock.)

Within one process the same lock can be taken again (nested ``with``): the output directory is
locked by the CLI for the whole run and again by :func:`alsparse.io.save`; the OS lock is dropped
when the last holder in the process lets go. On a filesystem without OS locks (some NFS, Lustre or
FUSE mounts) a warning is logged and the run goes on unguarded.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)


class InUseError(RuntimeError):
    """Another process holds the lock: what it protects is being written by another run."""


_held: dict[str, list] = {}  # lock path -> [fd, depth]
_guard = threading.Lock()
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_LOCK_BYTE = 1 << 30  # Windows locks a byte range: lock one far past the holder line, so it stays readable


def lock_path_for(path: str | os.PathLike, suffix: str = "lock") -> Path:
    """The lock file of ``path``: a hidden sibling, so that replacing or deleting ``path`` (a
    directory renamed into place, a results file rewritten) leaves the lock where it was."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.{suffix}")


def _key(path: Path) -> str:
    return str(path.parent.resolve() / path.name)  # one key for every spelling of the same file


def _try_lock(fd: int) -> bool:
    """True once locked, False while another process holds it; None where the OS has no locks."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return None
        raise


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)


def _holder(path: Path) -> str:
    try:
        pid, since = path.read_text().split()[:2]
        return f"process {int(pid)}, holding it since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(since)))}"
    except (OSError, ValueError, OverflowError):
        return "another process"


def _open(path: Path) -> tuple[int, bool]:
    """(descriptor, writable). A lock file another user created may be read-only to us; a read-only
    descriptor locks as well (POSIX), it only cannot record the holder."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY), False
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # best effort: other users' runs on this directory can lock it too
    return fd, True


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, wait: Optional[float] = 0.0) -> Iterator[None]:
    """Hold the lock ``lock_file`` for the block. ``wait``: seconds to wait for another holder
    (0: fail at once; None: wait as long as it takes). A holder still there after ``wait`` raises
    :class:`InUseError` naming ``what`` and the holder."""
    path = Path(lock_file).absolute()
    key = _key(path)
    with _guard:
        entry = _held.get(key)
        if entry is not None:  # this process holds it already: nest
            entry[1] += 1
    if entry is None:
        entry = _acquire(path, key, what, wait)
    try:
        yield
    finally:
        with _guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last and _held.get(key) is entry:
                del _held[key]
        if last and entry[0] is not None:
            _unlock(entry[0])
            os.close(entry[0])


def _acquire(path: Path, key: str, what: str, wait: Optional[float]) -> list:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, writable = _open(path)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while True:
            got = _try_lock(fd)
            if got is None:
                log.warning("%s: this filesystem has no OS file locks; another run on it would not be stopped", what)
                os.close(fd)
                fd = None
                break
            if got:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise InUseError(f"{what} is in use by another alsparse run ({_holder(path)}; lock {path}); "
                                 f"wait for it to finish, or choose another path")
            if not told:
                log.info("waiting for %s: %s holds it", what, _holder(path))
                told = True
            time.sleep(0.05)
        if fd is not None and writable:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    entry = [fd, 1]
    with _guard:
        _held[key] = entry
    return entry


def held(lock_file: str | os.PathLike) -> bool:
    """Whether this process holds ``lock_file`` now."""
    with _guard:
        return _key(Path(lock_file).absolute()) in _held
