"""Files published by renaming a temporary one get the modes the user's umask gives a normal write.

``tempfile.mkdtemp`` creates ``drwx------`` and ``mkstemp`` ``-rw-------``; renamed into place they
would keep those modes, and a serving process under another user could not read the model.
"""

from __future__ import annotations

import os
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
