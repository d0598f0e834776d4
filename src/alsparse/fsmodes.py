"""Files published by renaming a temporary one get the modes the user's umask gives a normal write.

``tempfile.mkdtemp`` creates ``drwx------`` and ``mkstemp`` ``-rw-------``; renamed into place they
would keep those modes, and a serving process under another user could not read the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it: set, then restore
    os.umask(mask)
    return mask


def publish_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything under it) mode 0o666 / 0o777 & ~umask."""
    mask = current_umask()
    root = Path(path)
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            full = os.path.join(directory, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """``data`` as JSON at ``path``: written under a temporary name beside it, given the umask's
    modes, then renamed into place (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
        publish_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
