"""``tune cp``: copy a shipped recipe or config out of the package to edit it."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tinytune.config import registry
from tinytune.config._errors import ConfigError, did_you_mean


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cp`` subcommand."""
    p = subparsers.add_parser(
        "cp",
        help="copy a recipe or config to edit",
        description=(
            "Copy a recipe (e.g. lora_finetune) or a config (e.g. smollm2/135M_lora) to DEST. "
            "Run the copy with `tune run ./my_recipe.py --config ./my_config.yaml`."
        ),
    )
    p.add_argument("name", help="recipe or config name (see `tune ls`)")
    p.add_argument("dest", help="destination file or existing directory; the extension is added if missing")
    p.add_argument("-f", "--force", action="store_true", help="overwrite DEST if it exists")
    p.set_defaults(func=run)


def copy(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy the recipe or config ``name`` to ``dest`` and return the written path.

    Raises:
        ConfigError: Unknown name (with suggestions) or ``dest`` exists and ``force`` is False.
    """
    recipes = registry.list_recipes()
    configs = registry.list_configs()
    key = name.removesuffix(".yaml").removesuffix(".py")
    if key in recipes:
        src, suffix = recipes[key], ".py"
    elif key in configs:
        src, suffix = configs[key].path, ".yaml"
    else:
        raise ConfigError(
            f"'{name}' is neither a recipe nor a config."
            + did_you_mean(key, [*recipes, *configs])
            + " Run `tune ls` for the names."
        )
    out = Path(dest).expanduser()
    if out.is_dir():
        out = out / src.name
    elif not out.suffix:
        out = out.with_suffix(suffix)
    if out.exists() and not force:
        raise ConfigError(f"'{out}' already exists; pass --force to overwrite it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out


def run(args: argparse.Namespace) -> int:
    """Copy and print the destination; returns 0."""
    out = copy(args.name, args.dest, force=args.force)
    print(f"Copied {args.name} to {out}")
    return 0
