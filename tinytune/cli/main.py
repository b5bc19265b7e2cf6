"""``tune``: the tinytune command line.

Each subcommand lives in its own module ``tinytune.cli.<name>`` that defines
``register(subparsers)``; the parser it adds sets ``func=handler`` where
``handler(args) -> int`` returns the exit status. Subcommand modules must import heavy
dependencies (torch, transformers) inside their handlers so ``tune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from tinytune.config._errors import ConfigError
from tinytune.errors import TinytuneError, show_traceback, user_error_message

# Order shown in `tune --help`. Modules that are not written yet are skipped.
SUBCOMMANDS = ("ls", "cp", "cat", "validate", "run", "download", "convert", "prepare_data", "plan")


def build_parser() -> argparse.ArgumentParser:
    """The ``tune`` parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="tune",
        description="tinytune: fine-tune LLMs with readable recipes and YAML configs.",
        epilog="Run `tune <command> --help` for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in SUBCOMMANDS:
        modname = f"tinytune.cli.{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # that subcommand is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tune`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        if os.environ.get("TINYTUNE_TRACEBACK"):
            raise
        print(f"tune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (TinytuneError, KeyboardInterrupt, OSError) as e:  # data, checkpoint, tokenizer, Ctrl-C, full disk
        message = user_error_message(e)
        if message is None or show_traceback():
            raise
        print(f"tune {args.command}: error: {message}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1


if __name__ == "__main__":
    sys.exit(main())
