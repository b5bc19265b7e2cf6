"""The error every deliberate refusal raises, and how entry points print it.

A leaf module (no tinytune imports): every package may raise :class:`TinytuneError` subclasses,
and the entry points (``tune``, ``tinytune.config.parse``) print them as a few lines without a
traceback (``TINYTUNE_TRACEBACK=1`` shows it). :data:`run_context` records how far a training run
got and where its checkpoints are, so an interrupt (Ctrl-C) or a full disk can say which step was
reached and which checkpoint is still good.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

TRACEBACK_ENV = "TINYTUNE_TRACEBACK"


class TinytuneError(Exception):
    """Base of every error tinytune raises on purpose (bad config, data, checkpoint, resume, ...).

    The message names the file / row / key and what to do; entry points print it without a
    traceback.
    """


class NonFiniteError(TinytuneError):
    """A loss, gradient norm or weight is NaN/Inf (``nan_policy: stop``, or corrupt base weights)."""


class ResumeError(TinytuneError):
    """A checkpoint cannot be resumed by this run (other model, data or settings; corrupt files)."""


def show_traceback() -> bool:
    """Whether ``TINYTUNE_TRACEBACK`` asks for full tracebacks."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0", "false", "False")


@dataclass
class RunContext:
    """How far the current training run got (for the interrupt / full-disk messages).

    Attributes:
        step: the last optimizer step finished (None before training starts).
        checkpoint_root: directory holding the run's ``step_N`` checkpoints (None: not checkpointing).
        on_exit: callables run before an error is printed (a progress bar registers its ``close``).
    """

    step: int | None = None
    checkpoint_root: str | None = None
    on_exit: list = field(default_factory=list)

    def reset(self) -> None:
        self.step, self.checkpoint_root = None, None
        self.on_exit.clear()

    def close_all(self) -> None:
        """Runs the registered exit hooks (e.g. closing a progress bar before an error line), once."""
        hooks, self.on_exit[:] = list(self.on_exit), []
        for hook in hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - a failing cleanup must not hide the error being reported
                pass


run_context = RunContext()

_STEP_DIR = re.compile(r"^step_(\d+)$")


def last_good_checkpoint(root: str | None) -> str | None:
    """The newest ``step_N`` directory under ``root`` whose ``COMPLETE`` marker exists (None if none)."""
    if not root or not os.path.isdir(root):
        return None
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "COMPLETE")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return max(found)[1] if found else None


def _checkpoint_sentence() -> str:
    good = last_good_checkpoint(run_context.checkpoint_root)
    if good is None:
        return "no complete checkpoint was written yet (a rerun starts from step 0)"
    return f"last complete checkpoint: {good}; rerun with resume_from_checkpoint=auto to continue from it"


def interrupt_message() -> str:
    """One line for Ctrl-C: the step reached and how to resume."""
    where = f"after step {run_context.step}" if run_context.step is not None else "before the first training step"
    return (
        f"interrupted {where}; nothing is saved on interrupt (steps after the last checkpoint are redone); "
        + _checkpoint_sentence()
    )


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is an ``OSError`` for a full disk or quota."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(e: OSError) -> str:
    """ "No space left on device" with the file and the checkpoint that is still good."""
    file = f" writing {e.filename}" if e.filename else ""
    return f"No space left on device{file}; {_checkpoint_sentence()} after freeing space"


def user_error_message(e: BaseException) -> str | None:
    """The short message to print for ``e``, or None when it is a bug (print the traceback)."""
    if isinstance(e, KeyboardInterrupt):
        return interrupt_message()
    if is_disk_full(e):
        return disk_full_message(e)  # type: ignore[arg-type]
    if isinstance(e, TinytuneError):
        return str(e)
    return None


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json_line(obj: Any) -> str:
    """One strict-JSON line (``allow_nan=False`` after :func:`json_safe`)."""
    return json.dumps(json_safe(obj), allow_nan=False)
