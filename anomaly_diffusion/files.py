"""The one atomic file writer: every output and checkpoint goes through `atomic_write`.

A write that fails for want of space (a full disk, a quota, a read-only file system) leaves nothing
behind and raises `NoSpaceError`: one line naming the folder and, where known, the bytes needed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from anomaly_diffusion.errors import NoSpaceError

NO_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
"""The errno values of a write that cannot succeed until someone frees space (or remounts): one line each."""


def _size(nbytes: int) -> str:
    if nbytes >= 10**9:
        return f"{nbytes / 1e9:.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes} bytes"


def no_space(exc: BaseException, folder: Path, needed: int | None = None) -> NoSpaceError | None:
    """The one-line error for a write into `folder` that failed for want of space, or None for any other error.

    Args:
        exc: what the write raised.
        folder: where it wrote.
        needed: the bytes the step needed, where known.
    """
    if not isinstance(exc, OSError) or exc.errno not in NO_SPACE:
        return None
    need = f"; the step needed {_size(needed)}" if needed else ""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)  # the folder may not be made yet
    try:
        free = f", {_size(shutil.disk_usage(existing).free)} free" if existing and exc.errno != errno.EROFS else ""
    except OSError:
        free = ""
    return NoSpaceError(f"{folder}: {NO_SPACE[exc.errno]}{free}{need}; free space there and rerun")


def _fill(write: Callable[[Path], object], tmp: Path) -> None:
    """Run a writer into its temporary file or folder (one place, so tests can make every write fail)."""
    write(tmp)


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


def atomic_write(path: Path, write: Callable[[Path], object], suffix: str = ".tmp", size: int | None = None) -> Path:
    """Let `write` fill a temporary file beside `path`, then rename it there: never a half-written file.

    The result gets the mode a plain `open` would give it (0666 less the umask), not the
    temporary file's private 0600, so colleagues sharing an output folder can read it.
    `suffix` is the temporary file's (writers such as nibabel choose the format by it); `size`, the
    bytes to write where known, goes into the error of a full disk.

    Raises:
        NoSpaceError: no space, quota or a read-only file system (nothing is left behind).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        full = no_space(exc, path.parent, size)
        if full is None:
            raise
        raise full from exc
    tmp = Path(name)
    try:
        _fill(write, tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = no_space(exc, path.parent, size)
        if full is not None:
            raise full from exc
        raise
    return path


def atomic_write_bytes(data: bytes | memoryview, path: Path) -> Path:
    """Write bytes atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def atomic_write_folder(path: Path, write: Callable[[Path], object]) -> Path:
    """Let `write` fill a temporary folder beside `path`, then rename it there: never a half-written folder.

    An existing `path` (an overwrite) is moved aside first and deleted once the new folder is
    in place; between the two renames the path is briefly absent, never partial.

    Raises:
        NoSpaceError: no space, quota or a read-only file system (nothing is left behind).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        full = no_space(exc, path.parent)
        if full is None:
            raise
        raise full from exc
    old = None
    try:
        _fill(write, tmp)
        mode = 0o777 & ~_umask()
        tmp.chmod(mode)
        for child in tmp.iterdir():
            child.chmod(mode & 0o666)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # put the previous output back
        full = no_space(exc, path.parent)
        if full is not None:
            raise full from exc
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
