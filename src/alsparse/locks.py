"""Inter-process locks, so that two runs on one machine never write the same thing at once.

A lock is an OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on a small lock file beside
what it protects. The OS drops it when the holding process exits, however it exits, so a lock file
left behind by a killed run never blocks anyone; lock files are therefore never deleted (deleting
one would let two processes lock two different files of the same name). The file holds the
holder's pid and start time, only to name it in the error of the process that is refused.

Within one process the same lock can be taken again (nested ``with``): the output directory is
locked by the CLI for the whole run and again by :func:`alsparse.io.save`.
"""

from __future__ import annotations

import contextlib
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


def lock_path_for(path: str | os.PathLike, suffix: str = "lock") -> Path:
    """The lock file of ``path``: a hidden sibling, so that replacing or deleting ``path`` (a
    directory renamed into place, a results file rewritten) leaves the lock where it was."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.{suffix}")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

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


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        return "another process"
    if len(text) >= 2:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(text[1])))
        return f"process {text[0]}, started {started}"
    return "another process"


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, wait: Optional[float] = 0.0) -> Iterator[None]:
    """Hold the lock ``lock_file`` for the block. ``wait``: seconds to wait for another holder
    (0: fail at once; None: wait as long as it takes). A holder still there after ``wait`` raises
    :class:`InUseError` naming ``what`` and the holder."""
    path = Path(lock_file).absolute()
    key = str(path)
    with _guard:
        entry = _held.get(key)
        if entry is not None:  # this process holds it already: nest
            entry[1] += 1
    if entry is not None:
        try:
            yield
        finally:
            with _guard:
                entry[1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while not _try_lock(fd):
            if deadline is not None and time.monotonic() >= deadline:
                raise InUseError(f"{what} is in use by another alsparse run ({_holder(path)}; lock {path}); "
                                 f"wait for it to finish, or choose another path")
            if not told:
                log.info("waiting for %s: %s holds it", what, _holder(path))
                told = True
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
        with _guard:
            _held[key] = [fd, 1]
        try:
            yield
        finally:
            with _guard:
                del _held[key]
    finally:
        os.close(fd)  # closing the descriptor releases the OS lock


def held(lock_file: str | os.PathLike) -> bool:
    """Whether this process holds ``lock_file`` now."""
    with _guard:
        return str(Path(lock_file).absolute()) in _held
