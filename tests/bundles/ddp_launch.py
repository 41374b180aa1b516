"""``torchrun`` entry point for the multi-process bundle test: ``monai.bundle run`` that records what ranks > 0 write.

Python's audit hooks see every file a process opens for writing, creates, renames or removes, and every SQLite
database it connects to (MLflow). Ranks other than 0 record those under ``WATCH_DIR`` and, at exit, write the list
to ``WRITES_DIR/rank<N>.json`` (outside the watched folder), so the test can check that they wrote nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _watch(root: Path, writes: list[str]) -> None:
    def inside(path: object) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None
        full = Path(os.path.abspath(path))
        return str(full) if full == root or root in full.parents else None

    def hook(event: str, args: tuple) -> None:
        paths: list[object] = []
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[:3]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            ):
                paths = [path]
        elif event == "os.mkdir":
            paths = [] if os.path.exists(args[0]) else [args[0]]  # Path.mkdir(exist_ok=True) on a folder that exists
        elif event in ("os.rename", "shutil.copyfile", "shutil.move"):
            paths = [args[1]]
        elif event in ("os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "sqlite3.connect"):
            paths = [args[0]]
        for path in paths:
            hit = inside(path)
            if hit is not None:
                writes.append(f"{event} {hit}")

    sys.addaudithook(hook)


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []
    if rank != 0:
        _watch(Path(os.path.abspath(os.environ["WATCH_DIR"])), writes)
    import fire
    from monai.bundle import scripts

    try:
        fire.Fire({"run": scripts.run})
    finally:
        if rank != 0:
            out = Path(os.environ["WRITES_DIR"]) / f"rank{rank}.json"
            out.write_text(json.dumps(sorted(set(writes))))


if __name__ == "__main__":
    main()
