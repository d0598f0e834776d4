"""Where the offline data lives: `$ALSPARSE_DATA`, else `../shared/data` next to the repository.

The data is read in place and never copied into the repository. A missing file is a
`FileNotFoundError` that names every path tried and how to point the project at the data.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ALSPARSE_DATA"


def _repo_root() -> Path:
    # src/alsparse/data/paths.py -> parents: data, alsparse, src, <repo>
    return Path(__file__).resolve().parents[3]


def candidate_dirs() -> list[Path]:
    """Directories searched for data, in order: `$ALSPARSE_DATA` alone when set, else
    `<repo>/../shared/data` and `<cwd>/../shared/data`."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    dirs: list[Path] = []
    for base in (_repo_root(), Path.cwd()):
        candidate = (base.parent / "shared" / "data").resolve()
        if candidate not in dirs:
            dirs.append(candidate)
    return dirs


def _not_found(what: str, tried: list[Path]) -> FileNotFoundError:
    listed = "\n".join(f"  {path}" for path in tried)
    return FileNotFoundError(
        f"{what} not found; looked at:\n{listed}\n"
        f"Set {ENV_VAR} to the directory that holds wikitext2/, ptb/ and tasks/ "
        f"(e.g. export {ENV_VAR}=/path/to/shared/data)."
    )


def data_dir() -> Path:
    """The first existing data directory among `candidate_dirs()`."""
    tried = candidate_dirs()
    for directory in tried:
        if directory.is_dir():
            return directory
    raise _not_found("data directory", tried)


def data_file(relpath: str | os.PathLike[str]) -> Path:
    """`relpath` (e.g. "tasks/piqa.jsonl") inside the first data directory that has it."""
    tried = [directory / relpath for directory in candidate_dirs()]
    for path in tried:
        if path.is_file():
            return path
    raise _not_found(f"data file {str(relpath)!r}", tried)
