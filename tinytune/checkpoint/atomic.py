"""Atomic directory writes: build in a temp dir next to the target, fsync, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any


def fsync_dir(path: str) -> None:
    """Flushes a directory entry (new/renamed files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsyncs every file under ``path`` and every directory, deepest first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_directory(target: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temp directory; on normal exit it is fsynced and renamed to ``target``.

    On an exception the temp directory is removed and ``target`` is untouched. With
    ``overwrite=True`` an existing ``target`` is replaced (moved aside, then deleted).

    Args:
        target: final directory path.
        overwrite: replace an existing ``target`` instead of raising FileExistsError.
    """
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists")
    tmp = os.path.join(parent, f".tmp-{os.path.basename(target)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if os.path.exists(target):
            old = os.path.join(parent, f".old-{os.path.basename(target)}-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomic(path: str, write: Callable[[str], None]) -> None:
    """Writes ``path`` via ``write(tmp_path)``, fsyncs, then renames into place.

    The file gets mode ``0666 & ~umask`` whatever mode ``write`` created it with.
    """
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""

    def w(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    write_file_atomic(path, w)
