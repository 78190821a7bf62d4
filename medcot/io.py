"""Atomic writes: a reader (or a resumed run) never sees half a file or half a folder.

Every file and folder medcot leaves for a user (checkpoints, adapters, reports, exports, the converted
embedded model) is written under a temporary name beside its destination and renamed when complete.
A rename within one folder is atomic on POSIX filesystems, so a crash or Ctrl-C mid-write leaves either
the old content or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file under a temporary name and rename it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


@contextlib.contextmanager
def write_file_atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a library that writes files itself (a plot, a GGUF);
    it replaces `path` once the block completes, and is removed if the block fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keep the suffix: savefig reads it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def write_dir_atomic(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; once the block completes, it becomes `final`.

    A failure inside the block removes the temporary folder and leaves `final` as it was. With
    `replace=False` an existing `final` wins (another process finished the same work first).
    """
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            if not replace:
                return
            # Move the old folder aside before the rename: `final` is missing only between two renames.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
