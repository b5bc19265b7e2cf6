"""``tune validate``: check that a config's components import and its fields fit them."""

from __future__ import annotations

import argparse
import sys

from tinytune.config import registry
from tinytune.config._errors import did_you_mean


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` subcommand."""
    p = subparsers.add_parser(
        "validate",
        help="check a config without running it",
        description=(
            "Load a config (with optional overrides), resolve interpolations, import every "
            "_component_ and bind its fields to the component's signature, then run the settings "
            "check of the recipe the config's header names (every key known, types and ranges). "
            "Every problem is reported with its key path. Exit status 1 when there are problems."
        ),
    )
    p.add_argument("config", nargs="?", help="config name (e.g. smollm2/135M_lora) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides to apply first")
    p.add_argument("--all", action="store_true", help="validate every registered config (see `tune ls`)")
    p.set_defaults(func=run)


def check(config: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Validate one config.

    Returns:
        ``(problems, n_components)``; each problem is ``"key.path: message"``.
    """
    from tinytune.config import ConfigError, load_config, validate_config
    from tinytune.config.recipe_settings import RECIPE_SETTINGS

    path = registry.resolve_config(config)
    problems: list[str] = []
    recipe = registry.declared_recipe(path)
    # Registered configs must name their recipe (that is how `tune ls` groups them).
    if path.resolve().parent.parent == _configs_root():
        recipes = registry.list_recipes()
        if recipe is None:
            problems.append("<header>: line 1 must declare the recipe, e.g. '# recipe: lora_finetune'.")
        elif recipe not in recipes:
            problems.append(
                f"<header>: '# recipe: {recipe}' names a recipe that does not exist." + did_you_mean(recipe, recipes)
            )
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        return problems + [f"<load>: {e}"], 0
    found, count = validate_config(cfg)
    problems += [str(p) for p in found]
    # The recipe's own check: every key read by it, types and ranges (the same one `tune run` does first).
    if recipe in RECIPE_SETTINGS:
        _, settings_problems = RECIPE_SETTINGS[recipe].read(cfg)
        problems += [str(p) for p in settings_problems if str(p) not in problems]
    return problems, count


def _configs_root():
    root = registry.configs_dir()
    return root.resolve() if root is not None else None


def run(args: argparse.Namespace) -> int:
    """Print the problems (or OK) per config; returns 1 when any config has problems."""
    if args.all == (args.config is not None):
        print("tune validate: give one CONFIG or --all", file=sys.stderr)
        return 2
    names = list(registry.list_configs()) if args.all else [args.config]
    failed = 0
    for name in names:
        problems, count = check(name, args.overrides)
        if problems:
            failed += 1
            print(f"{name}: {len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
        else:
            print(f"{name}: OK ({count} components checked)")
    return 1 if failed else 0
