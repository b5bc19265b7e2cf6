"""Checkpoint content checks: per-file sizes and sha256 digests recorded in the ``COMPLETE`` marker.

The marker of a checkpoint directory is JSON::

    {"step": 12, "time": 1700000000.0,
     "files": {"training_state.pt": 123456, ...},          # size in bytes
     "sha256": {"training_state.pt": "9f86d0...", ...},    # content digest
     "fingerprint": {...}}                                  # optional: what run wrote it

Sizes are checked whenever checkpoints are listed (cheap); digests when one is resumed, so a
flipped byte on disk is caught before it is trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

COMPLETE_FILE = "COMPLETE"
_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def directory_manifest(path: str) -> dict[str, Any]:
    """``{"files": {name: size}, "sha256": {name: digest}}`` of the plain files directly in ``path``.

    The marker itself is left out.
    """
    names = sorted(n for n in os.listdir(path) if n != COMPLETE_FILE and os.path.isfile(os.path.join(path, n)))
    return {
        "files": {n: os.path.getsize(os.path.join(path, n)) for n in names},
        "sha256": {n: sha256_file(os.path.join(path, n)) for n in names},
    }


def read_marker(path: str) -> dict[str, Any] | None:
    """The parsed ``COMPLETE`` marker of checkpoint directory ``path`` (None when absent or unreadable)."""
    try:
        with open(os.path.join(path, COMPLETE_FILE), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def check_sizes(path: str, marker: dict[str, Any]) -> str | None:
    """Why the files of ``path`` do not match the marker's sizes (None when they do)."""
    for name, size in marker["files"].items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"file {name} listed in {COMPLETE_FILE} is missing"
        if os.path.getsize(p) != size:
            return f"file {name} has {os.path.getsize(p)} bytes, {COMPLETE_FILE} says {size}"
    return None


def check_digests(path: str, marker: dict[str, Any]) -> str | None:
    """Why the files of ``path`` do not match the marker (sizes, then sha256); None when they do.

    A marker without ``sha256`` (written before digests were recorded) is checked by size only.
    """
    why = check_sizes(path, marker)
    if why is not None:
        return why
    for name, digest in (marker.get("sha256") or {}).items():
        got = sha256_file(os.path.join(path, name))
        if got != digest:
            return (
                f"file {os.path.join(path, name)} fails its sha256 check (corrupt: {got[:12]}... != {digest[:12]}...)"
            )
    return None
