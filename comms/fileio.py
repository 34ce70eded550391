"""One atomic file writer for everything comms writes to disk.

A write goes to a temporary file in the target's own folder (so the final rename never crosses
a file system), is flushed and fsynced, gets the caller's mode, and is renamed over the target:
a reader sees the old file or the new one, never half of one, and a full disk or a crash leaves
the previous file intact. The temporary name is unique per write, so two runs writing the same
target never collide, and it is removed on any failure.

Errors become ``OutputError`` naming the path and the fix (the folder is missing, the target is
a directory, the disk is full, permission denied).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from comms.errors import OutputError

# Customer data (ledger exports, reports, rejects, backups, token caches): owner only.
PRIVATE = 0o600


def _explain(path: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        why = "the disk is full; free some space (the previous file, if any, is unchanged)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied; choose a folder you can write to"
    elif exc.errno == errno.ENOENT:
        why = f"the folder {path.parent} does not exist; create it or choose another path"
    elif exc.errno == errno.EISDIR or path.is_dir():
        why = "it is a directory; give a file name (e.g. add /report.html)"
    else:
        why = exc.strerror or str(exc)
    return OutputError(f"Cannot write {path}: {why}.")


def write_atomic(path: str | Path, data: bytes | str, *, mode: int = PRIVATE,
                 make_parents: bool = False) -> Path:
    """Write ``data`` (str is UTF-8 encoded) to ``path`` atomically with permissions ``mode``."""
    return write_atomic_stream(path, [data], mode=mode, make_parents=make_parents)


def write_atomic_stream(path: str | Path, chunks: Iterable[bytes | str], *,
                        mode: int = PRIVATE, make_parents: bool = False) -> Path:
    """``write_atomic`` for content produced piece by piece (a CSV export of a million rows):
    memory stays flat, and the file still appears whole or not at all."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(
            f"Cannot write {target}: it is a directory; give a file name inside it."
        )
    try:
        if make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _explain(target, exc) from exc
    try:
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise _explain(target, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
