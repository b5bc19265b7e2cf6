"""The step-directory protocol shared by every training-state checkpointer.

Layout under a checkpointer's root directory::

    <root>/step_<N>/           the checkpoint of optimizer step N: payload files + COMPLETE
    <root>/.tmp-step_<N>/      step N being written (renamed to step_<N> once COMPLETE is in it)
    <root>/.old-step_<N>-<id>/ the previous step_<N> while a re-save of N replaces it

The rules, the same for the single-device (:class:`tinytune.checkpoint.TrainingCheckpointer`)
and the sharded (:class:`tinytune.checkpoint.dcp.DistributedCheckpointer`) checkpointers:

* a checkpoint is written into ``.tmp-step_<N>``; the ``COMPLETE`` marker (every file's size and
  sha256, the run fingerprint; :mod:`tinytune.checkpoint.integrity`) is written last, then the
  directory is fsynced and renamed into place, so a crash never leaves a ``step_<N>`` that looks whole;
* a ``step_<N>`` without a marker, or whose files do not have the sizes the marker lists, is torn:
  never resumed, named in a warning when checkpoints are listed for a resume;
* ``resume_from_checkpoint``: ``auto`` takes the newest complete checkpoint whose files pass their
  sha256 check, skipping a corrupt one with a warning naming the file (falling back to the previous
  one); a path must be a complete, sound checkpoint (else a short error); ``null`` starts fresh;
* after each save only the newest ``keep_last`` complete checkpoints are kept;
* ``.tmp-*`` / ``.old-*`` directories a crashed save left are removed at the start of a run and,
  when older than an hour, after each save.

A checkpointer subclasses :class:`StepDirectories` and writes only its payload: single-process
writers use :meth:`StepDirectories.writing`; collective writers call :meth:`_begin` /
:meth:`_commit` on the main process between their barriers and override :meth:`_is_main` and
:meth:`_share` (the main process reads the files, the others receive its answer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tinytune.checkpoint.atomic import fsync_dir, fsync_tree
from tinytune.checkpoint.integrity import COMPLETE_FILE, check_digests, check_sizes, directory_manifest, read_marker
from tinytune.checkpoint.model_info import CheckpointError
from tinytune.config._errors import ConfigError
from tinytune.errors import ResumeError

logger = logging.getLogger(__name__)

__all__ = ["COMPLETE_FILE", "STALE_LEFTOVER_SECONDS", "StepDirectories", "is_leftover", "step_dir_name"]

_STEP_RE = re.compile(r"^step_(\d+)$")
# what a crashed save leaves: ours, and the ``.step_<N>.tmp`` of the DCP checkpointer of older tinytune
_LEFTOVER_RE = re.compile(r"^(\.tmp-step_\d+.*|\.old-step_\d+.*|\.step_\d+\.tmp)$")
_NULL_VALUES = (None, "", False, "null", "none", "None")
STALE_LEFTOVER_SECONDS = 3600.0

T = TypeVar("T")


def step_dir_name(step: int) -> str:
    """``step_<N>``: the directory name of the checkpoint of optimizer step ``step``."""
    return f"step_{int(step)}"


def is_leftover(name: str) -> bool:
    """Whether directory entry ``name`` is an unfinished write a crashed save left behind."""
    return _LEFTOVER_RE.match(name) is not None


class StepDirectories:
    """Finds, validates, prunes and atomically commits ``step_<N>`` checkpoint directories.

    Args:
        root: the directory holding the ``step_<N>`` directories (created on the first save).
        keep_last: keep only the newest K complete checkpoints after a save (None keeps all).

    Raises:
        ConfigError: ``keep_last`` below 1.

    Class attributes a checkpointer may set:
        path_type: what paths are returned as (``str``, or ``pathlib.Path``).
        legacy_markers: accept a ``COMPLETE`` marker that is not a JSON manifest (written by an
            older tinytune without sizes and digests) as complete, unverified, with a warning.
    """

    path_type: Callable[[str], Any] = str
    legacy_markers: bool = False

    def __init__(self, root: str | os.PathLike, keep_last: int | None = None) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or int(keep_last) < 1):
            raise ConfigError(f"keep_last_checkpoints must be >= 1 or null, got {keep_last}.")
        self._root = os.path.abspath(os.fspath(root))
        self.root = self.path_type(self._root)
        self.keep_last = keep_last
        self._verified: set[str] = set()

    # ---- collective hooks (overridden by multi-process checkpointers) ------------------------------

    def _is_main(self) -> bool:
        """Whether this process writes markers, renames, prunes, cleans and logs (rank 0)."""
        return True

    def _share(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed where the files are read (the main process) and the same value everywhere."""
        return fn()

    # ---- naming and listing -----------------------------------------------------------------------

    def path_for(self, step: int) -> Any:
        """The directory of the checkpoint of ``step``."""
        return self.path_type(os.path.join(self._root, step_dir_name(step)))

    def step_dirs(self) -> list[tuple[int, Any]]:
        """``(step, path)`` of every ``step_<N>`` directory, complete or not, oldest first."""
        if not os.path.isdir(self._root):
            return []
        out = []
        for name in os.listdir(self._root):
            m = _STEP_RE.match(name)
            path = os.path.join(self._root, name)
            if m and os.path.isdir(path):
                out.append((int(m.group(1)), path))
        return [(step, self.path_type(path)) for step, path in sorted(out)]

    def is_complete(self, path: str | os.PathLike) -> tuple[bool, str]:
        """Whether ``path`` holds a complete checkpoint (marker present, file sizes match), and if not, why."""
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, COMPLETE_FILE)):
            return False, f"no {COMPLETE_FILE} marker (interrupted while writing?)"
        marker = read_marker(path)
        if marker is None:
            return (True, "") if self.legacy_markers else (False, f"unreadable {COMPLETE_FILE} marker")
        why = check_sizes(path, marker)
        return (why is None), (why or "")

    def complete_checkpoints(self, warn: bool = False) -> list[Any]:
        """Complete checkpoint directories, oldest first; with ``warn`` the torn ones are named in a warning."""
        out = []
        for _step, path in self.step_dirs():
            ok, why = self.is_complete(path)
            if ok:
                out.append(path)
            elif warn and self._is_main():
                logger.warning("Skipping incomplete checkpoint %s: %s", path, why)
        return out

    # ---- integrity ---------------------------------------------------------------------------------

    def _check_files(self, path: str) -> str | None:
        marker = read_marker(path)
        if marker is None:
            if self.legacy_markers and os.path.isfile(os.path.join(path, COMPLETE_FILE)):
                logger.warning("%s: written by an older tinytune without sha256 digests; not verified", path)
                return None
            return f"no readable {COMPLETE_FILE} marker"
        return check_digests(path, marker)

    def verify(self, path: str | os.PathLike) -> str | None:
        """Why checkpoint ``path`` cannot be trusted (size or sha256 mismatch, naming the file); None if sound.

        A sound result is remembered for this object (the files are hashed once per run).
        Collective for multi-process checkpointers.
        """
        key = os.path.abspath(os.fspath(path))
        if key in self._verified:
            return None
        why = self._share(lambda: self._check_files(key))
        if why is None:
            self._verified.add(key)
        return why

    def fingerprint(self, path: str | os.PathLike) -> dict[str, Any] | None:
        """The run fingerprint stored with checkpoint ``path`` (None for checkpoints without one)."""
        marker = read_marker(os.fspath(path))
        return None if marker is None else marker.get("fingerprint")

    # ---- resolving resume_from_checkpoint ----------------------------------------------------------

    def latest(self, verify: bool = True) -> Any | None:
        """The newest complete checkpoint, or None.

        With ``verify`` (default) torn checkpoints are named in a warning, and one whose files fail
        their sha256 check is skipped with a warning naming the file, falling back to the previous one.
        """
        for path in reversed(self.complete_checkpoints(warn=verify)):
            if not verify:
                return path
            why = self.verify(path)
            if why is None:
                return path
            if self._is_main():
                logger.warning(
                    "Skipping corrupt checkpoint %s: %s; falling back to the previous complete one", path, why
                )
        return None

    def _listing(self) -> str:
        names = [os.path.basename(os.fspath(p)) for p in self.complete_checkpoints()]
        return f"complete ones in {self._root}: {names or 'none'}"

    def check(self, path: str | os.PathLike) -> Any:
        """``path`` as a checkpoint to resume from: it must exist, be complete and pass its sha256 check.

        Raises:
            CheckpointError: it does not exist or is torn (the message lists the complete ones).
            ResumeError: a file fails its size or sha256 check (the message names it).
        """
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise CheckpointError(
                f"resume_from_checkpoint: {path} does not exist; use resume_from_checkpoint=auto "
                f"or the path of a step_N directory ({self._listing()})"
            )
        ok, why = self.is_complete(path)
        if not ok:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {why}; pick another ({self._listing()}) "
                "or use resume_from_checkpoint=auto"
            )
        why = self.verify(path)
        if why is not None:
            raise ResumeError(
                f"checkpoint {path} is corrupt: {why}; resume from an earlier step_N directory or "
                "use resume_from_checkpoint=auto (falls back to the newest sound one)"
            )
        return self.path_type(path)

    def resolve(self, resume_from_checkpoint: Any) -> Any | None:
        """Turns a ``resume_from_checkpoint`` value into a checkpoint directory, or None.

        ``auto`` -> the newest sound complete checkpoint (None when there is none); a path -> that
        path, checked by :meth:`check`; ``null`` / ``""`` / ``false`` -> None (start fresh).
        """
        if resume_from_checkpoint in _NULL_VALUES:
            return None
        if str(resume_from_checkpoint) == "auto":
            return self.latest()
        return self.check(resume_from_checkpoint)

    # ---- writing -----------------------------------------------------------------------------------

    def _begin(self, step: int) -> str:
        """The temp directory of ``step``'s checkpoint, emptied and created by the main process."""
        tmp = os.path.join(self._root, f".tmp-{step_dir_name(step)}")
        if self._is_main():
            os.makedirs(self._root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        return tmp

    def _commit(self, tmp: str, step: int, fingerprint: dict[str, Any] | None = None) -> Any:
        """Main process only: writes the marker into ``tmp``, fsyncs, renames it to ``step_<step>``
        (replacing an older one atomically), then prunes. Returns the checkpoint directory."""
        marker = {"step": int(step), "time": time.time(), **directory_manifest(tmp)}
        if fingerprint is not None:
            marker["fingerprint"] = fingerprint
        with open(os.path.join(tmp, COMPLETE_FILE), "w", encoding="utf-8") as f:
            json.dump(marker, f)
        fsync_tree(tmp)
        final = os.path.join(self._root, step_dir_name(step))
        old = None
        if os.path.exists(final):
            old = os.path.join(self._root, f".old-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(self._root)
        self._verified.discard(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.prune()
        return self.path_type(final)

    @contextlib.contextmanager
    def writing(self, step: int, fingerprint: dict[str, Any] | None = None) -> Iterator[str]:
        """Yields the temp directory of ``step``'s checkpoint; on normal exit commits it (single process).

        On an exception the temp directory is removed and every existing checkpoint is untouched.
        """
        tmp = self._begin(step)
        try:
            yield tmp
            self._commit(tmp, step, fingerprint)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ---- housekeeping ------------------------------------------------------------------------------

    def clean_leftovers(self, older_than: float | None = None) -> list[str]:
        """Removes ``.tmp-*`` / ``.old-*`` directories crashed saves left (main process); returns their names.

        Args:
            older_than: only those not modified for this many seconds (None: all; call at the
                start of a run, one run per output directory).
        """
        if not self._is_main() or not os.path.isdir(self._root):
            return []
        gone = []
        for name in sorted(os.listdir(self._root)):
            path = os.path.join(self._root, name)
            if not is_leftover(name):
                continue
            if older_than is not None and time.time() - os.path.getmtime(path) <= older_than:
                continue
            shutil.rmtree(path, ignore_errors=True)
            gone.append(name)
        if gone:
            logger.warning(
                "Removed %d unfinished checkpoint write(s) left by an earlier crash in %s: %s",
                len(gone),
                self._root,
                ", ".join(gone),
            )
        return gone

    def prune(self) -> None:
        """Keeps the newest ``keep_last`` complete checkpoints; removes stale crash leftovers (main process)."""
        if not self._is_main():
            return
        self.clean_leftovers(older_than=STALE_LEFTOVER_SECONDS)
        if self.keep_last is None:
            return
        for path in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            self._verified.discard(os.path.abspath(os.fspath(path)))
