"""Atomic single-file writes: a reader sees the previous complete file or the new complete one, never a partial one.

Checkpoints, weights, sample grids and audit files are all written the same way: to a hidden temporary sibling,
then renamed over the destination in one ``os.replace``. (Whole folders, such as a release or a training index,
are staged as a sibling folder by their own writers.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file"]


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on a clean exit it replaces ``path``, on an error it is removed.

    Args:
        path: the destination; its folder is created if needed.
        durable: flush the temporary file to disk (``fsync``) before the rename, for files that must survive a
            power loss, not only a crash of this process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
