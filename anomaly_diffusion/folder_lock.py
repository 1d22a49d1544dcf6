"""One writer per output folder: an exclusive `flock` on a lock file inside it, held while the work runs.

The kernel releases a `flock` when its holder ends in any way, kill -9 included, so a lock is
never stale in the sense of blocking forever: a lock file still naming a holder but free to
take was left by a process that died, and is taken over with a note. The file records who
holds it (pid, host, start time) for the message a second writer gets. Linux NFS clients map
`flock` to NFS byte-range locks, so writers on two hosts sharing a folder exclude each other too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from anomaly_diffusion.errors import OutputError

LOCK_NAME = ".adiff.lock"


def _holder(text: str) -> str:
    """'pid 123 on host h since 2026-12-01 10:00:00 (adiff explain)' from a lock file's contents."""
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on host {info['host']} since {since} ({info['what']})"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


@contextmanager
def folder_lock(folder: Path, what: str, note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the output folder's lock for the body; yields the lock file's path.

    Args:
        folder: the output folder (made if missing).
        what: the work, for the message another writer gets (e.g. 'adiff explain cohort').
        note: told when a lock left by a process that died is taken over.

    Raises:
        OutputError: another process holds the lock, or the folder cannot be locked.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create output folder ({exc.strerror})") from exc
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the lock file {LOCK_NAME} ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(_read(fd))
            os.close(fd)
            raise OutputError(
                f"{folder}: another adiff run is writing to this folder ({holder}); wait for it to finish "
                "or choose another --out"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"{folder}: the file system cannot lock {LOCK_NAME} ({exc.strerror})") from exc
        # the holder before us may have removed the file between our open and our lock: lock the file
        # that is at the path now, or a third process could take that one meanwhile
        try:
            same = os.fstat(fd).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        left = _read(fd)
        if left and note is not None:
            note(f"note: {folder}: taking over the lock left by {_holder(left)}, which is no longer running")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        yield path
    finally:
        with suppress(OSError):
            path.unlink()  # while still holding the lock: a waiter then re-opens, see above
        os.close(fd)
