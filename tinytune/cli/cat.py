"""``tune cat``: print a config (as written, or composed with overrides)."""

from __future__ import annotations

import argparse

from tinytune.config import registry


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cat`` subcommand."""
    p = subparsers.add_parser(
        "cat",
        help="print a config",
        description=(
            "Print a config file as written. With overrides (key=value ...) or --resolve, print the "
            "composed config instead: overrides applied and ${...} interpolations resolved."
        ),
    )
    p.add_argument("config", help="config name (e.g. smollm2/135M_lora) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides to apply before printing")
    p.add_argument("--resolve", action="store_true", help="print the composed, resolved config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print; returns 0."""
    if not args.overrides and not args.resolve:
        print(registry.resolve_config(args.config).read_text(encoding="utf-8"), end="")
        return 0
    from omegaconf import OmegaConf

    from tinytune.config import load_config

    print(OmegaConf.to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
