"""The one atomic file writer: every output and checkpoint goes through `atomic_write`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it, even briefly, would
    race with files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Let `write` fill a temporary file beside `path`, then rename it there: never a half-written file.

    The result gets the mode a plain `open` would give it (0666 less the umask), not the
    temporary file's private 0600, so colleagues sharing an output folder can read it.
    `suffix` is the temporary file's (writers such as nibabel choose the format by it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(data: bytes, path: Path) -> Path:
    """Write bytes atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_folder(path: Path, write: Callable[[Path], object]) -> Path:
    """Let `write` fill a temporary folder beside `path`, then rename it there: never a half-written folder.

    An existing `path` (an overwrite) is moved aside first and deleted once the new folder is
    in place; between the two renames the path is briefly absent, never partial.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = None
    try:
        write(tmp)
        mode = 0o777 & ~_umask()
        tmp.chmod(mode)
        for child in tmp.iterdir():
            child.chmod(mode & 0o666)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # put the previous output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
