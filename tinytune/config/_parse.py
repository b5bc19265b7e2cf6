"""``parse``: the command-line entry point of every recipe."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from tinytune.config._errors import ConfigError
from tinytune.config._loader import load_config
from tinytune.errors import TinytuneError, run_context, show_traceback, user_error_message


def build_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The argument parser shared by recipes: ``--config CFG`` plus ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Overrides: key=value (existing key), +key=value (new key), ++key=value (either), ~key (delete).",
    )
    parser.add_argument("--config", required=True, help="config registry name (e.g. smollm2/135M_lora) or YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[[Sequence[str] | None], Any]:
    """Wrap a recipe's ``recipe_main(cfg)`` into a command-line entry point.

    The returned callable reads ``--config CFG`` (a registry name or a path) and ``key=value``
    overrides from ``argv`` (default ``sys.argv[1:]``), builds the config (overrides applied,
    interpolations resolved) and calls ``recipe_main(cfg)``. Config problems are printed as one
    clear message and exit with status 2; other deliberate errors (:class:`tinytune.errors.TinytuneError`:
    data, checkpoint, tokenizer, resume), a full disk and Ctrl-C print a few lines and exit with 1
    (130 for Ctrl-C). Set ``TINYTUNE_TRACEBACK=1`` to see the traceback.

    Args:
        recipe_main: The recipe function.

    Returns:
        ``main(argv=None)`` returning whatever ``recipe_main`` returns.

    Example:
        >>> if __name__ == "__main__":
        ...     tinytune.config.parse(recipe_main)()
    """

    @functools.wraps(recipe_main)
    def main(argv: Sequence[str] | None = None) -> Any:
        argv = list(sys.argv[1:] if argv is None else argv)
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None
        parser = build_parser(prog=prog, description=(recipe_main.__doc__ or "").strip().split("\n")[0] or None)
        args = parser.parse_intermixed_args(argv)
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            if os.environ.get("TINYTUNE_TRACEBACK"):
                raise
            parser.exit(2, f"{parser.prog}: config error: {e}\n")
        run_context.reset()
        try:
            return recipe_main(cfg)
        except ConfigError as e:
            if os.environ.get("TINYTUNE_TRACEBACK"):
                raise
            print(f"{parser.prog}: config error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (TinytuneError, KeyboardInterrupt, OSError) as e:  # data, checkpoint, resume, Ctrl-C, full disk
            message = user_error_message(e)
            if message is None or show_traceback():
                raise
            run_context.close_all()  # e.g. the progress bar, so the message gets its own line
            print(f"{parser.prog}: error: {message}", file=sys.stderr)
            raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else 1) from None

    return main
